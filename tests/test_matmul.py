"""The model's matrix products (vit_jax.models.matmul): the same function and
gradients as lax.dot_general, float32-accumulated bfloat16 products forward
and backward, and the ViT's outputs and gradients unchanged by them."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import matmul

import test_models

# (spec, lhs shape, rhs shape): the model's dense layers (Dense, q/k/v, out
# over two axes), attention's batched products, contractions on leading axes.
CASES = [
    ('abc,cd->abd', (2, 5, 8), (8, 6)),
    ('abc,cde->abde', (2, 5, 8), (8, 3, 4)),
    ('abcd,cde->abe', (2, 5, 3, 4), (3, 4, 8)),
    ('bhqd,bhkd->bhqk', (2, 3, 5, 4), (2, 3, 7, 4)),
    ('bhqk,bhqd->bhkd', (2, 3, 5, 7), (2, 3, 5, 4)),
    ('abc,da->bcd', (5, 2, 8), (6, 5)),
    ('abc,cad->abd', (4, 2, 8), (8, 4, 6)),
]


def operands(lhs_shape, rhs_shape, dtype=jnp.float32):
  a = jax.random.normal(jax.random.key(0), lhs_shape)
  b = jax.random.normal(jax.random.key(1), rhs_shape)
  return a.astype(dtype), b.astype(dtype)


def value_and_grads(product, a, b):
  """The product and both operands' gradients under a fixed random output
  gradient, of bfloat16 values whatever the product's dtype (so that a
  float32 reference sees the same one)."""
  out, vjp = jax.vjp(product, a, b)
  cotangent = jax.random.normal(jax.random.key(2), out.shape).astype(
      jnp.bfloat16).astype(out.dtype)
  return (out, *vjp(cotangent))


@pytest.mark.parametrize('spec,lhs_shape,rhs_shape', CASES)
def test_float32_equals_jnp_einsum_with_gradients(spec, lhs_shape,
                                                  rhs_shape):
  a, b = operands(lhs_shape, rhs_shape)
  ours = value_and_grads(lambda x, y: matmul.einsum(spec, x, y), a, b)
  reference = value_and_grads(lambda x, y: jnp.einsum(spec, x, y), a, b)
  for x, y in zip(ours, reference):
    assert x.shape == y.shape and x.dtype == y.dtype == jnp.float32
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('spec,lhs_shape,rhs_shape', CASES)
def test_bfloat16_within_one_rounding_of_the_exact_product(spec, lhs_shape,
                                                           rhs_shape):
  a, b = operands(lhs_shape, rhs_shape, jnp.bfloat16)
  ours = value_and_grads(lambda x, y: matmul.einsum(spec, x, y), a, b)
  plain = value_and_grads(lambda x, y: jnp.einsum(spec, x, y), a, b)
  # The exact products of the same bfloat16 numbers (and cotangent).
  exact = value_and_grads(
      lambda x, y: jnp.einsum(spec, x, y, precision='highest'),
      *(np.asarray(x, np.float32) for x in (a, b)))
  for x, p, e in zip(ours, plain, exact):
    assert x.dtype == p.dtype == jnp.bfloat16 and x.shape == e.shape
    e = np.asarray(e, np.float64)
    # Accumulated in float32, rounded once to bfloat16 (8 bits): half an
    # ulp of the result, as today's path.
    scale = np.abs(e) + 1e-2 * np.abs(e).max()
    assert np.max(np.abs(np.asarray(x, np.float64) - e) / scale) <= 2**-8
    np.testing.assert_allclose(np.asarray(x, np.float32),
                               np.asarray(p, np.float32), rtol=2**-7,
                               atol=2**-7 * np.abs(e).max())


@pytest.mark.parametrize('features,axis,shape', [
    (6, -1, (2, 5, 8)), ((3, 4), -1, (2, 5, 8)), (8, (-2, -1), (2, 5, 3, 4))])
def test_dense_is_flax_dense_general_in_float32(features, axis, shape):
  """Same parameter tree, same initial values, same outputs and gradients."""
  ours = matmul.Dense(features, axis=axis, bias_init=nn.initializers.normal())
  flax_dense = nn.DenseGeneral(features, axis=axis,
                               bias_init=nn.initializers.normal())
  x = jax.random.normal(jax.random.key(3), shape)
  params = ours.init(jax.random.key(4), x)
  flax_params = flax_dense.init(jax.random.key(4), x)
  jax.tree.map(np.testing.assert_array_equal, params, flax_params)
  ours_out = value_and_grads(lambda p, y: ours.apply(p, y), params, x)
  flax_out = value_and_grads(lambda p, y: flax_dense.apply(p, y), params, x)
  for a, b in zip(jax.tree.leaves(ours_out), jax.tree.leaves(flax_out)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_dense_adds_the_bias_before_rounding_to_bfloat16():
  # x @ kernel = 1 + 2^-8, halfway between the bfloat16 neighbours 1 and
  # 1 + 2^-7; with the bias 2^-10 the exact sum is nearer 1 + 2^-7. Rounded
  # once (ours) that is the result; rounded after the product (Flax's
  # nn.Dense) the tie goes to 1, and 1 + 2^-10 rounds to 1 again.
  x = jnp.ones((1, 2))
  params = {'params': {'kernel': jnp.array([[0.5], [0.5 + 2**-8]]),
                       'bias': jnp.array([2.0**-10])}}
  out = matmul.Dense(1, dtype=jnp.bfloat16).apply(params, x)
  assert out.dtype == jnp.bfloat16 and float(out[0, 0]) == 1 + 2**-7
  flax_out = nn.Dense(1, dtype=jnp.bfloat16).apply(params, x)
  assert float(flax_out[0, 0]) == 1.0


def test_bfloat16_products_take_bfloat16_operands_forward_and_backward():
  """What makes bfloat16 fast on XLA:CPU: every product JAX emits has
  bfloat16 operands and a float32 result; none is fed by a convert to
  float32, as JAX's own transpose of an accumulating dot would be."""
  model = test_models.tiny_model(dtype=jnp.bfloat16, num_layers=1)
  x = test_models.images()
  params = test_models.init_randomized(model, x)

  def loss(p):
    return jnp.sum(model.apply({'params': p}, x) ** 2)

  text = jax.jit(jax.grad(loss)).lower(params).as_text()
  dots = re.findall(r'stablehlo\.dot_general .*?: \((tensor<[^>]*>), '
                    r'(tensor<[^>]*>)\) -> (tensor<[^>]*>)', text)
  # 6 dense layers + 2 attention products + head, each forward and twice
  # backward; the patch embedding is a convolution.
  assert len(dots) == 3 * 9
  for lhs, rhs, out in dots:
    assert lhs.endswith('xbf16>') and rhs.endswith('xbf16>'), (lhs, rhs)
    assert out.endswith('xf32>'), out


def vit_logits_and_grads(dtype, params=None):
  model = test_models.tiny_model(dtype=dtype)
  x = test_models.images()
  params = params or test_models.init_randomized(model, x)

  def loss(p):
    logits = model.apply({'params': p}, x)
    return jnp.mean(jax.nn.log_softmax(logits)[:, 0]), logits
  grads, logits = jax.grad(loss, has_aux=True)(params)
  return params, [np.asarray(a, np.float32)
                  for a in [logits, *jax.tree.leaves(grads)]]


def relative_errors(values, reference):
  # Floored: some gradients are zero in exact arithmetic (the key bias's:
  # softmax ignores a shift shared by a query's logits), their values noise.
  return [np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-2)
          for a, b in zip(values, reference)]


def test_vit_outputs_and_gradients_match_flax_layers(monkeypatch):
  """float32: Flax's own layers' numbers. bfloat16: at least as close to
  the float32 model as bfloat16 through Flax's layers is."""
  params, ours = vit_logits_and_grads(jnp.float32)
  _, ours_bf16 = vit_logits_and_grads(jnp.bfloat16, params)
  # Flax's layers (the same parameters) and jnp.einsum.
  monkeypatch.setattr(matmul, 'Dense', nn.DenseGeneral)
  monkeypatch.setattr(matmul, 'einsum',
                      lambda spec, a, b, precision=None: jnp.einsum(
                          spec, a, b, precision=precision))
  _, flax_f32 = vit_logits_and_grads(jnp.float32, params)
  _, flax_bf16 = vit_logits_and_grads(jnp.bfloat16, params)
  assert max(relative_errors(ours, flax_f32)) < 1e-4
  ours_error = relative_errors(ours_bf16, flax_f32)
  flax_error = relative_errors(flax_bf16, flax_f32)
  for i, (e_ours, e_flax) in enumerate(zip(ours_error, flax_error)):
    # bfloat16 keeps 8 bits: errors of a few parts in 1000, more in the
    # gradients of deep layers; ours within 1.5x of Flax's (or < 1 %).
    assert e_ours < max(1.5 * e_flax, 0.01), (i, e_ours, e_flax)
  assert np.median(ours_error) <= 1.1 * np.median(flax_error)


@pytest.mark.parametrize('spec', ['ab,bc', 'ab,bc,cd->ad', 'aab,bc->ac',
                                  'ab,bc->acd', 'abe,bc->ac'])
def test_einsum_refuses_what_is_not_a_matrix_product(spec):
  a = jnp.ones((2, 2, 2))
  with pytest.raises(ValueError, match='einsum spec'):
    matmul.einsum(spec, a, a)
