"""Looking inside a trained ViT: the arrays behind the paper's figures.

Pure numpy functions on attention weights and parameters (arXiv 2010.11929):
  * `attention_rollout`: what the output attends to in the input, across all
    layers (Abnar & Zuidema 2020; the paper's Figure 6).
  * `posemb_similarity`: cosine similarity between position embeddings
    (Figure 7, centre).
  * `embedding_filters_pca`: principal components of the RGB patch-embedding
    filters (Figure 7, left).
  * `mean_attention_distance`: how far, in pixels, each head looks (Figure 7,
    right).
plus `collect_attention`, which runs a model and returns every layer's
softmax attention, and `inspect_model`, all of the above for a model and a
stream of image batches. `python -m vit_jax.inspect` draws them.

Token layout: `num_prefix_tokens` leading tokens without an image position
(1 for the class token of 'token' models, 0 for 'gap'), then the patch grid in
row-major order. Weights are [layers, batch, heads, tokens, tokens] (or a list
of per-layer [batch, heads, tokens, tokens]), rows = queries, summing to 1.
"""
from collections.abc import Iterable, Mapping, Sequence
import functools
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import models

Grid = tuple[int, int]
log = logging.getLogger(__name__)


def num_prefix_tokens(model: models.VisionTransformer) -> int:
  """Tokens before the patches: the class token (if any), the registers."""
  return model.num_prefix_tokens


def token_grid(model: models.VisionTransformer, image_size: Sequence[int]
               ) -> Grid:
  """The (rows, columns) of patch tokens the model makes of `image_size`."""
  model.check_input_shape((1, *image_size, 3))
  return model.token_grid(image_size)


def _stacked(weights_per_layer: Any) -> np.ndarray:
  w = np.asarray(weights_per_layer, np.float64)
  if w.ndim != 5 or w.shape[-1] != w.shape[-2]:
    raise ValueError('Expected attention weights [layers, batch, heads, '
                     f'tokens, tokens] (or a list of [batch, heads, tokens, '
                     f'tokens] per layer), got shape {w.shape}.')
  return w


def _output_rows(matrix: np.ndarray, num_prefix: int) -> np.ndarray:
  """[..., T, T] -> [..., T]: the row of whatever the head reads.

  A token model's head reads the class token, so its row. A gap model's head
  reads the mean of all output tokens, and a mean of rows is the attribution
  of a mean, so we average the rows (each still sums to 1, so does the mean).
  """
  return matrix[..., 0, :] if num_prefix else matrix.mean(axis=-2)


def rollout_matrix(weights_per_layer: Any) -> np.ndarray:
  """Rollout [batch, T, T]: how much each output token draws on each input.

  Heads are averaged and the identity added for the residual connection
  (x + attention(x) passes each token on to itself), rows renormalised, then
  the layers multiplied: R = A_L ... A_1. Rows sum to 1.
  """
  w = _stacked(weights_per_layer).mean(axis=2)  # [L, B, T, T]
  eye = np.eye(w.shape[-1])
  joint = np.broadcast_to(eye, w.shape[1:])
  for layer in w:
    a = layer + eye
    joint = (a / a.sum(axis=-1, keepdims=True)) @ joint
  return joint


def attention_rollout(weights_per_layer: Any, num_prefix_tokens: int
                      ) -> np.ndarray:
  """[batch, T]: the rollout row of the model's output (sums to 1 per image).

  Class token for token models; the mean over all output tokens for gap
  models (see `_output_rows`). `to_grid` turns it into a patch map.
  """
  return _output_rows(rollout_matrix(weights_per_layer), num_prefix_tokens)


def layer_attention(weights_per_layer: Any, num_prefix_tokens: int
                    ) -> np.ndarray:
  """[layers, batch, T]: each layer's raw (heads-averaged) output-token row."""
  w = _stacked(weights_per_layer).mean(axis=2)
  return _output_rows(w, num_prefix_tokens)


def to_grid(rows: np.ndarray, grid: Grid, num_prefix_tokens: int
            ) -> np.ndarray:
  """[..., T] -> [..., rows, columns]: drops the prefix tokens' entries."""
  rows = np.asarray(rows)
  patches = rows[..., num_prefix_tokens:]
  if patches.shape[-1] != grid[0] * grid[1]:
    raise ValueError(f'{patches.shape[-1]} patch tokens (after '
                     f'{num_prefix_tokens} prefix) do not fill a {grid[0]}x'
                     f'{grid[1]} grid.')
  return patches.reshape(*patches.shape[:-1], *grid)


def posemb_similarity(posemb: Any, grid: Grid, num_prefix_tokens: int
                      ) -> np.ndarray:
  """[rows, cols, rows, cols]: cosine similarity of every patch position's
  embedding (first two axes) to every other's (last two), in [-1, 1].

  `posemb` is (1, T, D) or (T, D); prefix slots (class token) are dropped:
  they have no place in the grid.
  """
  pe = np.asarray(posemb, np.float64)
  pe = pe.reshape(-1, pe.shape[-1])[num_prefix_tokens:]
  if len(pe) != grid[0] * grid[1]:
    raise ValueError(f'The position embedding has {len(pe)} patch slots '
                     f'(after {num_prefix_tokens} prefix), not the '
                     f'{grid[0]}x{grid[1]}={grid[0] * grid[1]} of the grid.')
  unit = pe / np.maximum(np.linalg.norm(pe, axis=-1, keepdims=True), 1e-12)
  sim = unit @ unit.T
  sim = (sim + sim.T) / 2  # exact symmetry despite BLAS summation order
  return sim.reshape(*grid, *grid)


def embedding_filters_pca(kernel: Any, n: int = 28
                          ) -> tuple[np.ndarray, np.ndarray]:
  """The top `n` principal components of the RGB patch-embedding filters.

  `kernel` is the embedding conv's (p, q, 3, D): D filters of p*q*3 pixels,
  centred, then PCA as in the paper's Figure 7 (left). Returns components
  (n, p, q, 3), unit norm, sign chosen so each one's largest-magnitude entry
  is positive (PCA signs are arbitrary; this keeps pictures reproducible),
  and the fraction of the filters' variance each explains.
  """
  k = np.asarray(kernel, np.float64)
  if k.ndim != 4 or k.shape[2] != 3:
    raise ValueError(
        f'RGB embedding filters need a (p, p, 3, D) patch-embedding kernel; '
        f'got shape {k.shape}. Hybrid models embed ResNet features '
        f'({k.shape[2] if k.ndim == 4 else "?"} channels), not pixels, so '
        'they have no RGB filters to show.')
  if n < 1:
    raise ValueError(f'n={n} components; need at least 1.')
  p, q, c, d = k.shape
  x = k.reshape(p * q * c, d).T
  x = x - x.mean(axis=0)
  _, s, vt = np.linalg.svd(x, full_matrices=False)
  n = min(n, len(s))
  comps = vt[:n]
  signs = np.sign(comps[np.arange(n), np.abs(comps).argmax(axis=1)])
  comps = comps * signs[:, None]
  variance = s**2 / max(float(np.sum(s**2)), 1e-30)
  return comps.reshape(n, p, q, c), variance[:n]


def patch_distances(grid: Grid, patch_size_px: int | Sequence[int]
                    ) -> np.ndarray:
  """[N, N] Euclidean distances in pixels between patch centres (row-major)."""
  ph, pw = ((patch_size_px,) * 2 if np.isscalar(patch_size_px)
            else tuple(patch_size_px))
  rows, cols = np.meshgrid(np.arange(grid[0]) * ph, np.arange(grid[1]) * pw,
                           indexing='ij')
  yx = np.stack([rows.ravel(), cols.ravel()], axis=-1).astype(np.float64)
  return np.linalg.norm(yx[:, None] - yx[None], axis=-1)


def mean_attention_distance(weights_per_layer: Any, grid: Grid,
                            patch_size_px: int | Sequence[int],
                            num_prefix_tokens: int) -> np.ndarray:
  """[layers, heads]: mean distance in pixels between a query patch and the
  patches it attends to, weighted by attention, averaged over query patches
  and images (the paper's Figure 7, right; its "receptive field size").

  `patch_size_px` is the pixels per token (for hybrids: the patch size times
  the ResNet stem's stride). The class token has no place in the image: as a
  query it is skipped, as a key its share is dropped and the rest
  renormalised, so an attention that only looks at itself gives 0 and a
  uniform one the grid's mean pairwise distance.
  """
  w = _stacked(weights_per_layer)
  w = w[..., num_prefix_tokens:, num_prefix_tokens:]
  dist = patch_distances(grid, patch_size_px)
  if w.shape[-1] != len(dist):
    raise ValueError(f'{w.shape[-1]} patch tokens (after {num_prefix_tokens} '
                     f'prefix) do not fill a {grid[0]}x{grid[1]} grid.')
  w = w / np.maximum(w.sum(axis=-1, keepdims=True), 1e-30)
  per_query = np.einsum('lbhqk,qk->lbhq', w, dist)
  return per_query.mean(axis=(1, 3))


def _attention_from_state(intermediates: Mapping[str, Any]) -> jax.Array:
  encoder = intermediates['Transformer']
  if 'encoderblock' in encoder:  # scanned: one sow, leading layer axis
    return encoder['encoderblock']['MultiHeadDotProductAttention_0'][
        'attention_weights'][0]
  names = sorted((k for k in encoder if k.startswith('encoderblock_')),
                 key=lambda k: int(k.rsplit('_', 1)[1]))
  return jnp.stack([encoder[k]['MultiHeadDotProductAttention_0'][
      'attention_weights'][0] for k in names])


@functools.partial(jax.jit, static_argnums=0)
def _forward(model: models.VisionTransformer, params: Any, images: jax.Array):
  logits, state = model.apply({'params': params}, images, train=False,
                              mutable=['intermediates'])
  return logits, _attention_from_state(state['intermediates'])


def collect_attention(model: models.VisionTransformer, params: Any,
                      images: Any) -> tuple[np.ndarray, np.ndarray]:
  """Runs `model` on `images` (NHWC in [-1, 1]) in one batch.

  Returns (weights [layers, batch, heads, T, T] float32, logits), whether the
  blocks are unrolled (`encoderblock_{i}`) or scanned (`encoderblock`).
  """
  # cuDNN's fused kernel never materialises the weights; XLA attention sows
  # them. Rematerialisation is a training-time memory trade, useless here.
  model = model.clone(attention_impl='xla', remat_policy='none')
  logits, weights = _forward(model, params, jnp.asarray(images))
  return (np.asarray(weights, np.float32), np.asarray(logits, np.float32))


def inspect_model(model: models.VisionTransformer, params: Any,
                  image_size: Sequence[int],
                  batches: Iterable[tuple[np.ndarray, int]] = (),
                  num_filters: int = 28) -> dict[str, np.ndarray]:
  """Every array of the figures for `model` at `image_size`.

  `batches` yields (images [batch, H, W, 3] in [-1, 1], number of real
  images at the front: padding rows after them are ignored). Attention is
  reduced batch by batch, so any number of images fits in memory. Keys:
  grid, image_size, pixels_per_token, posemb_similarity [gh, gw, gh, gw],
  embedding_filters [n, p, p, 3] and filter_variance [n] (absent for hybrids),
  and with images: rollout [N, gh, gw], per_layer [L, N, gh, gw], logits,
  attention_distance [L, heads] in pixels.
  """
  prefix, grid = num_prefix_tokens(model), token_grid(model, image_size)
  out = {'grid': np.array(grid), 'image_size': np.array(image_size),
         'pixels_per_token': np.array(model.input_stride)}
  out['posemb_similarity'] = posemb_similarity(
      params['Transformer']['posembed_input']['pos_embedding'], grid,
      model.posemb_prefix_tokens)
  try:
    out['embedding_filters'], out['filter_variance'] = embedding_filters_pca(
        params['embedding']['kernel'], num_filters)
  except ValueError as e:
    log.warning('Skipping the embedding filters: %s', e)
  rollout, layers, logits, distance, count = [], [], [], 0.0, 0
  for images, n in batches:
    w, lg = collect_attention(model, params, images)
    w, lg = w[:, :n], lg[:n]
    rollout.append(to_grid(attention_rollout(w, prefix), grid, prefix))
    layers.append(to_grid(layer_attention(w, prefix), grid, prefix))
    logits.append(lg)
    distance = distance + n * mean_attention_distance(
        w, grid, model.input_stride, prefix)
    count += n
  if not count:
    log.warning('No images: no attention maps or distances.')
    return out
  out.update(rollout=np.concatenate(rollout), logits=np.concatenate(logits),
             per_layer=np.concatenate(layers, axis=1),
             attention_distance=distance / count)
  return out
