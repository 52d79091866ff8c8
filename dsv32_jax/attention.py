"""One DSA attention layer: MLA projections, cache update, lightning-indexer selection, attention.

The same code serves prefill (S new tokens from position 0), chunked prefill and decode (S = 1 at each
sequence's own position): keys are cache slots ``0 .. kv_len-1`` and query ``t`` may see slot ``s``
iff ``s <= position(t)``. Queries are processed in blocks of ``RunOptions.query_chunk`` so that no
``[queries, keys]`` score matrix larger than a block is ever materialised (``kernel_query_chunk`` when
the DSA kernels score and attend over gathered rows: they hold no per-head scores).

With ``kv_len <= index_topk`` the indexer would select every visible key, so DSA equals dense causal
attention exactly and the selection is skipped (the indexer keys are still cached).

Which form attends: ``RunOptions.prefill_attention`` / ``prefill_selection`` (default: the official MHA
form, top-k as a mask; on a GPU through cuDNN's fused attention, ``fused_naive_attention_blocks``), except
that a prefill over more than ``RunOptions.gathered_prefill_from`` keys takes the latent form over the
gathered top-k rows when the DSA kernels run on them; decode: ``decode_attention`` / ``decode_selection``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from dsv32_jax import cache as cache_lib
from dsv32_jax import indexer, mla
from dsv32_jax.config import ModelConfig
from dsv32_jax.layers import linear
from dsv32_jax.options import RunOptions
from pallas_kernels import dispatch, masked_mha_mgpu


def selection_mask(idx: Int[Array, "b s k"], kv_len: int) -> Bool[Array, "b s t"]:
  """The index mask as booleans: True at the selected keys (idx = -1 selects nothing)."""
  b, s, _ = idx.shape
  safe = jnp.where(idx < 0, kv_len, idx)  # out of range: dropped by the scatter
  rows = jnp.zeros((b, s, kv_len), bool)
  return jax.vmap(jax.vmap(lambda r, i: r.at[i].set(True, mode="drop")))(rows, safe)


def map_query_blocks(fn, block: int, *arrays):
  """fn over blocks of the query axis (axis 1) of each array; outputs concatenated on axis 1."""
  s = arrays[0].shape[1]
  if s <= block:
    return fn(*arrays)
  n = -(-s // block)
  pad = n * block - s

  def split(a):
    a = jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * (a.ndim - 2))
    return jnp.moveaxis(a.reshape(a.shape[0], n, block, *a.shape[2:]), 1, 0)

  def merge(out):
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], n * block, *out.shape[3:])[:, :s]

  return jax.tree.map(merge, jax.lax.map(lambda xs: fn(*xs), tuple(split(a) for a in arrays)))


FUSED_MASK_ELEMENTS = 1 << 30  # queries x keys of one block's mask in the fused MHA form (1 GiB of booleans)


def fused_naive_attention_blocks(cfg: ModelConfig, implementation: str, q_nope: Float[Array, "b s h n"], q_pe,
                                 k_nope: Float[Array, "b t h n"], v, k_pe, positions: Int[Array, "b s"],
                                 idx: Int[Array, "b s k"] | None, *, fresh: bool) -> Float[Array, "b s h v"]:
  """The MHA form through ``mla.fused_naive_attention`` over blocks of queries (at most
  ``FUSED_MASK_ELEMENTS`` mask entries a block), each masked to its visible keys and, given ``idx``, to
  its top-k set.

  fresh: the queries are slots 0 .. s-1 of a prefill from position 0 (kv_len == s); then a block sees
  only the keys up to its last query, and the first block (square) is causal for cuDNN, which skips the
  tiles above its diagonal (a first block of the index_topk queries that need no mask, split off the
  rest, measured slower on an H100: the rest then loses the causal skip). Otherwise every block reads
  all kv_len keys.
  """
  b, s = positions.shape
  t = k_nope.shape[1]
  block = max(1, min(s, FUSED_MASK_ELEMENTS // (b * t)))
  outputs = []
  for lo in range(0, s, block):
    hi = min(s, lo + block)
    keys_end = hi if fresh else t
    pos = positions[:, lo:hi]
    causal = fresh and lo == 0
    if causal and (idx is None or hi <= cfg.index_topk):
      allowed = None  # causal is the whole mask: every visible key is selected
    else:
      allowed = jnp.arange(keys_end)[None, None, :] <= pos[:, :, None]
      if idx is not None:
        allowed = allowed & selection_mask(idx[:, lo:hi], keys_end)
    outputs.append(mla.fused_naive_attention(
        cfg, q_nope[:, lo:hi], q_pe[:, lo:hi], k_nope[:, :keys_end], v[:, :keys_end], k_pe[:, :keys_end], allowed,
        is_causal=causal, implementation=implementation))
  return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


def masked_kernel_attention_blocks(cfg: ModelConfig, q_nope: Float[Array, "b s h n"], q_pe,
                                   k_nope: Float[Array, "b t h n"], v, k_pe, positions: Int[Array, "b s"],
                                   bits: Int[Array, "b sb tw"] | None, *, fresh: bool, bits_start: int = 0,
                                   interpret: bool = False) -> Float[Array, "b s h v"]:
  """The MHA form through ``pallas_kernels.masked_mha_mgpu``, the top-k set as one bit a (query, key).

  bits: the top-k sets of queries bits_start .. s-1 as ``pack_bits`` rows over the kv_len keys
  (``dispatch.topk_bits``: only visible keys are ever set), or None without a selection (every visible key).
  fresh (queries are slots 0 .. s-1, kv_len == s): the kernel's causal rule, no key tile past a block's last
  query read; the queries before bits_start take no bits (a fresh prefill's first index_topk queries select
  every visible key), the rest go in blocks of at most ``FUSED_MASK_ELEMENTS`` (query, key) pairs with their
  bits. Otherwise (bits_start 0) each query reads its bits over all kv_len keys, or its visible keys' without.
  """
  b, s = positions.shape
  t = k_nope.shape[1]
  q, k = mla.mha_queries_keys(q_nope, q_pe, k_nope, k_pe)

  def run(lo, hi, keys_end, row_bits, causal):
    words = None if row_bits is None else masked_mha_mgpu.mask_words(row_bits, keys_end)
    return masked_mha_mgpu.masked_mha_mgpu(q[:, lo:hi], k[:, :keys_end], v[:, :keys_end], words, cfg.softmax_scale,
                                           causal=causal, q_offset=lo, interpret=interpret)

  block = max(1, FUSED_MASK_ELEMENTS // (b * t))
  if fresh:
    head = s if bits is None else bits_start  # no bits: one causal call
    outputs = [run(0, head, head, None, True)] if head else []
    for lo in range(head, s, block):
      hi = min(s, lo + block)
      outputs.append(run(lo, hi, hi, bits[:, lo - head:hi - head], True))
  else:
    chex.assert_equal(bits_start, 0)
    outputs = []
    for lo in range(0, s, block):
      hi = min(s, lo + block)
      row_bits = (masked_mha_mgpu.pack_bits(jnp.arange(t)[None, None, :] <= positions[:, lo:hi, None])
                  if bits is None else bits[:, lo:hi])
      outputs.append(run(lo, hi, t, row_bits, False))
  return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


def attention(p: dict, cfg: ModelConfig, opts: RunOptions, x: Float[Array, "b s d"], cache: cache_lib.LayerCache,
              layer: Int[Array, ""], start: Int[Array, "b"], kv_len: int, cos, sin):
  """Returns (output [B,S,D], cache with this layer's new slots written, top-k indices [B,S,k] or None).

  The indices are None when kv_len <= index_topk (every visible key is attended).
  """
  b, s, _ = x.shape
  chex.assert_shape(x, (b, s, cfg.dim))
  chex.assert_shape(start, (b,))
  chex.assert_axis_dimension(cache.kv, 1, b)
  if kv_len > cache.max_len:
    raise ValueError(f"kv_len = {kv_len} exceeds the cache's {cache.max_len} slots")
  decode = s == 1  # as the official code: one new token takes the absorbed path
  form = opts.decode_attention if decode else opts.prefill_attention
  gather = (opts.decode_selection if decode else opts.prefill_selection) == "gather"

  linears = opts.linear_kernels
  q_nope, q_pe, qr = mla.project_queries(p, cfg, x, cos, sin, linears)
  c, k_pe = mla.project_latent(p, cfg, x, cos, sin, opts.latent_quant, linears)
  index_k, index_k_scale = indexer.indexer_keys(p["indexer"], cfg, x, cos, sin, opts.indexer_quant, linears)
  cache = cache_lib.write(cache, layer, start, cache_lib.new_entries(cache, c, k_pe, index_k, index_k_scale))
  keys = cache_lib.read(cache, layer, kv_len)

  select = kv_len > cfg.index_topk
  fresh = kv_len == s  # a prefill from slot 0
  head = cfg.index_topk if select and fresh else 0
  if select:
    # A query before slot index_topk sees at most index_topk keys: all of them are its top k, whatever its
    # logits. So a fresh prefill's first index_topk queries need no indexer queries: zeros stand in for them
    # (finite logits; their blocks select every visible key, or score all-zero rows that keep every one).
    index_q, index_w = indexer.indexer_queries(p["indexer"], cfg, x[:, head:], qr[:, head:], cos[:, head:],
                                               sin[:, head:], opts.indexer_quant, linears)
    if head:
      index_q = jnp.pad(index_q, ((0, 0), (head, 0), (0, 0), (0, 0)))
      index_w = jnp.pad(index_w, ((0, 0), (head, 0), (0, 0)))
  else:  # placeholders of the right batch/query shape; unused
    index_q, index_w = jnp.zeros((b, s, 1, 1), x.dtype), jnp.zeros((b, s, 1), jnp.float32)
  if (not decode and select and not gather and opts.gathered_prefill_from is not None
      and kv_len > opts.gathered_prefill_from and dispatch.gathered_dsa_runs_kernels(
          index_q, keys.index_k, x.dtype, cfg.kv_lora_rank, cfg.qk_rope_head_dim, opts.kernels)):
    form, gather = "absorbed", True  # a long prompt: the sparse MLA kernels over the gathered rows
  # The latent in the activation dtype (dequantised from an e4m3 cache) for the forms that read every
  # row; the gathered form takes the e4m3 rows and dequantises only the selected ones.
  fp8_rows = keys.latent_fp8 and form == "absorbed" and gather
  kv = keys.kv if fp8_rows else cache_lib.latent(keys, x.dtype)
  if form == "naive":
    k_nope, v = mla.expand_keys(p, cfg, kv, linears)
  positions = start[:, None] + jnp.arange(s, dtype=start.dtype)
  key_pos = jnp.arange(kv_len)

  def select_keys(index_q, index_w, pos, bits: bool = False):
    """The top-k indices of each query [b, s, index_topk]; with bits, also the same sets as ``pack_bits``
    rows over the kv_len keys (``dispatch.topk_bits``: from the logits, no scatter of the indices)."""
    def scored():  # reference: indexer.index_logits / select_topk; the GPU and TPU kernels via the dispatch
      # Keys past pos: left unwritten where the kernel can skip them (the top-k reads each row up to pos);
      # top-k per sequence under a sharding plan (XLA would replicate it over a split batch).
      logits = dispatch.index_logits(index_q, index_w, keys.index_k, keys.index_k_scale, pos, impl=opts.kernels,
                                     skip_invisible=True)
      idx = opts.per_sequence(lambda scores, n: dispatch.topk(scores, cfg.index_topk, n, impl=opts.kernels))(
          logits, pos + 1)
      if not bits:
        return idx
      return idx, opts.per_sequence(lambda scores, n: dispatch.topk_bits(scores, cfg.index_topk, n,
                                                                          impl=opts.kernels))(logits, pos + 1)

    def every_visible_key():  # a block whose queries see at most index_topk keys: all of them are the top k
      slots = jnp.arange(cfg.index_topk, dtype=jnp.int32)
      idx = jnp.where(slots[None, None, :] <= pos[:, :, None], slots, -1)
      return (idx, masked_mha_mgpu.pack_bits(key_pos[None, None, :] <= pos[:, :, None])) if bits else idx

    return jax.lax.cond(jnp.max(pos) < cfg.index_topk, every_visible_key, scored)

  fused = (dispatch.fused_mha_implementation(q_nope.dtype, cfg.qk_head_dim, opts.kernels, cfg.v_head_dim)
           if form == "naive" else None)
  if fused:  # the official form through fused attention (cuDNN or the masked kernel): select first, then attend
    kernel = fused in ("mgpu", "interpret")  # the masked kernel reads the sets as bits, cuDNN as a boolean mask
    idx = bits = None
    if select:
      block = (opts.kernel_query_chunk if dispatch.index_logits_runs_kernel(index_q, keys.index_k, opts.kernels)
               else opts.query_chunk)
      # A fresh prefill's first index_topk queries see at most index_topk keys: one block of them takes
      # every visible key (select_keys' cond) instead of sharing a scored block (4K: half the logits + top-k);
      # the kernel attends to them causally, with no bits.
      idx = map_query_blocks(lambda *a: select_keys(*a, bits=kernel), block, index_q[:, head:], index_w[:, head:],
                             positions[:, head:])
      if kernel:
        idx, bits = idx
      if head:
        idx = jnp.concatenate([select_keys(index_q[:, :head], index_w[:, :head], positions[:, :head]), idx], axis=1)
    if kernel:
      o = masked_kernel_attention_blocks(cfg, q_nope, q_pe, k_nope, v, keys.k_pe, positions, bits, fresh=fresh,
                                         bits_start=head, interpret=fused == "interpret")
    else:
      o = fused_naive_attention_blocks(cfg, fused, q_nope, q_pe, k_nope, v, keys.k_pe, positions, idx,
                                       fresh=fresh)
    return linear(p["wo"], o.reshape(b, s, -1), impl=linears), cache, idx

  def attend(q_nope, q_pe, index_q, index_w, pos):
    visible = key_pos[None, None, :] <= pos[:, :, None]
    idx = None
    if select:
      idx = select_keys(index_q, index_w, pos)
      if not gather:
        visible = visible & selection_mask(idx, kv_len)
    if form == "naive":
      return mla.naive_attention(cfg, q_nope, q_pe, k_nope, v, keys.k_pe, visible), idx
    # The latent form: queries absorbed a block at a time (a 128K prompt's whole q_lat is 17 GB).
    q_lat = mla.absorb_query(p, cfg, q_nope)
    if gather:
      o_lat = dispatch.sparse_mla(q_lat, q_pe, kv, keys.k_pe,
                                  idx if select else jnp.where(visible, key_pos, -1), cfg.softmax_scale,
                                  impl=opts.kernels, kv_scale=keys.kv_scale if fp8_rows else None)
    else:
      o_lat = mla.absorbed_attention(cfg, q_lat, q_pe, kv, keys.k_pe, visible)
    return mla.latent_output(p, cfg, o_lat), idx

  block = opts.query_chunk
  if select and gather and form == "absorbed" and dispatch.gathered_dsa_runs_kernels(
      index_q, keys.index_k, q_nope.dtype, kv.shape[-1], keys.k_pe.shape[-1], opts.kernels):
    block = max(block, opts.kernel_query_chunk)  # no [queries, heads, keys] intermediate: larger blocks pay
  o, idx = map_query_blocks(attend, block, q_nope, q_pe, index_q, index_w, positions)
  return linear(p["wo"], o.reshape(b, s, -1), impl=linears), cache, (idx if select else None)
