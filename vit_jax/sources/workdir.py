"""A trained model back from a training workdir, read without disturbing it.

The architecture comes from the checkpoint's meta (config, model name,
classes, resolution, label names), the parameters from the arrays, read-only
and as numpy (`runs.reader`): no dataset, no optimizer, no TensorFlow. A
self-supervised run (masked patch prediction) gives its encoder: a model
without a head (num_classes=0, features), its prediction head and mask token
dropped, ready to fine-tune or to evaluate few-shot.
"""
import dataclasses
import json
import os
from typing import Any

import ml_collections

from vit_jax import models
from vit_jax.models import masked
from vit_jax.runs import reader
from vit_jax.serving import images
from vit_jax.sources import base


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  model: models.VisionTransformer  # as trained (scan, remat, dtype)
  params: dict[str, Any]  # numpy, in the model's own layout
  config: ml_collections.ConfigDict
  step: int
  image_size: tuple[int, int]
  label_names: list[str] | None
  path: str  # the checkpoint step's directory


def load_workdir(workdir: str | os.PathLike,
                 step: int | None = None) -> TrainedModel:
  """The model of `workdir` at `step` (default: newest readable checkpoint)."""
  stored = reader.read_run(workdir, step)
  meta = stored.meta
  config = ml_collections.ConfigDict(json.loads(meta['config']))
  model = models.create_model(meta['model_name'], meta['num_classes'],
                           **models.options_from_json(config.model.to_dict()))
  return TrainedModel(model, stored.params, config, stored.step,
                      tuple(meta['image_size']), meta['label_names'],
                      str(stored.path))


def from_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> base.Source:
  """The model of a training workdir (newest readable checkpoint, or `step`)."""
  trained = load_workdir(workdir, step)
  objective = trained.config.get('objective', 'classification')
  model = trained.model.clone(
      **base.inference_options(trained.config.model_name))
  params, label_names = trained.params, trained.label_names
  if objective == 'masked_patches':
    model, label_names = model.clone(num_classes=0), None
    params = {k: v for k, v in params.items()
              if k not in (masked.MASK_TOKEN, masked.HEAD)}
  return base.Source(
      model=model, model_name=trained.config.model_name,
      params=base.inference_params(params),
      image_size=trained.image_size, label_names=label_names,
      preprocessing=images.Preprocessing(
          resize=trained.config.get('eval_resize', 'resize')),
      step=trained.step,
      origin={'kind': 'workdir', 'path': os.path.abspath(workdir),
              'checkpoint': os.path.abspath(trained.path),
              'objective': objective})
