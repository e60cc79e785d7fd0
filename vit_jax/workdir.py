"""A trained model back from a training workdir's checkpoints.

Export, prediction, inspection and fine-tuning all start from "the model in
this workdir": its architecture comes from the checkpoint's meta (config,
model name, number of classes, resolution, label names), its parameters from
the arrays, restored onto one device without reading any dataset.
Fine-tuning also starts from .npz files: `pretrained_params` adapts either
to a new model (head, position-embedding grid) and records what changed.
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
from vit_jax import posemb
from vit_jax import state_checkpoint
from vit_jax import train_state
from vit_jax import train_utils

# How a pretrained position embedding meets a new grid.
POSEMB_METHODS = ('bilinear', 'bicubic', 'reinit')


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


def pretrained_params(path: str | os.PathLike, fresh: dict[str, Any],
                      model: models.VisionTransformer,
                      image_size: tuple[int, int], posemb_method: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The weights at `path` adapted to `model` at `image_size`; what changed.

  `fresh` (the model's own initial params) gives the new head and, with
  posemb_method='reinit' (the ablation: learn positions from scratch), the
  position embedding. The record, which the trainer writes to the workdir as
  adaptation.json, says which head, grid and pre-logits were adapted.
  """
  source = load_pretrained_source(path)
  new_grid = model.token_grid(image_size)
  params = checkpoint.load_pretrained(
      source.params, fresh, model, new_grid=new_grid, old_grid=source.grid,
      posemb_method='bilinear' if posemb_method == 'reinit' else posemb_method)
  record = _adaptation_record(source, params, new_grid)
  if posemb_method == 'reinit':
    params['Transformer']['posembed_input'] = fresh['Transformer'][
        'posembed_input']
  record.update(path=path, posemb_method=posemb_method)
  return params, record


def _adaptation_record(source: PretrainedSource, params: dict[str, Any],
                       new_grid: tuple[int, int]) -> dict[str, Any]:
  """What fine-tuning changed between the source weights and the model."""
  old_posemb = source.params['Transformer']['posembed_input']['pos_embedding']
  new_posemb = params['Transformer']['posembed_input']['pos_embedding']
  prefix = new_posemb.shape[1] - new_grid[0] * new_grid[1]
  old_grid = source.grid or posemb.infer_grid(old_posemb.shape[1] - prefix)
  head = lambda p: p['head']['kernel'].shape[-1] if 'head' in p else 0
  return {
      'source_kind': source.kind,
      'head': {'classes': [head(source.params), head(params)],
               're_initialised': True},
      'position_embedding_grid': [list(old_grid), list(new_grid)],
      'position_embedding_resized': tuple(old_grid) != tuple(new_grid),
      'pre_logits': ['pre_logits' in source.params, 'pre_logits' in params],
  }
