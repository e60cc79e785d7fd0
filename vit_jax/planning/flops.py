"""Matmul and convolution FLOPs of a traced program, loops included.

XLA's cost analysis counts the body of a while loop once, however often it
runs, so a program with scanned layers or gradient accumulation reports a
fraction of its FLOPs. Counting the program's jaxpr knows every `scan`'s
length: `matmul_flops(jaxpr)` is the global count (dot_general,
convolutions and cuDNN fused attention, 2 FLOPs per multiply-add,
rematerialised recomputation included), and `loop_factor` the ratio by
which a once-per-loop count falls short. cuDNN attention counts as the two
products it fuses forward (q k^T and the weighted values) and four backward,
as XLA attention's matmuls count, at the token lengths it is given (padded
ones included: that work is done).
"""
import math
from typing import Any

import jax

_CALL_PARAMS = ('jaxpr', 'call_jaxpr', 'fun_jaxpr', 'branches')


def _dot_flops(eqn) -> int:
  # Every output element is a sum over the contracted dimensions.
  lhs = eqn.invars[0].aval.shape
  (lhs_contract, _), _ = eqn.params['dimension_numbers']
  contracted = math.prod(lhs[i] for i in lhs_contract)
  return 2 * math.prod(eqn.outvars[0].aval.shape) * contracted


def _conv_flops(eqn) -> int:
  kernel = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  spec = eqn.params['dimension_numbers']
  rhs_spec = spec.rhs_spec  # (out features, in features, *spatial)
  in_features = kernel[rhs_spec[1]]
  spatial = math.prod(kernel[i] for i in rhs_spec[2:])
  return 2 * math.prod(out) * in_features * spatial


# cuDNN fused attention (jax.nn.dot_product_attention(implementation='cudnn'))
# traced: its products, in multiples of one q k^T.
_ATTENTION_PRODUCTS = {'dot_product_attention_fwd_wrapper': 2,
                       'dot_product_attention_bwd_wrapper': 4}


def _attention_flops(eqn) -> int:
  query, key = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
  if 'BNTH' in str(eqn.params.get('layout')):
    batch, heads, q_len, dim = query
    kv_len = key[2]
  else:  # BTNH
    batch, q_len, heads, dim = query
    kv_len = key[1]
  return (_ATTENTION_PRODUCTS[eqn.primitive.name]
          * 2 * batch * heads * q_len * kv_len * dim)


def _sub_jaxprs(eqn) -> list[Any]:
  found = []
  for key in _CALL_PARAMS:
    value = eqn.params.get(key)
    for item in (value if isinstance(value, (tuple, list)) else [value]):
      if item is None:
        continue
      found.append(getattr(item, 'jaxpr', item))
  return found


def matmul_flops(jaxpr, count_loops: bool = True) -> int:
  """Global matmul + convolution FLOPs of a (closed) jaxpr.

  With `count_loops=False` every loop body counts once, as XLA counts.
  """
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == 'dot_general':
      total += _dot_flops(eqn)
    elif name == 'conv_general_dilated':
      total += _conv_flops(eqn)
    elif name in _ATTENTION_PRODUCTS:
      total += _attention_flops(eqn)
    subs = _sub_jaxprs(eqn)
    if not subs:
      continue
    inner = [matmul_flops(s, count_loops) for s in subs]
    if name == 'cond':
      total += max(inner)  # one branch runs
    elif name == 'scan' and count_loops:
      total += eqn.params['length'] * sum(inner)
    else:
      total += sum(inner)
  return total


def loop_factor(fn, *args) -> tuple[int, float]:
  """(global matmul FLOPs of fn(*args), their ratio to a once-per-loop count)."""
  jaxpr = jax.make_jaxpr(fn)(*args)
  full = matmul_flops(jaxpr)
  once = matmul_flops(jaxpr, count_loops=False)
  return full, full / max(once, 1)
