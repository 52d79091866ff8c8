"""Session 23: what the latent absorb / expand cost at the 671B shapes, per 2048-query block, and whether
the [S, H, c] layout the sparse MLA kernel takes forces transposes around XLA's batched GEMMs."""
import re
import sys

import jax
import jax.numpy as jnp

from benchmarks.timing import chained_seconds

S, H, N, C = int(sys.argv[1]) if len(sys.argv) > 1 else 2048, 128, 128, 512
k = jax.random.split(jax.random.key(0), 4)
q_nope = jax.random.normal(k[0], (1, S, H, N), jnp.bfloat16)
w_k = (jax.random.normal(k[1], (H, N, C), jnp.float32) / 12).astype(jnp.bfloat16)
w_v = (jax.random.normal(k[2], (H, N, C), jnp.float32) / 23).astype(jnp.bfloat16)
o_lat = jax.random.normal(k[3], (1, S, H, C), jnp.bfloat16)
o_lat_h = jnp.swapaxes(o_lat, 1, 2)


def mm(eq, a, b):
  return jnp.einsum(eq, a, b, preferred_element_type=jnp.float32).astype(jnp.bfloat16)


cases = {
    "absorb  bshn,hnc->bshc (now)": (lambda q, w: mm("bshn,hnc->bshc", q, w), q_nope, w_k),
    "absorb  bshn,hnc->bhsc": (lambda q, w: mm("bshn,hnc->bhsc", q, w), q_nope, w_k),
    "expand  bshc,hvc->bshv (now)": (lambda o, w: mm("bshc,hvc->bshv", o, w), o_lat, w_v),
    "expand  bhsc,hvc->bshv": (lambda o, w: mm("bhsc,hvc->bshv", o, w), o_lat_h, w_v),
    "expand  bhsc,hvc->bhsv": (lambda o, w: mm("bhsc,hvc->bhsv", o, w), o_lat_h, w_v),
    "copy of one [S,H,512] bf16 (transpose to [H,S,512])": (lambda o: jnp.swapaxes(o, 1, 2) + 0, o_lat),
}
flops = 2 * S * H * N * C
for name, (fn, *args) in cases.items():
  sec = chained_seconds(fn, *args)
  hlo = jax.jit(fn).lower(*args).compile().as_text()
  ops = sorted(set(re.findall(r"custom_call_target=\"([^\"]+)\"", hlo)))
  kinds = sorted(set(re.findall(r"\b(transpose|copy)\(", hlo)))
  fusions = len(re.findall(r"^\s*\S+ = \S+ fusion\(", hlo, re.M))
  print(f"{name:54s} {sec*1e3:8.3f} ms  {flops/sec/1e12 if 'copy' not in name else 0:6.0f} TF/s  "
        f"calls {ops} ops {kinds} fusions {fusions}", flush=True)
