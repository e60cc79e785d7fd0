"""FlexiViT's PI-resize of the patch embedding, alone and at weight load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import patch_resize
from vit_jax.checkpoint import posemb
from vit_jax.training import finetune

TINY = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2)


def _model(patch, name='ViT-Ti_16', num_classes=10, **overrides):
  return models.create_model(name, num_classes, patch_size=patch, **TINY,
                             **overrides)


def _random_params(model, size, seed=0):
  """Random numpy params (shapes from eval_shape: nothing compiles)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, size, size, 3)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype), shapes)


def _token(patch, kernel):
  return np.einsum('hwc,hwcd->d', patch, kernel)


def test_same_size_returns_the_kernel_itself():
  kernel = np.random.default_rng(0).normal(size=(8, 8, 3, 5))
  assert patch_resize.resize_patch_kernel(kernel, (8, 8)) is kernel


@pytest.mark.parametrize('old, new', [((8, 8), (16, 16)), ((4, 4), (6, 6)),
                                      ((8, 8), (8, 20)), ((3, 5), (7, 6))])
def test_growing_keeps_every_token_exactly(old, new):
  """B^T w' = w exactly when growing: B (the patch resize) has full column
  rank. B^T, not a PI-resize back, is what returns the original kernel."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(*old, 3, 5)).astype(np.float32)
  resized = patch_resize.resize_patch_kernel(kernel, new)
  assert resized.shape == (*new, 3, 5) and resized.dtype == np.float32
  b = patch_resize.resize_matrix(old, new)
  np.testing.assert_allclose(
      (b.T @ resized.reshape(-1, 15)).reshape(kernel.shape), kernel,
      atol=1e-5)
  # The same as a patch and its resized version giving the same token.
  for _ in range(3):
    x = rng.normal(size=(*old, 3))
    bx = (b @ x.reshape(-1, 3)).reshape(*new, 3)
    np.testing.assert_allclose(_token(bx, resized), _token(x, kernel),
                               rtol=1e-4, atol=1e-4)
  # B is the image resize the data pipeline would apply.
  x = rng.normal(size=old).astype(np.float32)
  np.testing.assert_allclose(
      (b @ x.reshape(-1)).reshape(new),
      jax.image.resize(x, new, 'bilinear'), atol=1e-5)


def test_no_round_trip_is_the_identity():
  """Up then back down, or down then back up, changes the kernel: resizing
  back solves another least-squares problem, whose operator is no inverse
  of B (measured: max |difference| about 1 for kernels of std 1)."""
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(4, 4, 3, 5))
  up = patch_resize.resize_patch_kernel(kernel, (6, 6))
  assert np.abs(patch_resize.resize_patch_kernel(up, (4, 4)) - kernel
                ).max() > 0.5
  large = rng.normal(size=(16, 16, 3, 5))
  down = patch_resize.resize_patch_kernel(large, (8, 8))
  assert np.abs(patch_resize.resize_patch_kernel(down, (16, 16)) - large
                ).max() > 0.5


def test_shrinking_is_a_least_squares_fit_not_exact():
  kernel = np.random.default_rng(1).normal(size=(8, 8, 3, 5))
  small = patch_resize.resize_patch_kernel(kernel, (4, 4))
  b = patch_resize.resize_matrix((8, 8), (4, 4))
  residual = b.T @ small.reshape(16, -1) - kernel.reshape(64, -1)
  assert np.abs(residual).max() > 0.1  # 64 numbers from 16: information lost
  # Antialiasing (timm's choice, not big_vision's) only matters when shrinking.
  assert not np.allclose(
      small, patch_resize.resize_patch_kernel(kernel, (4, 4), antialias=True))
  np.testing.assert_array_equal(
      patch_resize.resize_patch_kernel(kernel, (12, 12)),
      patch_resize.resize_patch_kernel(kernel, (12, 12), antialias=True))


def test_rejects_other_shapes():
  with pytest.raises(ValueError, match=r'\(ph, pw, C_in, D\)'):
    patch_resize.resize_patch_kernel(np.zeros((8, 8, 3)), (4, 4))
  with pytest.raises(ValueError, match='new_patch'):
    patch_resize.resize_patch_kernel(np.zeros((8, 8, 3, 4)), (0, 4))


@pytest.mark.parametrize('patch, size', [(16, 64), (12, 48)])
def test_a_model_loaded_at_another_patch_size_sees_smooth_images_alike(
    patch, size):
  """ViT /8 at 32 px vs its weights PI-resized to /`patch` at `size` px (the
  image upsampled, the same 4x4 token grid). Measures over 8 smooth images
  (low-frequency sinusoids): relative L2 error of the logits and the lowest
  cosine similarity of an image's logits. Measured 0.019 and 0.9996 for /16,
  0.016 and 0.9997 for /12 (0.027 and 0.9988 for /16 on Gaussian-blurred
  noise); on white noise 0.35 and 0.79: the per-patch resize and the
  whole-image resize differ at every patch border."""
  small = _model(8)
  params = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))
                               )['params']
  # Off the initialisation (a zero head would give equal logits).
  params = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(
      jax.random.key(1), v.shape), params)
  large = _model(patch)
  resized = checkpoint.load_pretrained(params, _random_params(large, size),
                                       large, adapt=('patch',))
  assert resized['embedding']['kernel'].shape == (patch, patch, 3, 32)
  yy, xx = np.mgrid[0:32, 0:32] / 32
  rng = np.random.default_rng(0)
  x = np.stack([np.stack([np.sin(2 * np.pi * (a * xx + b * yy) + c)
                          for a, b, c in rng.uniform(0, 1.5, (3, 3))], -1)
                for _ in range(8)]).astype(np.float32)
  big = jax.image.resize(x, (8, size, size, 3), 'bilinear')
  ours = np.asarray(small.apply({'params': params}, x))
  theirs = np.asarray(large.apply({'params': resized}, big))
  error = np.linalg.norm(ours - theirs) / np.linalg.norm(ours)
  cosine = np.sum(ours * theirs, 1) / (np.linalg.norm(ours, axis=1)
                                       * np.linalg.norm(theirs, axis=1))
  assert error < 0.05, error
  assert cosine.min() > 0.995, cosine


def test_position_embedding_resized_to_the_new_grid_as_before():
  """/8 at 32 px (4x4) into /16 at 128 px (8x8): both embeddings resized."""
  small, large = _model(8), _model(16, num_classes=5)
  source = _random_params(small, 32)
  init = _random_params(large, 128, seed=1)
  loaded = checkpoint.load_pretrained(source, init, large)  # default adapt
  np.testing.assert_array_equal(
      loaded['embedding']['kernel'], patch_resize.resize_patch_kernel(
          source['embedding']['kernel'], (16, 16)))
  np.testing.assert_array_equal(loaded['embedding']['bias'],
                                source['embedding']['bias'])
  old_pe = source['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(
      loaded['Transformer']['posembed_input']['pos_embedding'],
      posemb.interpolate_posemb(old_pe, (8, 8), num_prefix_tokens=1),
      atol=1e-6)
  np.testing.assert_array_equal(loaded['head']['kernel'],
                                init['head']['kernel'])


def test_without_the_adaptation_the_kernel_mismatch_is_explained():
  small, large = _model(8), _model(16)
  with pytest.raises(ValueError, match=r"(?s)embedding/kernel: checkpoint "
                     r"\(8, 8, 3, 32\) vs model \(16, 16, 3, 32\).*"
                     r"adapt=\(\.\.\., 'patch'\)"):
    checkpoint.load_pretrained(_random_params(small, 32),
                               _random_params(large, 64), large,
                               adapt=('head',))


def test_hybrids_are_not_resized():
  hybrid = lambda patch: _model(patch, 'R26+ViT-S_32', resnet_layers=(1, 1))
  with pytest.raises(ValueError) as err:
    checkpoint.load_pretrained(_random_params(hybrid(1), 32),
                               _random_params(hybrid(2), 64), hybrid(2))
  message = str(err.value)
  assert 'embedding/kernel: checkpoint (1, 1, 512, 32) vs model' in message
  assert 'not resized: a hybrid' in message
  assert "'patch')" not in message  # asked for, so no hint to ask for it


def test_fine_tuning_record_from_an_npz(tmp_path):
  """An .npz has no model, so the old grid is inferred from the tokens."""
  path = tmp_path / 'vit8.npz'
  checkpoint.save_npz(path, _random_params(_model(8), 32))
  model = _model(4)
  params, record = finetune.pretrained_params(
      path, _random_params(model, 48, seed=1), model, (48, 48), 'bilinear')
  assert params['embedding']['kernel'].shape == (4, 4, 3, 32)
  assert record['patch_size'] == [[8, 8], [4, 4]]
  assert record['patch_embedding_resized'] is True
  assert record['position_embedding_grid'] == [[4, 4], [12, 12]]
