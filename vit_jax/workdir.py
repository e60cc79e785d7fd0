"""A trained model back from a training workdir's checkpoints.

Export, prediction, inspection and fine-tuning all start from "the model in
this workdir": its architecture comes from the checkpoint's meta (config,
model name, number of classes, resolution, label names), its parameters from
the arrays, restored onto one device without reading any dataset.
"""
import dataclasses
import json
import os
import pathlib
from typing import Any

import jax
import ml_collections

from vit_jax import checkpoint
from vit_jax import models
from vit_jax import optim
from vit_jax import state_checkpoint
from vit_jax import train_state
from vit_jax import train_utils


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  model: models.VisionTransformer
  params: dict[str, Any]  # on the default device
  config: ml_collections.ConfigDict
  step: int
  image_size: tuple[int, int]
  label_names: list[str] | None


def load_workdir(workdir: str | os.PathLike,
                 step: int | None = None) -> TrainedModel:
  """The model of `workdir` at `step` (default: newest complete checkpoint)."""
  directory = pathlib.Path(workdir) / 'checkpoints'
  if not directory.is_dir():
    raise FileNotFoundError(f'{workdir} is not a training workdir: it has no '
                            'checkpoints/ directory.')
  with state_checkpoint.StateCheckpointer(directory) as ckpt:
    step = ckpt.all_steps()[-1] if step is None and ckpt.all_steps() else step
    meta = ckpt.read_meta(step)
    config = ml_collections.ConfigDict(json.loads(meta['config']))
    model = models.create_model(meta['model_name'], meta['num_classes'],
                                **train_utils.model_overrides(config.model))
    image_size = tuple(meta['image_size'])
    tx = optim.create_optimizer(config, meta['total_steps'])
    init = train_state.make_init_fn(model, tx, image_size)
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
        jax.eval_shape(init, jax.random.key(0)))
    state, _ = ckpt.restore(abstract, step=step)
  return TrainedModel(model, state['params'], config, int(state['step']),
                      image_size, meta['label_names'])


@dataclasses.dataclass(frozen=True)
class PretrainedSource:
  """Weights to fine-tune from, with what is known of their patch grid."""
  params: dict[str, Any]
  kind: str  # 'npz' or 'workdir'
  grid: tuple[int, int] | None  # None: infer (square) from the token count


def load_pretrained_source(path: str | os.PathLike) -> PretrainedSource:
  """An .npz (any published layout, or our export) or a training workdir."""
  path = pathlib.Path(path)
  if path.is_dir():
    trained = load_workdir(path)
    return PretrainedSource(jax.device_get(trained.params), 'workdir',
                            trained.model.token_grid(trained.image_size))
  if not path.exists():
    raise FileNotFoundError(f'Pretrained weights {path} do not exist (expected '
                            'an .npz file or a training workdir).')
  return PretrainedSource(checkpoint.load_npz(path), 'npz', None)
