"""FlexiViT's PI-resize of the patch embedding, alone and at weight load."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax.checkpoint import patch_resize

TINY = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2)


def test_same_size_is_the_identity_and_upsizing_keeps_every_token():
  rng = np.random.default_rng(0)
  kernel = rng.normal(size=(8, 8, 3, 5)).astype(np.float32)
  assert patch_resize.resize_patch_kernel(kernel, (8, 8)) is kernel
  for new in ((16, 16), (12, 12), (8, 20)):
    resized = patch_resize.resize_patch_kernel(kernel, new)
    assert resized.shape == (*new, 3, 5)
    b = patch_resize.resize_matrix((8, 8), new)
    # B^T w' = w: projecting back with the resize's adjoint returns w, ...
    np.testing.assert_allclose(
        (b.T @ resized.reshape(-1, 15)).reshape(kernel.shape), kernel,
        atol=1e-4)
    # ... so a patch and its resized version give the same token.
    x = rng.normal(size=(8 * 8, 3))
    bx = (b @ x).reshape(*new, 3)
    np.testing.assert_allclose(
        np.einsum('hwc,hwcd->d', bx, resized),
        np.einsum('hwc,hwcd->d', x.reshape(8, 8, 3), kernel), rtol=1e-4,
        atol=1e-4)


def test_downsizing_is_a_least_squares_fit_not_exact():
  kernel = np.random.default_rng(1).normal(size=(8, 8, 3, 5))
  small = patch_resize.resize_patch_kernel(kernel, (4, 4))
  b = patch_resize.resize_matrix((8, 8), (4, 4))
  residual = b.T @ small.reshape(16, -1) - kernel.reshape(64, -1)
  assert np.abs(residual).max() > 0.1  # 64 numbers from 16: information lost


def _init(model, size):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, size, size, 3)))['params']


def test_a_model_loaded_at_another_patch_size_sees_smooth_images_alike():
  """ViT /8 at 32 px vs its weights PI-resized to /16 at 64 px (the image
  upsampled, the same 4x4 token grid). Measure: relative L2 error of the
  logits over a batch of smooth images (low-frequency sinusoids)."""
  small = models.create_model('ViT-Ti_16', 10, patch_size=8, **TINY)
  params = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))
                               )['params']
  params = jax.tree.map(lambda v: v + 0.05 * jax.random.normal(
      jax.random.key(1), v.shape), params)
  large = models.create_model('ViT-Ti_16', 10, patch_size=16, **TINY)
  resized = checkpoint.load_pretrained(params, _init(large, 64), large,
                                       adapt=('patch',))
  assert resized['embedding']['kernel'].shape == (16, 16, 3, 32)
  yy, xx = np.mgrid[0:32, 0:32] / 32
  rng = np.random.default_rng(0)
  x = np.stack([np.stack([np.sin(2 * np.pi * (a * xx + b * yy) + c)
                          for a, b, c in rng.uniform(0, 1.5, (3, 3))], -1)
                for _ in range(8)]).astype(np.float32)
  big = jax.image.resize(x, (8, 64, 64, 3), 'bilinear')
  ours = small.apply({'params': params}, x)
  theirs = large.apply({'params': resized}, big)
  error = float(jnp.linalg.norm(ours - theirs) / jnp.linalg.norm(ours))
  # Measured 0.019 (2026-12-01); on white noise 0.23, where the per-patch
  # resize and the whole-image resize differ at every patch border.
  assert error < 0.05, error


def test_without_the_adaptation_the_kernel_mismatch_is_explained():
  small = models.create_model('ViT-Ti_16', 10, patch_size=8, **TINY)
  params = jax.jit(small.init)(jax.random.key(0), jnp.zeros((1, 32, 32, 3))
                               )['params']
  large = models.create_model('ViT-Ti_16', 10, patch_size=16, **TINY)
  with pytest.raises(ValueError, match=r"(?s)embedding/kernel.*adapt=\(\.\.\., "
                     r"'patch'\)"):
    checkpoint.load_pretrained(params, _init(large, 64), large,
                               adapt=('head',))
