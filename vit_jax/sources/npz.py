"""A model from an `.npz`: the arrays give the architecture, a name the rest.

An .npz holds no architecture: `from_npz` takes the model name (ViT-B_16,
...) and reads widths, depth, heads, patch size, class token, pre-logits and
classes from the array shapes (overrides win over them), the resolution from
the position embedding unless it is given.
"""
import ast
from collections.abc import Mapping, Sequence
import math
import os
import pathlib
from typing import Any

import numpy as np

from vit_jax import checkpoint
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout
from vit_jax.checkpoint import posemb
from vit_jax.models import registry
from vit_jax import models
from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.sources import base

# What every ViT checkpoint has, whatever its size.
_REQUIRED = ('embedding/kernel', layout.POSEMB,
             'Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/'
             'kernel', 'Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel')


def _bit_options(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """A BiT ResNet's units per stage and width factor, from its arrays."""
  units = {}
  for key in flat:
    if key.startswith('block'):
      block, unit = key.split('/')[:2]
      units.setdefault(int(block[len('block'):]), set()).add(unit)
  return {'resnet_layers': tuple(len(units[b]) for b in sorted(units)),
          'resnet_width': flat['conv_root/kernel'].shape[-1] // 64}


def infer_options(flat: Mapping[str, np.ndarray], model_name: str,
                  source: str) -> dict[str, Any]:
  """Architecture fields that the (linen-named, unrolled) arrays' shapes give."""
  bit_file = layout.is_bit(flat)
  if bit_file != (registry.architecture(model_name) == 'bit'):
    raise ValueError(
        f'{source} holds a {"BiT ResNet" if bit_file else "ViT"} but '
        f'{model_name} is {"a ViT" if bit_file else "a BiT ResNet"}: pass '
        f'the --model_name of its architecture, e.g. '
        f'{"BiT-R50x1" if bit_file else "ViT-B_16"}.')
  if bit_file:
    return _bit_options(flat)
  missing = [k for k in _REQUIRED if k not in flat]
  if missing:
    raise ValueError(f'{source} is not a ViT checkpoint: it lacks '
                     f'{", ".join(missing)} (it has {len(flat)} arrays, e.g. '
                     f'{", ".join(sorted(flat)[:3])}).')
  def shape(suffix):
    return next((v.shape for k, v in flat.items() if k.endswith(suffix)), None)
  blocks = {k.split('/')[1] for k in flat
            if k.startswith('Transformer/encoderblock_')}
  options = {'num_layers': len(blocks), 'num_heads': shape('query/kernel')[1],
             'mlp_dim': shape('MlpBlock_0/Dense_0/kernel')[-1],
             'patch_size': tuple(flat['embedding/kernel'].shape[:2]),
             'hidden_size': flat['embedding/kernel'].shape[-1],
             'representation_size': (shape('pre_logits/kernel') or [None])[-1]}
  if 'cls' not in flat and registry.get_model_config(model_name).get(
      'classifier', 'token') == 'token':
    options['classifier'] = 'gap'
  return options


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """['num_heads=3', 'classifier=gap', ...] -> model fields for `from_npz`.

  Values are Python literals (3, (16, 16), None), else bare strings.
  """
  overrides = {}
  for item in items:
    key, eq, value = item.partition('=')
    if not eq:
      raise ValueError(f'{item!r} is not key=value.')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a bare string, e.g. classifier=gap
  return overrides


def from_npz(path: str | os.PathLike, model_name: str, *,
             num_classes: int | None = None,
             image_size: tuple[int, int] | None = None,
             labels: str | os.PathLike | None = None,
             preprocessing: images.Preprocessing = images.Preprocessing(),
             overrides: Mapping[str, Any] | None = None) -> base.Source:
  """An `.npz` (any layout `load_npz` reads) as the named architecture.

  Args:
    path: the .npz, or a directory holding `params.npz`.
    model_name: registry name; it gives what the arrays do not (a hybrid's
      stem, dtypes).
    num_classes: expected classes; ValueError unless the head has as many.
    image_size: the resolution; None: the square grid of the position
      embedding. Another grid than the stored one resizes the position
      embedding (`base.at_image_size`), as fine-tuning at a new resolution.
    labels: label names file (`serving.read_labels`).
    preprocessing: the eval preprocessing (default: this library's).
    overrides: model fields that win over those the arrays give (not over
      INFERENCE_OPTIONS).
  """
  if pathlib.Path(path).is_dir():
    path = pathlib.Path(path) / 'params.npz'
  params = base.inference_params(checkpoint.load_npz(path))
  flat = arrays.flatten(params)
  options = infer_options(flat, model_name, os.fspath(path))
  found = flat['head/kernel'].shape[-1] if 'head/kernel' in flat else 0
  if num_classes is not None and num_classes != found:
    raise ValueError(f'--num_classes={num_classes} but the head of {path} '
                     f'has {found} classes.')
  model = models.create_model(model_name, found, **{
      **options, **(overrides or {}), **base.inference_options(model_name)})
  if image_size is not None:
    model.check_input_shape((1, *image_size, 3))
  tokens = (flat[layout.POSEMB].shape[1] - layout.posemb_prefix_slots(flat)
            if layout.POSEMB in flat else None)
  if tokens is None:  # a ResNet: any size; BiT's upstream 224
    stored = tuple(image_size or (224, 224))
  elif image_size is not None and math.prod(
      model.token_grid(image_size)) == tokens:
    stored = tuple(image_size)  # e.g. a non-square size of the same count
  else:
    grid = posemb.infer_grid(tokens, f'position embedding of {path}')
    stored = (grid[0] * model.input_stride[0],
              grid[1] * model.input_stride[1])
  base.check_shapes(model, params, stored, os.fspath(path),
                    f'{model_name} at {stored[0]}x{stored[1]}')
  source = base.Source(
      model=model, model_name=model_name, params=params,
      image_size=tuple(stored),
      label_names=card_lib.read_labels(labels, found) if labels else None,
      preprocessing=preprocessing, step=None,
      origin={'kind': 'npz', 'path': os.path.abspath(path)})
  return base.at_image_size(source, image_size) if image_size else source
