"""Against transformers' DeepseekV32ForCausalLM (fixtures made by tests/golden/make_golden.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from convert.hf_to_params import read_hf_params
from dsv32_jax import cache as cache_lib
from dsv32_jax import model
from dsv32_jax.options import EXACT_F32
from tests.conftest import GOLDEN, rel_err


@pytest.fixture(scope="module", params=["tiny_a", "tiny_b"])
def golden(request):
  d = f"{GOLDEN}/{request.param}"
  cfg, params = read_hf_params(d, progress=False)
  params = jax.tree.map(jnp.asarray, params)
  tokens = np.load(f"{d}/tokens.npy")
  b, s = tokens.shape
  cache = cache_lib.init_cache(cfg, cfg.n_layers, b, s, jnp.float32, indexer_quant=False)
  run = jax.jit(lambda p, t, c: model.forward(p, cfg, EXACT_F32, t, jnp.zeros(b, jnp.int32), c, kv_len=s,
                                              return_topk=True))
  hidden, _, topk = run(params, jnp.asarray(tokens), cache)
  return dict(dir=d, cfg=cfg, logits=np.asarray(model.logits(params, hidden)), topk=np.asarray(topk))


def test_prefill_logits_match_transformers(golden):
  ref = np.load(f"{golden['dir']}/logits.npy")
  assert golden["logits"].shape == ref.shape
  assert rel_err(golden["logits"], ref) < 1e-4


def test_indexer_selects_the_same_keys_as_transformers(golden):
  """Identical top-k sets in every layer and row. transformers pads rows t < k-1 with masked future
  keys; only the first min(t+1, k) of its entries are real selections."""
  cfg, ours = golden["cfg"], golden["topk"]
  hf = np.load(f"{golden['dir']}/topk_indices.npz")
  k = cfg.index_topk
  assert ours.shape[0] == cfg.n_layers and ours.shape[-1] == k
  for layer in range(cfg.n_layers):
    theirs = hf[f"layer_{layer}"]
    b, s, _ = theirs.shape
    for i in range(b):
      for t in range(s):
        mine = ours[layer, i, t]
        assert set(mine[mine >= 0].tolist()) == set(theirs[i, t, :min(t + 1, k)].tolist()), (layer, i, t)
