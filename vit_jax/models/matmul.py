"""The model's matrix products: float32 accumulation, one rounding, and a
backward pass made of the same kind of product.

Every dense layer (`Dense`, Flax's parameters under our products) and the
attention core (`einsum`) goes through here. Three things differ from Flax's
`nn.Dense` and `jnp.einsum` in bfloat16:

- Products accumulate in float32 (`preferred_element_type`), the bias is
  added to the accumulator, and the sum is rounded to bfloat16 once. On TPU
  and GPU a bfloat16 matmul accumulates in float32 anyway. XLA:CPU's matmul
  library (YNNPACK, its default) has bfloat16 x bfloat16 -> float32 kernels
  at about twice the float32 rate on CPUs with AVX512-BF16, but no
  bfloat16-output one: a plain bfloat16 dot is converted to a float32 dot
  there, slower than the float32 model.
- Gradients come from a custom VJP: two more such products, the incoming
  gradient rounded to bfloat16 first. JAX's own transpose of a
  float32-accumulating dot multiplies a float32 gradient by a bfloat16
  operand, which XLA runs in float32 again.
- The bias's gradient is a float32 sum (XLA:CPU sums bfloat16 over the batch
  as a slow tree of reduce-windows).

In float32 the numbers are those of `nn.Dense`: same parameters, same
initial values, same function. Measured effects: BENCHMARKS.md.
"""
import functools
import math
import string
from typing import Any, Callable

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

Initializer = Callable[..., jax.Array]


def _accumulating_einsum(spec: str, a: jax.Array, b: jax.Array,
                         precision: Any) -> jax.Array:
  # Named by its spec in op names, as jnp.einsum is: profiles tell the
  # attention core's products ('bhq...') from the dense layers'.
  with jax.named_scope(spec):
    return _canonical_product(spec, a, b, precision)


def _canonical_product(spec: str, a: jax.Array, b: jax.Array,
                       precision: Any) -> jax.Array:
  """The product as one matmul [batch,] M x K times [batch,] K x N (or N x
  K) -> float32, in dot_general's own output order where the operands allow.

  XLA:CPU sends these forms to YNNPACK. Left to pick the form itself (from an
  einsum contracting the lhs's leading axes, or by swapping operands to save
  an output transpose), it may choose one that only its fallback matmul,
  Eigen, would run, and Eigen has no bfloat16 -> float32 kernel:
  "Unsupported element type for DotThunk" at run time. So an lhs whose
  contracted axes are not its last ones is transposed, below float32
  behind an optimization barrier (XLA would fold the transpose back in).
  Every other operand is used as it lies: copies cost time.
  """
  inputs, out = spec.split('->')
  spec_a, spec_b = inputs.split(',')

  def split(x, y):
    return ([i for i in x if i in y and i in out],  # batch
            [i for i in x if i not in y],  # free
            [i for i in x if i in y and i not in out])  # contracted

  batch, free_a, contract = split(spec_a, spec_b)
  free_b = split(spec_b, spec_a)[1]
  if batch + free_a + free_b != list(out):
    swapped = split(spec_b, spec_a)
    if swapped[0] + swapped[1] + free_a == list(out):
      # The same product with the operands' roles swapped needs no output
      # transpose (which XLA would fold into the dot by swapping them).
      spec_a, spec_b, a, b = spec_b, spec_a, b, a
      batch, free_a, contract = swapped
      free_b = split(spec_b, spec_a)[1]
  size = {**dict(zip(spec_a, a.shape)), **dict(zip(spec_b, b.shape))}
  extent = lambda indices: math.prod(size[i] for i in indices)

  def laid_out(x, spec_x, order):
    permutation = [spec_x.index(i) for i in order]
    if permutation == sorted(permutation):
      return x
    x = jnp.transpose(x, permutation)
    return x if x.dtype == jnp.float32 else lax.optimization_barrier(x)

  # No batch axis where the product has none: remat's dots_no_batch policy
  # tells dense layers from attention by it.
  lead = (extent(batch),) if batch else ()
  n = len(lead)
  a = jnp.reshape(laid_out(a, spec_a, batch + free_a + contract),
                  lead + (extent(free_a), extent(contract)))
  rhs_nk = [spec_b.index(i) for i in batch + free_b + contract]
  if rhs_nk == sorted(rhs_nk):  # [batch, N, K] as it lies
    b = jnp.reshape(b, lead + (extent(free_b), extent(contract)))
    contracting = ((n + 1,), (n + 1,))
  else:
    b = jnp.reshape(laid_out(b, spec_b, batch + contract + free_b),
                    lead + (extent(contract), extent(free_b)))
    contracting = ((n + 1,), (n,))
  y = lax.dot_general(a, b, (contracting, (tuple(range(n)),) * 2),
                      precision, preferred_element_type=jnp.float32)
  natural = batch + free_a + free_b
  y = jnp.reshape(y, [size[i] for i in natural])
  return jnp.transpose(y, [natural.index(i) for i in out])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 3))
def _product(spec: str, a: jax.Array, b: jax.Array, precision: Any):
  """The float32 accumulator of a product (not yet rounded)."""
  return _accumulating_einsum(spec, a, b, precision)


def _product_fwd(spec, a, b, precision):
  return _accumulating_einsum(spec, a, b, precision), (a, b)


def _product_bwd(spec, precision, residuals, grad):
  # With each index in two or three of (a, b, out) and none repeated within
  # one (true of every dot_general), the gradient of one operand is the
  # einsum of the output's gradient with the other operand. The gradient
  # arrives in float32 and, as the output it belongs to, is rounded to the
  # operands' dtype first: the backward products are bfloat16 ones too.
  a, b = residuals
  inputs, out = spec.split('->')
  spec_a, spec_b = inputs.split(',')
  grad = grad.astype(jnp.result_type(a, b))
  grad_a = _accumulating_einsum(f'{out},{spec_b}->{spec_a}', grad, b,
                                precision)
  grad_b = _accumulating_einsum(f'{spec_a},{out}->{spec_b}', a, grad,
                                precision)
  return grad_a.astype(a.dtype), grad_b.astype(b.dtype)


_product.defvjp(_product_fwd, _product_bwd)


def _check_spec(spec: str) -> None:
  inputs, arrow, out = spec.partition('->')
  terms = [*inputs.split(','), out]
  if not arrow or len(terms) != 3:
    raise ValueError(f'einsum spec {spec!r}: need "a,b->out" with two '
                     'operands and an explicit output')
  repeated = sorted({i for t in terms for i in t if t.count(i) > 1})
  alone = sorted(i for i in set(spec) - set(',->')
                 if sum(i in t for t in terms) < 2)
  if repeated or alone:
    raise ValueError(f'einsum spec {spec!r} is not a matrix product: '
                     f'indices {repeated + alone} are repeated within a term '
                     'or in only one term')


def einsum(spec: str, a: jax.Array, b: jax.Array,
           precision: Any = None) -> jax.Array:
  """`jnp.einsum(spec, a, b)` of a matrix product ('bhqd,bhkd->bhqk'),
  float32-accumulated, output in the operands' dtype."""
  _check_spec(spec)
  return _product(spec, a, b, precision).astype(jnp.result_type(a, b))


class Dense(nn.Module):
  """Flax's `Dense` / `DenseGeneral` (the same `kernel` and `bias`, shapes
  and initialisation) over our products, the bias added to the float32
  accumulator before the one rounding to `dtype`.

  `features` may be a tuple (q/k/v's (heads, head_dim)); `axis` the input
  axes contracted (the output projection's (-2, -1)). Adding the bias in
  float32 also makes its gradient a float32 sum: XLA:CPU sums a bfloat16
  gradient over the batch as a tree of reduce-windows, 8 % of the bfloat16
  ViT-B/16 train step (BENCHMARKS.md).
  """
  features: int | tuple[int, ...]
  axis: int | tuple[int, ...] = -1
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = ((self.features,) if isinstance(self.features, int)
                else tuple(self.features))
    axis = (self.axis,) if isinstance(self.axis, int) else tuple(self.axis)
    axis = tuple(sorted(a % x.ndim for a in axis))
    inputs_shape = tuple(x.shape[a] for a in axis)

    def flat(init):
      # As DenseGeneral: initialised as the 2-D (fan_in, fan_out) matrix
      # (or 1-D bias) and reshaped, so the values equal Flax's.
      def init_reshaped(key, shape, dtype):
        fans = ((math.prod(inputs_shape), math.prod(features))
                if len(shape) > len(features) else (math.prod(features),))
        return jnp.reshape(init(key, fans, dtype), shape)
      return init_reshaped

    kernel = self.param('kernel', flat(self.kernel_init),
                        inputs_shape + features, self.param_dtype)
    bias = self.param('bias', flat(self.bias_init), features,
                      self.param_dtype)
    # A matrix product by construction: x's axes, the contracted ones shared
    # with the kernel, the kernel's feature axes new.
    inputs = string.ascii_letters[:x.ndim]
    contracted = ''.join(inputs[a] for a in axis)
    kept = ''.join(c for c in inputs if c not in contracted)
    out = string.ascii_letters[x.ndim:x.ndim + len(features)]
    spec = f'{inputs},{contracted}{out}->{kept}{out}'
    y = _product(spec, x.astype(self.dtype), kernel.astype(self.dtype), None)
    return (y + bias.astype(jnp.float32)).astype(self.dtype)
