"""Attention under a per-(query, key) bit mask on Hopper (Pallas Mosaic GPU): DSA's short prefills.

Computes, for every query i and head h of q [B, S, H, Dqk] against keys k [B, T, H, Dqk] and values
v [B, T, H, Dv],

  o[i, h] = sum_j softmax_j(scale * q[i, h] . k[j, h]) v[j, h]   over the keys j that query i may see:
            j <= q_offset + i when ``causal``, and bit j of query i's mask row when a mask is given,

which is ``reference`` below (and the model's ``mla.naive_attention`` with the MHA form's keys). DSA's
official prefill attends in this form with the top-k set as a mask; cuDNN takes such a mask as a bias
it reads for every tile and runs 2.7x slower than causal without one (an H200 at 4K, BENCHMARKS.md).
Here the mask is one bit a (query, key) -- 2 MiB for a 4K prompt, shared by every head -- and costs a
few integer operations a score in registers.

Work decomposition (FlashAttention-3's, written for Pallas Mosaic GPU). A CTA owns 128 queries of one
head: two consumer warpgroups of 64 queries each (wgmma's M) and a producer warpgroup that streams
``block_kv`` keys, their values and the matching 64 x block_kv / 32 mask words a consumer through a TMA
pipeline of ``max_concurrent_steps`` stages. A consumer computes S = Q K^T by wgmma, masks it, keeps
an online softmax (log2 units, exp2) and accumulates P V by wgmma; a shared rendezvous barrier staggers
the two consumers by half a step, so that one's softmax runs while the other's products use the tensor
cores. With ``causal`` the key tiles after a CTA's last query are never loaded and the causal test is
applied only on tiles that cross a consumer's diagonal; the CTAs take their query blocks last first
(the longest first). Mask words are laid out [B, S/64, T/32, 64] (``pack_mask``): one TMA box a step
brings both consumers' words, and a consumer reads word w of its 64 queries as one row vector.

A query that sees no key gets zeros.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxtyping import Array, Bool, Float, Int

BLOCK_Q = 64        # queries a consumer warpgroup (the wgmma M dimension)
CONSUMERS = 2
WORD = 32           # mask bits a word
SMEM_BYTES = 224 * 1024
LOG2E = math.log2(math.e)
NO_SCORE = -1e30    # the running maximum's start: finite, so a row whose tiles so far are all masked stays NaN-free


@dataclasses.dataclass(frozen=True)
class MaskedMhaConfig:
  """Tiling of the Mosaic GPU masked attention kernel."""

  block_kv: int = 128            # keys a pipeline step (a multiple of 64)
  max_concurrent_steps: int = 2  # TMA pipeline stages
  registers: tuple[int, int] = (232, 40)  # registers a thread of each consumer, of the producer (setmaxnreg)

  def __post_init__(self):
    if self.block_kv % 64 or self.block_kv <= 0:
      raise ValueError(f"MaskedMhaConfig.block_kv = {self.block_kv}: expected a positive multiple of 64")
    if self.max_concurrent_steps < 2:  # a consumer waits for the next keys before it frees this step's values
      raise ValueError(f"MaskedMhaConfig.max_concurrent_steps = {self.max_concurrent_steps}: expected >= 2")

  def smem_bytes(self, head_dim_qk: int, head_dim_v: int, masked: bool) -> int:
    queries = CONSUMERS * BLOCK_Q * head_dim_qk * 2  # the output reuses the queries' bytes
    words = CONSUMERS * BLOCK_Q * (self.block_kv // WORD) * 4 if masked else 0
    return queries + self.max_concurrent_steps * (self.block_kv * (head_dim_qk + head_dim_v) * 2 + words)


DEFAULT_CONFIG = MaskedMhaConfig()


def supports(head_dim_qk: int, head_dim_v: int, dtype) -> bool:
  """Whether the kernel takes these head dims (multiples of 64 that fit its shared memory) and dtype."""
  return (jnp.dtype(dtype) == jnp.dtype(jnp.bfloat16) and head_dim_qk % 64 == 0 and head_dim_v % 64 == 0
          and DEFAULT_CONFIG.smem_bytes(head_dim_qk, head_dim_v, True) <= SMEM_BYTES)


def pack_bits(allowed: Bool[Array, "*b t"]) -> Int[Array, "*b tw"]:
  """Bit j % 32 of int32 word j // 32 is allowed[..., j] (keys padded to a multiple of 32 with zeros)."""
  t = allowed.shape[-1]
  bits = jnp.pad(allowed, [(0, 0)] * (allowed.ndim - 1) + [(0, -t % WORD)]).reshape(*allowed.shape[:-1], -1, WORD)
  words = jnp.sum(bits.astype(jnp.uint32) << jnp.arange(WORD, dtype=jnp.uint32), axis=-1, dtype=jnp.uint32)
  return lax.bitcast_convert_type(words, jnp.int32)


def mask_words(row_words: Int[Array, "b s tw"], t: int, block_kv: int = DEFAULT_CONFIG.block_kv
               ) -> Int[Array, "b sq tw2 64"]:
  """Rows of ``pack_bits`` words in the kernel's layout for t keys: word [b, i // 64, w, i % 64] is row_words[b, i, w];
  queries padded to a multiple of 128 and keys to a multiple of block_kv with zeros (nothing allowed); bits of
  keys >= t cleared."""
  b, s, tw = row_words.shape
  s_pad, tw_pad = -(-s // (CONSUMERS * BLOCK_Q)) * CONSUMERS * BLOCK_Q, -(-t // block_kv) * block_kv // WORD
  words = row_words[:, :, :tw_pad]
  words = jnp.pad(words, ((0, 0), (0, s_pad - s), (0, tw_pad - words.shape[2])))
  live = jnp.clip(t - WORD * jnp.arange(tw_pad), 0, WORD)  # bits of each word below t
  words = words & jnp.where(live == WORD, -1, lax.shift_left(1, live) - 1).astype(jnp.int32)
  return jnp.transpose(words.reshape(b, s_pad // BLOCK_Q, BLOCK_Q, tw_pad), (0, 1, 3, 2))


def pack_mask(allowed: Bool[Array, "b s t"], block_kv: int = DEFAULT_CONFIG.block_kv) -> Int[Array, "b sq tw 64"]:
  """The mask as the kernel reads it: bit j % 32 of word [b, i // 64, j // 32, i % 64] is allowed[b, i, j]."""
  return mask_words(pack_bits(allowed), allowed.shape[2], block_kv)


def index_bits(idx: Int[Array, "*b k"], t: int) -> Int[Array, "*b tw"]:
  """``pack_bits`` of the keys idx selects among t (idx = -1 or >= t: nothing)."""
  safe = jnp.where((idx >= 0) & (idx < t), idx, t)  # out of range: dropped by the scatter
  rows = safe.reshape(-1, idx.shape[-1])
  chosen = jax.vmap(lambda i: jnp.zeros((t,), bool).at[i].set(True, mode="drop"))(rows)
  return pack_bits(chosen).reshape(*idx.shape[:-1], -1)


def selection_words(idx: Int[Array, "b s k"], t: int, block_kv: int = DEFAULT_CONFIG.block_kv
                    ) -> Int[Array, "b sq tw 64"]:
  """``pack_mask`` of the keys idx selects (idx = -1 or >= t: nothing)."""
  return mask_words(index_bits(idx, t), t, block_kv)


def reference(q: Float[Array, "b s h dk"], k: Float[Array, "b t h dk"], v: Float[Array, "b t h dv"],
              allowed: Bool[Array, "b s t"] | None, scale: float, *, causal: bool, q_offset: int = 0
              ) -> Float[Array, "b s h dv"]:
  """Masked softmax attention in float32 (a query that sees no key gets zeros)."""
  s, t = q.shape[1], k.shape[1]
  see = jnp.ones((1, s, t), bool) if allowed is None else allowed
  if causal:
    see = see & (jnp.arange(t)[None, None, :] <= q_offset + jnp.arange(s)[None, :, None])
  scores = jnp.einsum("bshd,bthd->bhst", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
  scores = jnp.where(see[:, None], scores, -jnp.inf)
  m = jnp.max(scores, axis=-1, keepdims=True)
  p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0))
  l = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("bhst,bthd->bshd", p / jnp.where(l > 0, l, 1.0), v.astype(jnp.float32))
  return o.astype(q.dtype)


def _tiled(shape, dtype=jnp.bfloat16):
  return plgpu.SMEM(shape, dtype, transforms=(plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def masked_mha_mgpu(q: Float[Array, "b s h dk"], k: Float[Array, "b t h dk"], v: Float[Array, "b t h dv"],
                    words: Int[Array, "b sq tw 64"] | None, scale: float, *, causal: bool, q_offset: int = 0,
                    config: MaskedMhaConfig = DEFAULT_CONFIG, interpret: bool = False
                    ) -> Float[Array, "b s h dv"]:
  """Attention output [B, S, H, Dv] in bf16 under the causal rule (key j <= q_offset + i) and/or the
  mask ``words`` (``pack_mask`` / ``selection_words`` with the same ``config.block_kv``); bf16 operands."""
  b, s, h, dk = q.shape
  t, dv = k.shape[1], v.shape[-1]
  bk, stages = config.block_kv, config.max_concurrent_steps
  if k.shape != (b, t, h, dk) or v.shape[:3] != (b, t, h):
    raise ValueError(f"masked_mha_mgpu: shapes q {q.shape}, k {k.shape}, v {v.shape} do not agree")
  if any(a.dtype != jnp.bfloat16 for a in (q, k, v)):
    raise TypeError(f"masked_mha_mgpu takes bf16 operands, got {q.dtype}, {k.dtype}, {v.dtype}")
  if dk % 64 or dv % 64:
    raise ValueError(f"masked_mha_mgpu: head dims must be multiples of 64, got q/k {dk} and v {dv}")
  cta_q = CONSUMERS * BLOCK_Q
  s_pad, t_pad = -(-s // cta_q) * cta_q, -(-t // bk) * bk
  if words is None and not causal and t_pad != t:
    words = pack_mask(jnp.ones((b, s, t), bool), bk)  # the padded keys must stay unseen
  masked = words is not None
  if masked and words.shape != (b, s_pad // BLOCK_Q, t_pad // WORD, BLOCK_Q):
    want = (b, s_pad // BLOCK_Q, t_pad // WORD, BLOCK_Q)
    raise ValueError(f"masked_mha_mgpu: mask words {words.shape}, expected {want} (pack_mask with block_kv = {bk})")
  if config.smem_bytes(dk, dv, masked) > SMEM_BYTES:
    raise ValueError(f"masked_mha_mgpu: {config} needs {config.smem_bytes(dk, dv, masked)} bytes of shared memory "
                     f"for head dims {dk} / {dv}, more than {SMEM_BYTES}")
  n_qb, n_kv, n_words = s_pad // cta_q, t_pad // bk, bk // WORD
  c_scale = scale * LOG2E

  def kv_steps(last_query):
    """Key tiles that queries up to last_query (an index into q) see."""
    if not causal:
      return n_kv
    return jnp.minimum(n_kv, (q_offset + last_query) // bk + 1)

  def kernel(q_gmem, k_gmem, v_gmem, w_gmem, o_gmem, *, qo_smem, k_smem, v_smem, q_bar, k_bar, v_bar, k_free,
             v_free, turn, w_smem=None, w_bar=None, p_smem=None):
    q_smem, o_smem = qo_smem
    head, batch, wg = lax.axis_index("heads"), lax.axis_index("batch"), lax.axis_index("wg")
    qb = n_qb - 1 - lax.axis_index("q_blocks")  # the longest blocks first
    q0 = qb * cta_q
    cta_steps = kv_steps(q0 + cta_q - 1)

    def take_turn():  # both consumers meet here: it staggers them by half a step
      plgpu.barrier_arrive(turn)
      plgpu.barrier_wait(turn)

    @pl.when(wg < CONSUMERS)
    def _consumer():
      plgpu.set_max_registers(config.registers[0], action="increase")
      first = q0 + wg * BLOCK_Q

      @pl.when(wg == 0)
      def _():
        for w in range(CONSUMERS):
          plgpu.copy_gmem_to_smem(q_gmem.at[batch, pl.ds(q0 + w * BLOCK_Q, BLOCK_Q), head], q_smem.at[w], q_bar)
      plgpu.barrier_wait(q_bar)
      steps = kv_steps(first + BLOCK_Q - 1)
      # Tiles whose every key is visible to every query of this consumer: no causal test.
      unmasked_steps = jnp.minimum(steps, (q_offset + first + 1) // bk) if causal else steps

      @pl.when(steps > 0)
      def _():
        plgpu.barrier_wait(k_bar.at[0])
      pl.when(wg == 1)(take_turn)

      def step(i, carry, diagonal: bool):
        acc, m, l = carry
        slot = lax.rem(i, stages)

        def scores(s_ref):
          plgpu.wgmma(s_ref, q_smem.at[wg], k_smem.at[slot].T)
          take_turn()
          return s_ref[...]
        sc = pl.run_scoped(scores, plgpu.ACC((BLOCK_Q, bk), jnp.float32)) * c_scale
        keep = None
        if masked:
          plgpu.barrier_wait(w_bar.at[slot])
          row_words = [plgpu.load(w_smem.at[slot, wg, w], layout=plgpu.Layout.WGMMA.reduce(1))
                       for w in range(n_words)]
        plgpu.barrier_arrive(k_free.at[slot])
        if masked or diagonal:
          col = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, bk), 1, layout=plgpu.Layout.WGMMA)
        if masked:  # each key's word, a register tile a word: no per-score choice between words
          word = jnp.concatenate([lax.broadcast_in_dim(rw, (BLOCK_Q, WORD), [0]) for rw in row_words], axis=1)
          keep = (lax.shift_right_logical(word, col & (WORD - 1)) & 1) != 0
        if diagonal:
          row = plgpu.broadcasted_iota(jnp.int32, (BLOCK_Q, bk), 0, layout=plgpu.Layout.WGMMA)
          visible = row + (q_offset + first) >= col + i * bk
          keep = visible if keep is None else keep & visible
        if keep is not None:
          sc = jnp.where(keep, sc, -jnp.inf)
        m_new = jnp.maximum(m, sc.max(axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(sc - lax.broadcast_in_dim(m_new, sc.shape, [0]))
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p16 = p.astype(jnp.bfloat16)
        plgpu.barrier_arrive(turn)  # softmax done
        plgpu.barrier_wait(v_bar.at[slot])
        plgpu.barrier_wait(turn)    # the tensor cores are ours
        l = l * alpha + p.sum(axis=1)

        if interpret:  # the interpreter's wgmma reads its left operand from shared memory only
          p_smem.at[wg][...] = p16
          plgpu.commit_smem()
          p16 = p_smem.at[wg]

        def values(acc_ref):
          plgpu.wgmma(acc_ref, p16, v_smem.at[slot])

          @pl.when(i + 1 < steps)
          def _():
            plgpu.barrier_wait(k_bar.at[lax.rem(i + 1, stages)])
        if interpret:  # nor start an accumulator from registers: the same sum in two steps
          acc = acc + pl.run_scoped(lambda acc_ref: (values(acc_ref), acc_ref[...])[1],
                                    plgpu.ACC((BLOCK_Q, dv), jnp.float32))
        else:
          acc = pl.run_state(values)(plgpu.ACC.init(acc))
        plgpu.barrier_arrive(v_free.at[slot])
        return acc, m_new, l

      def idle_step(i, _):  # a tile the other consumer still needs: free it, keep the turns in step
        slot = lax.rem(i, stages)
        for bar in (k_bar, v_bar) + ((w_bar,) if masked else ()):
          plgpu.barrier_wait(bar.at[slot])
        plgpu.barrier_arrive(k_free.at[slot])
        plgpu.barrier_arrive(v_free.at[slot])
        take_turn()
        take_turn()

      carry = (plgpu.layout_cast(jnp.zeros((BLOCK_Q, dv), jnp.float32), plgpu.Layout.WGMMA),
               plgpu.layout_cast(jnp.full((BLOCK_Q,), NO_SCORE, jnp.float32), plgpu.Layout.WGMMA.reduce(1)),
               plgpu.layout_cast(jnp.zeros((BLOCK_Q,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)))
      carry = lax.fori_loop(0, unmasked_steps, lambda i, c: step(i, c, diagonal=False), carry)
      acc, _, l = lax.fori_loop(unmasked_steps, steps, lambda i, c: step(i, c, diagonal=causal), carry)
      lax.fori_loop(steps, cta_steps, idle_step, None)
      pl.when(wg == 0)(take_turn)

      norm = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)  # a query that saw no key: zeros
      o_smem.at[wg][...] = (acc * lax.broadcast_in_dim(norm, acc.shape, [0])).astype(jnp.bfloat16)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(o_smem.at[wg], o_gmem.at[batch, pl.ds(first, BLOCK_Q), head])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == CONSUMERS)
    def _producer():
      plgpu.set_max_registers(config.registers[1], action="decrease")

      def load(i, slot):
        keys = pl.ds(i * bk, bk)
        plgpu.copy_gmem_to_smem(k_gmem.at[batch, keys, head], k_smem.at[slot], k_bar.at[slot])
        if masked:
          plgpu.copy_gmem_to_smem(w_gmem.at[batch, pl.ds(qb * CONSUMERS, CONSUMERS), pl.ds(i * n_words, n_words)],
                                  w_smem.at[slot], w_bar.at[slot])
        plgpu.copy_gmem_to_smem(v_gmem.at[batch, keys, head], v_smem.at[slot], v_bar.at[slot])

      for i in range(min(stages, n_kv)):
        pl.when(i < cta_steps)(lambda i=i: load(i, i))

      @pl.loop(stages, cta_steps)
      def _(i):
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])
        load(i, slot)

      @pl.loop(jnp.maximum(cta_steps - stages, 0), cta_steps)
      def _(i):  # the last tiles' releases: no barrier is left with a phase nobody saw
        slot = lax.rem(i, stages)
        plgpu.barrier_wait(k_free.at[slot])
        plgpu.barrier_wait(v_free.at[slot])

  def entry(*refs):
    if not masked:
      refs = (*refs[:3], None, *refs[3:])
    scratch = dict(
        qo_smem=plgpu.RefUnion(_tiled((CONSUMERS, BLOCK_Q, dk)), _tiled((CONSUMERS, BLOCK_Q, dv))),
        k_smem=_tiled((stages, bk, dk)), v_smem=_tiled((stages, bk, dv)),
        q_bar=plgpu.Barrier(num_arrivals=CONSUMERS),  # one copy a consumer's queries
        k_bar=plgpu.Barrier(num_barriers=stages), v_bar=plgpu.Barrier(num_barriers=stages),
        k_free=plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),  # the words' slot too
        v_free=plgpu.Barrier(num_arrivals=CONSUMERS, num_barriers=stages),
        turn=plgpu.Barrier(num_arrivals=CONSUMERS))
    if masked:
      scratch.update(w_smem=plgpu.SMEM((stages, CONSUMERS, n_words, BLOCK_Q), jnp.int32),
                     w_bar=plgpu.Barrier(num_barriers=stages))
    if interpret:
      scratch.update(p_smem=_tiled((CONSUMERS, BLOCK_Q, bk)))
    pl.run_scoped(lambda **scratch_refs: kernel(*refs, **scratch_refs), **scratch, collective_axes="wg")

  pad = lambda a, n, to: jnp.pad(a, ((0, 0), (0, to - n), (0, 0), (0, 0)))  # noqa: E731
  operands = [pad(q, s, s_pad), pad(k, t, t_pad), pad(v, t, t_pad)] + ([words] if masked else [])
  o = plgpu.kernel(
      entry,
      out_type=jax.ShapeDtypeStruct((b, s_pad, h, dv), jnp.bfloat16),
      grid=(h, n_qb, b),
      grid_names=("heads", "q_blocks", "batch"),
      num_threads=CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )(*operands)
  return o[:, :s]
