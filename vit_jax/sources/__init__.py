"""A whole model from wherever it lives, the same way for every program.

Imports jax, Flax, numpy and Orbax (to read workdirs), never TensorFlow or
optax.

    source = sources.load('runs/vit')                       # training workdir
    source = sources.load('export_dir')                     # an export
    source = sources.load('ViT-B_16.npz', model_name='ViT-B_16')

Every program's `--model` goes through `load`: a training workdir (newest
readable checkpoint, or `step`), an export folder or card, an `.npz` with
`model_name`, a timm or Hugging Face checkpoint (folder, or `.safetensors`
with timm's architecture as `model_name`), or a Hub id `hf-hub:org/name`
(`pytorch`). `image_size` runs the model at another resolution (position
embedding resized), `labels` replaces its label names.

`base`: the Source and what every loader shares; `workdir`, `npz`, `export`,
`pytorch`: the loaders, and `export.write_export`, the writer.
"""
from collections.abc import Mapping, Sequence
import dataclasses
import os
import pathlib
from typing import Any

from vit_jax.runs import paths
from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.sources.base import at_image_size
from vit_jax.sources.base import check_classifier
from vit_jax.sources.base import classifier
from vit_jax.sources.base import exported_logits_fn
from vit_jax.sources.base import logits_fn
from vit_jax.sources.base import Source
from vit_jax.sources.export import from_export
from vit_jax.sources.export import write_export
from vit_jax.sources.npz import from_npz
from vit_jax.sources import pytorch
from vit_jax.sources.workdir import from_workdir
from vit_jax.sources.workdir import load_workdir

__all__ = ['Source', 'at_image_size', 'check_classifier', 'classifier',
           'exported_logits_fn', 'from_export', 'from_npz', 'from_workdir', 'kind_of', 'load', 'load_workdir',
           'logits_fn', 'write_export']


def kind_of(model: str | os.PathLike) -> str:
  """'export', 'workdir', 'npz', 'timm', 'hf' or 'hub': what `--model=...`
  names; ValueError else (pickles refused with how to convert them)."""
  if str(model).startswith(pytorch.HUB_PREFIX):
    return 'hub'
  path = pathlib.Path(model)
  if not path.exists():
    raise ValueError(f'--model={model}: no such file or directory (a Hub id '
                     f'starts with {pytorch.HUB_PREFIX}).')
  if card_lib.is_export(path):
    return 'export'
  if paths.is_workdir(path):
    return 'workdir'
  if path.suffix == '.npz' or (path / 'params.npz').is_file():
    return 'npz'
  kind = pytorch.format_of(path)
  if kind:
    return kind
  raise ValueError(f'--model={model} is neither a training workdir (with '
                   f'checkpoints/), an export (folder or *'
                   f'{card_lib.CARD_SUFFIX}), an .npz, nor a timm or Hugging '
                   'Face checkpoint (config.json + model.safetensors).')


def load(model: str | os.PathLike, *, model_name: str | None = None,
         step: int | None = None, image_size: Sequence[int] | None = None,
         labels: str | os.PathLike | None = None,
         num_classes: int | None = None, resize: str | None = None,
         overrides: Mapping[str, Any] | None = None) -> Source:
  """The model that `--model=<model>` names (module docstring).

  Options that the kind of model does not take (`step` for anything but a
  workdir; `model_name`, `num_classes`, `resize`, `overrides` for anything
  but an .npz) are a ValueError naming them, not silently ignored.
  """
  kind = kind_of(model)
  given = {'--step': step, '--model_name': model_name,
           '--num_classes': num_classes, '--eval_resize': resize,
           '--model_overrides': overrides or None}
  takes = {'workdir': ('--step',), 'export': (), 'hf': (), 'hub': (),
           'timm': ('--model_name',),
           'npz': ('--model_name', '--num_classes', '--eval_resize',
                   '--model_overrides')}[kind]
  ignored = [flag for flag, value in given.items()
             if value is not None and flag not in takes]
  if ignored:
    what = {'workdir': 'a training workdir', 'export': 'an export',
            'npz': 'an .npz', 'timm': 'a timm checkpoint',
            'hf': 'a Hugging Face checkpoint', 'hub': 'a Hub id'}[kind]
    raise ValueError(f'{", ".join(ignored)} '
                     f'{"does" if len(ignored) == 1 else "do"} not apply to '
                     f'--model={model}, {what}; ' + (
                         f'it takes {", ".join(takes)}.' if takes else
                         'it fixes its model and weights.'))
  if kind == 'export':
    source = from_export(model)
  elif kind == 'workdir':
    source = from_workdir(model, step)
  elif kind == 'timm':
    source = pytorch.from_timm(model, model_name)
  elif kind == 'hf':
    source = pytorch.from_hf(model)
  elif kind == 'hub':
    source = pytorch.from_hub(str(model))
  else:
    if not model_name:
      raise ValueError(f'--model={model} is an .npz, which holds no '
                       'architecture: add --model_name (e.g. ViT-B_16).')
    source = from_npz(model, model_name, num_classes=num_classes,
                      image_size=image_size,
                      preprocessing=images.Preprocessing(
                          resize=resize or 'resize'),
                      overrides=overrides)
  if image_size:
    source = at_image_size(source, image_size)
  if labels:
    source = dataclasses.replace(source, label_names=card_lib.read_labels(
        labels, source.model.num_classes))
  return source
