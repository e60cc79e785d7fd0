"""What a run optimises and what its evaluation measures, by name.

`config.objective`:

  classification  supervised: softmax cross-entropy on the labels (label
                  smoothing), evaluated by top-1/top-5 accuracy.
  masked_patches  self-supervised masked patch prediction (the paper's
                  section 4.6, `masked_patches`); labels are not used.

An objective gives the one trainer (`steps`, `state`, `trainer`) what
differs: `model` (the module whose parameters the state holds), `init`,
`prepare` (a batch's randomness, drawn once per step before it is split into
micro-batches), `loss`, `eval_sums` / `summarize` / `scalars`, and
`headline`, the metric every finished evaluation has.
"""
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections

from vit_jax import models
from vit_jax.evaluation import classification
from vit_jax.training import masked_patches

OBJECTIVES = ('classification', 'masked_patches')


class Objective(Protocol):
  model: Any
  headline: str

  def init(self, rng: jax.Array, images: jax.Array) -> Any: ...
  def prepare(self, batch: dict[str, jax.Array],
              key: jax.Array) -> dict[str, jax.Array]: ...
  def loss(self, params: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> jax.Array: ...
  def eval_sums(self, params: Any,
                batch: dict[str, jax.Array]) -> dict[str, jax.Array]: ...
  def summarize(self, totals: dict[str, Any],
                label_names: list[str] | None = None) -> dict[str, Any]: ...
  def scalars(self, metrics: dict[str, Any]) -> dict[str, Any]: ...


class Classification:
  """Supervised training on (soft) one-hot labels."""
  headline = 'accuracy'

  def __init__(self, model: Any, label_smoothing: float = 0.0):
    self.model = model
    self.label_smoothing = label_smoothing

  def init(self, rng: jax.Array, images: jax.Array) -> Any:
    return self.model.init({'params': rng}, images)['params']

  def prepare(self, batch: dict[str, jax.Array], key: jax.Array
              ) -> dict[str, jax.Array]:
    del key  # no randomness beyond the model's dropout
    return batch

  def loss(self, params: Any, batch: dict[str, jax.Array],
           rng: jax.Array) -> jax.Array:
    logits = self.model.apply({'params': params}, batch['image'], train=True,
                              rngs={'dropout': rng})
    return jnp.mean(classification.cross_entropy(logits, batch['label'],
                                                 self.label_smoothing))

  def eval_sums(self, params: Any, batch: dict[str, jax.Array]
                ) -> dict[str, jax.Array]:
    logits = self.model.apply({'params': params}, batch['image'], train=False)
    return classification.batch_sums(logits, batch['label'], batch['mask'])

  def summarize(self, totals: dict[str, Any],
                label_names: list[str] | None = None) -> dict[str, Any]:
    return classification.summarize(totals, label_names)

  def scalars(self, metrics: dict[str, Any]) -> dict[str, Any]:
    return classification.scalars(metrics)


def create(config: ml_collections.ConfigDict, model: Any,
           image_size: tuple[int, int]) -> Objective:
  """The config's objective for `model` at `image_size`; ValueError on a
  value that cannot work."""
  name = config.get('objective', 'classification')
  if name == 'classification':
    return Classification(model, config.label_smoothing)
  if name != 'masked_patches':
    raise ValueError(f'config.objective={name!r} is not supported; allowed: '
                     f'{", ".join(OBJECTIVES)}.')
  if not isinstance(model, models.VisionTransformer):
    raise ValueError(f'config.objective=masked_patches needs a Vision '
                     f'Transformer (patch tokens), not {config.model_name}.')
  if config.mixup_alpha or config.cutmix_alpha or config.label_smoothing:
    raise ValueError('config.objective=masked_patches uses no labels: set '
                     'mixup_alpha, cutmix_alpha and label_smoothing to 0.')
  rows, cols = model.token_grid(image_size)
  masked_patches.check_config(config.masked_patches, model.input_stride,
                              rows * cols)
  return masked_patches.MaskedPatches(model, image_size, config.masked_patches)
