"""Resizing the patch-embedding kernel to another patch size (FlexiViT).

A checkpoint trained with one patch size can serve another if its embedding
kernel is resized so that a token does not change when the image is resized
with it: FlexiViT's "PI-resize" (Beyer et al. 2022, arXiv 2212.08013, and
big_vision's `resample_patchemb`). With B the linear operator that resizes
an image patch x (ph*pw values per channel) to the new patch size, a token is
<x, w> before and <B x, w'> after; asking <x, w> = <B x, w'> for every x is
B^T w' = w, solved in the least-squares sense by w' = pinv(B^T) w.

What is exact: when growing (new >= old in both dimensions) B has full
column rank, so B^T w' = w holds exactly: tokens of upsampled patches equal
the original tokens, and B^T maps w' back to w. Resizing w' back with this
function does not (in either direction): shrinking solves another
least-squares problem, whose operator is no inverse of B. When shrinking,
B^T w' = w has no exact solution and tokens match only approximately.

Plain ViTs only: a hybrid's embedding is a 1x1 convolution on ResNet
features, not on pixels.
"""
import jax
import jax.numpy as jnp
import numpy as np


def resize_matrix(old: tuple[int, int], new: tuple[int, int],
                  method: str = 'bilinear', antialias: bool = False
                  ) -> np.ndarray:
  """B, (new_h * new_w, old_h * old_w): resizes a row-major flattened patch."""
  n = old[0] * old[1]
  # Resizing the identity's rows (the basis patches) gives B's columns; the
  # leading axis is left alone since its size does not change.
  basis = jnp.eye(n, dtype=jnp.float32).reshape(n, *old)
  columns = jax.image.resize(basis, (n, *new), method=method,
                             antialias=antialias)
  return np.asarray(columns, np.float64).reshape(n, -1).T


def resize_patch_kernel(kernel: np.ndarray, new_patch: tuple[int, int],
                        method: str = 'bilinear', *,
                        antialias: bool = False) -> np.ndarray:
  """The embedding kernel for patches of `new_patch` pixels (PI-resize).

  Args:
    kernel: the patch-embedding kernel (ph, pw, C_in, D), as `embedding/
      kernel` in our params.
    new_patch: the new (height, width) of a patch in pixels.
    method: the image resize the kernel is made invariant to, a
      `jax.image.resize` method; 'bilinear' as FlexiViT.
    antialias: whether that resize antialiases when shrinking. False is
      big_vision's (its `tf.image.resize` does not); timm's
      `resample_patch_embed` antialiases. Growing is the same either way.

  Returns:
    A (new_h, new_w, C_in, D) kernel in `kernel`'s dtype; `kernel` itself
    when the patch size is unchanged.
  """
  kernel = np.asarray(kernel)
  if kernel.ndim != 4:
    raise ValueError(f'Expected a patch-embedding kernel (ph, pw, C_in, D), '
                     f'got shape {kernel.shape}.')
  old = tuple(kernel.shape[:2])
  new = tuple(int(n) for n in new_patch)
  if len(new) != 2 or min(new) < 1:
    raise ValueError(f'new_patch={new_patch!r} must be a positive (height, '
                     'width).')
  if new == old:
    return kernel
  pinv = np.linalg.pinv(resize_matrix(old, new, method, antialias).T)
  # One product for all (C_in, D) channels: each is a separate patch filter.
  flat = kernel.reshape(old[0] * old[1], -1).astype(np.float64)
  return (pinv @ flat).reshape(*new, *kernel.shape[2:]).astype(kernel.dtype)
