"""Resizing learned position embeddings to a new patch grid.

A ViT position embedding is (1, prefix + gh * gw, D): `prefix` class-token
slots followed by the patch grid in row-major order. Fine-tuning at another
resolution (or patch size) changes the grid; only the grid part is resampled.

Two methods:
  * 'bilinear' (default): linear interpolation with aligned corners, exactly
    what Google's vision_transformer does with
    `scipy.ndimage.zoom(grid, (gh_new / gh, gw_new / gw, 1), order=1)`, so
    their fine-tuning results reproduce.
  * 'bicubic': Keys cubic (a = -0.5), half-pixel centres, antialiased when
    shrinking, borders renormalised - what timm's `resample_abs_pos_embed`
    gets from `F.interpolate(..., mode='bicubic', antialias=True)`.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bilinear', 'bicubic')


def infer_grid(num_tokens: int, what: str = 'position embedding'
               ) -> tuple[int, int]:
  """The square grid holding `num_tokens` patches; ValueError if none does."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(
        f'The {what} has {num_tokens} patch tokens, which is not a square '
        'grid; pass the grid explicitly as (height, width) in patches.')
  return side, side


def _aligned_corners_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) linear-interpolation weights, output ends on input ends.

  Output sample o reads input position o * (n_in - 1) / (n_out - 1), the
  mapping of `scipy.ndimage.zoom(..., grid_mode=False)`; a single output
  sample reads input 0, as scipy does.
  """
  scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
  pos = np.arange(n_out) * scale
  lo = np.clip(np.floor(pos).astype(int), 0, max(n_in - 2, 0))
  frac = pos - lo
  weights = np.zeros((n_out, n_in))
  weights[np.arange(n_out), lo] += 1.0 - frac
  if n_in > 1:
    weights[np.arange(n_out), lo + 1] += frac
  return weights


def _resize_bilinear(grid: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  # float64 like scipy, so results agree to float32 rounding.
  rows = _aligned_corners_matrix(grid.shape[0], new_grid[0])
  cols = _aligned_corners_matrix(grid.shape[1], new_grid[1])
  return np.einsum('Hh,Ww,hwd->HWd', rows, cols, grid.astype(np.float64))


def _resize_bicubic(grid: np.ndarray, new_grid: tuple[int, int]) -> np.ndarray:
  # jax.image.resize's 'bicubic' is the Keys a=-0.5 kernel with half-pixel
  # centres; with antialias=True the kernel widens when shrinking and weights
  # are renormalised over in-range taps: the algorithm of PIL and of
  # PyTorch's antialiased interpolate (which timm uses).
  out = jax.image.resize(jnp.asarray(grid, jnp.float32),
                         (*new_grid, grid.shape[-1]), method='bicubic',
                         antialias=True)
  return np.asarray(out)


def interpolate_posemb(posemb, new_grid: tuple[int, int], *,
                       num_prefix_tokens: int,
                       old_grid: tuple[int, int] | None = None,
                       method: str = 'bilinear') -> np.ndarray:
  """Resizes the patch-grid part of `posemb` (1, prefix + gh*gw, D).

  Args:
    posemb: the position embedding (numpy or jax array).
    new_grid: target (height, width) in patches.
    num_prefix_tokens: leading non-grid slots (1 for a class token, else 0);
      they are kept unchanged.
    old_grid: the current (height, width); None infers a square grid.
    method: 'bilinear' (aligned corners, scipy zoom order=1) or 'bicubic'
      (antialiased, as timm).

  Returns:
    A numpy array (1, prefix + new_h * new_w, D) in the input's dtype; the
    input itself (as numpy) when the grid is unchanged.
  """
  if method not in METHODS:
    raise ValueError(f'Unknown position-embedding interpolation {method!r}; '
                     f'use one of {METHODS}.')
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'Expected a position embedding of shape (1, tokens, D), '
                     f'got {posemb.shape}.')
  prefix, grid = posemb[:, :num_prefix_tokens], posemb[0, num_prefix_tokens:]
  old_grid = tuple(old_grid) if old_grid else infer_grid(len(grid))
  new_grid = tuple(int(n) for n in new_grid)
  if old_grid[0] * old_grid[1] != len(grid):
    raise ValueError(
        f'old_grid={old_grid} needs {old_grid[0] * old_grid[1]} patch tokens '
        f'but the position embedding {posemb.shape} has {len(grid)} after '
        f'{num_prefix_tokens} prefix token(s).')
  if min(new_grid) < 1:
    raise ValueError(f'new_grid={new_grid} must be positive.')
  if new_grid == old_grid:
    return posemb
  grid = grid.reshape(*old_grid, -1)
  resize = _resize_bilinear if method == 'bilinear' else _resize_bicubic
  grid = resize(grid, new_grid).reshape(1, new_grid[0] * new_grid[1], -1)
  return np.concatenate([prefix, grid.astype(posemb.dtype)], axis=1)
