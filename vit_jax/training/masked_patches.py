"""Masked patch prediction: self-supervised pretraining (arXiv 2010.11929,
section 4.6 and appendix B.1.2), `config.objective='masked_patches'`.

Per image, `corrupt_rate` (50 %) of the patches are corrupted, exactly that
many (rounded), chosen uniformly; each corrupted patch's embedding is
replaced by the learnable [mask] embedding with probability `mask_rate`
(80 %), by the embedding of a random other patch of the same image with
`random_rate` (10 %), or kept (the rest). The paper says "a random other
patch embedding"; we take it from the same image, so an example's
corruption depends on nothing else in the batch. Every corrupted patch is
predicted from its encoder output; uncorrupted patches add nothing to the
loss. Targets (`target`):

  color   the mean colour of each of color_grid x color_grid cells of the
          patch, each channel in 2^bits levels: (2^bits)^3 classes per cell,
          cross-entropy. color_grid=1, bits=3 is the paper's choice (512
          classes); color_grid=4 its "4x4 downsized patch".
  pixels  the patch's pixels in [-1, 1], squared error (the paper's "full
          patch regression").

An example's corruption comes from its own key: the step's key folded with
the example's position in the global batch, so it does not depend on the
number of devices, processes or micro-batches, and a resumed run corrupts
exactly as an uninterrupted one. Labels are not used.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from vit_jax.models import masked

TARGETS = ('color', 'pixels')
# Evaluation corrupts with this key (folded with the position in the batch),
# so every evaluation of a run scores the same corruption.
_EVAL_SEED = 0


@dataclasses.dataclass(frozen=True)
class Corruption:
  """How patches are corrupted (the module docstring)."""
  corrupt_rate: float = 0.5
  mask_rate: float = 0.8
  random_rate: float = 0.1

  def sample(self, key: jax.Array, num_patches: int
             ) -> tuple[jax.Array, jax.Array]:
    """(kind, source), int32 (num_patches,) each, for one image."""
    chosen_key, kind_key, source_key = jax.random.split(key, 3)
    count = int(round(self.corrupt_rate * num_patches))
    rank = jnp.argsort(jax.random.permutation(chosen_key, num_patches))
    corrupted = rank < count
    u = jax.random.uniform(kind_key, (num_patches,))
    kind = jnp.where(u < self.mask_rate, masked.MASK,
                     jnp.where(u < self.mask_rate + self.random_rate,
                               masked.RANDOM, masked.UNCHANGED))
    kind = jnp.where(corrupted, kind, masked.KEEP).astype(jnp.int32)
    # Another patch of the image: an offset in [1, num_patches).
    offset = jax.random.randint(source_key, (num_patches,), 1, num_patches)
    source = (jnp.arange(num_patches) + offset) % num_patches
    return kind, source.astype(jnp.int32)

  def sample_batch(self, key: jax.Array, batch_size: int, num_patches: int
                   ) -> tuple[jax.Array, jax.Array]:
    """(kind, source) (batch, patches): example i from fold_in(key, i)."""
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(
        jnp.arange(batch_size))
    return jax.vmap(lambda k: self.sample(k, num_patches))(keys)


def patches_of(images: jax.Array, stride: tuple[int, int]) -> jax.Array:
  """(batch, H, W, C) -> (batch, patches, stride_h, stride_w, C), row-major
  over the patch grid as the model's tokens."""
  b, h, w, c = images.shape
  sh, sw = stride
  x = images.reshape(b, h // sh, sh, w // sw, sw, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, sh, sw, c)


def color_targets(images: jax.Array, stride: tuple[int, int], bits: int,
                  grid: int) -> jax.Array:
  """Class of each cell's mean colour, int32 (batch, patches, grid * grid):
  each channel of the mean (of pixels in [-1, 1]) in 2^bits equal bins,
  class = (r * 2^bits + g) * 2^bits + b."""
  p = patches_of(images, stride)
  b, n, sh, sw, c = p.shape
  cells = p.reshape(b, n, grid, sh // grid, grid, sw // grid, c)
  mean = (cells.mean(axis=(3, 5)) + 1) / 2  # (b, n, grid, grid, c) in [0, 1]
  levels = 2 ** bits
  bins = jnp.clip(jnp.floor(mean * levels), 0, levels - 1).astype(jnp.int32)
  classes = (bins[..., 0] * levels + bins[..., 1]) * levels + bins[..., 2]
  return classes.reshape(b, n, grid * grid)


class MaskedPatches:
  """The objective the trainer runs for config.objective='masked_patches'."""
  headline = 'masked_patch_loss'

  def __init__(self, encoder: Any, image_size: tuple[int, int],
               cfg: ml_collections.ConfigDict):
    self.corruption = Corruption(cfg.corrupt_rate, cfg.mask_rate,
                                 cfg.random_rate)
    self.target, self.bits, self.grid = cfg.target, cfg.bits, cfg.color_grid
    self.stride = encoder.input_stride
    rows, cols = encoder.token_grid(image_size)
    self.num_patches = rows * cols
    if self.target == 'color':
      outputs = self.grid ** 2 * 2 ** (3 * self.bits)
    else:
      outputs = self.stride[0] * self.stride[1] * 3
    self.model = masked.MaskedPatchModel(encoder, outputs)

  def init(self, rng: jax.Array, images: jax.Array) -> Any:
    kind = jnp.zeros(images.shape[:1] + (self.num_patches,), jnp.int32)
    return self.model.init({'params': rng}, images, kind, kind)['params']

  def prepare(self, batch: dict[str, jax.Array], key: jax.Array
              ) -> dict[str, jax.Array]:
    kind, source = self.corruption.sample_batch(
        key, batch['image'].shape[0], self.num_patches)
    return {'image': batch['image'], 'patch_kind': kind,
            'patch_source': source}

  def per_patch(self, params: Any, batch: dict[str, jax.Array], *,
                train: bool, rng: jax.Array | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """(loss, correct predictions) per patch (batch, patches); `correct` is
    the fraction of the patch's cells right (0 for pixel targets)."""
    out = self.model.apply({'params': params}, batch['image'],
                           batch['patch_kind'], batch['patch_source'],
                           train=train, rngs={'dropout': rng} if train else {})
    images = batch['image']
    if self.target == 'pixels':
      target = patches_of(images, self.stride).reshape(out.shape)
      return jnp.mean((out - target) ** 2, -1), jnp.zeros(out.shape[:2])
    target = color_targets(images, self.stride, self.bits, self.grid)
    logits = out.reshape(*target.shape, -1)
    logp = jax.nn.log_softmax(logits)
    loss = -jnp.take_along_axis(logp, target[..., None], -1)[..., 0]
    correct = jnp.argmax(logits, -1) == target
    return loss.mean(-1), correct.mean(-1)

  def loss(self, params: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> jax.Array:
    loss, _ = self.per_patch(params, batch, train=True, rng=rng)
    corrupted = batch['patch_kind'] != masked.KEEP
    return jnp.sum(jnp.where(corrupted, loss, 0)) / jnp.maximum(
        jnp.sum(corrupted), 1)

  def eval_sums(self, params: Any, batch: dict[str, jax.Array]
                ) -> dict[str, jax.Array]:
    prepared = self.prepare(batch, jax.random.key(_EVAL_SEED))
    loss, correct = self.per_patch(params, prepared, train=False)
    weight = ((prepared['patch_kind'] != masked.KEEP)
              & batch['mask'][:, None])
    return {'loss_sum': jnp.sum(jnp.where(weight, loss, 0)),
            'correct': jnp.sum(jnp.where(weight, correct, 0)),
            'patches': jnp.sum(weight, dtype=jnp.int32),
            'count': jnp.sum(batch['mask'], dtype=jnp.int32)}

  def summarize(self, totals: dict[str, Any], label_names=None
                ) -> dict[str, Any]:
    del label_names  # labels are not used
    patches = max(int(totals['patches']), 1)
    metrics = {'masked_patch_loss': float(totals['loss_sum']) / patches,
               'num_examples': int(totals['count'])}
    if self.target == 'color':
      metrics['masked_patch_accuracy'] = float(totals['correct']) / patches
    return metrics

  def scalars(self, metrics: dict[str, Any]) -> dict[str, Any]:
    return metrics


def check_config(cfg: ml_collections.ConfigDict, stride: tuple[int, int],
                 num_patches: int) -> None:
  """ValueError naming the first config.masked_patches value that cannot work."""
  rates = (cfg.corrupt_rate, cfg.mask_rate, cfg.random_rate)
  if not all(isinstance(r, (int, float)) and 0 <= r <= 1 for r in rates) or (
      cfg.mask_rate + cfg.random_rate > 1) or cfg.corrupt_rate == 0:
    raise ValueError(
        f'config.masked_patches: corrupt_rate={cfg.corrupt_rate} must be in '
        f'(0, 1], mask_rate={cfg.mask_rate} and random_rate='
        f'{cfg.random_rate} in [0, 1] with a sum <= 1.')
  if round(cfg.corrupt_rate * num_patches) < 1 or num_patches < 2:
    raise ValueError(
        f'config.masked_patches.corrupt_rate={cfg.corrupt_rate} of '
        f'{num_patches} patches corrupts none; use a larger image or a '
        'smaller patch (masked patch prediction needs >= 2 patches).')
  if cfg.target not in TARGETS:
    raise ValueError(f'config.masked_patches.target={cfg.target!r} is not '
                     f'supported; allowed: {", ".join(TARGETS)}.')
  if cfg.target == 'color':
    if not (isinstance(cfg.bits, int) and 1 <= cfg.bits <= 8):
      raise ValueError(f'config.masked_patches.bits={cfg.bits!r} must be an '
                       'integer in [1, 8].')
    grid = cfg.color_grid
    if not (isinstance(grid, int) and grid >= 1
            and not np.any(np.mod(stride, grid))):
      raise ValueError(
          f'config.masked_patches.color_grid={grid!r} must be a positive '
          f'integer dividing the patch ({stride[0]}x{stride[1]} pixels).')
