"""Key layouts of published ViT `.npz` files, as flat {'a/b/c': array} dicts.

  1. Google's original / AugReg files: encoder blocks with pre-linen numbering
     (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3 -
     pre-linen flax numbered submodules across types), keys possibly under
     `opt/target/`, hybrid GroupNorm params possibly stored as (1, 1, 1, C).
  2. big_vision files: keys under `params/`, the position embedding at the top
     level (`pos_embedding`) without a class-token slot, encoder blocks
     unrolled (`encoderblock_{i}`) or stacked by scan (`encoderblock`, leading
     layer axis), linen numbering (LayerNorm_0, MultiHeadDotProductAttention_0,
     LayerNorm_1, MlpBlock_0).
  3. Our exports: layout 1 without prefix. A flat dump of our linen tree
     (linen numbering, no prefix) reads as well.
  4. BiT's published ResNet-v2 files (big_transfer's TF names, which timm's
     BiT loader reads): `resnet/root_block/standardized_conv2d/kernel`,
     `resnet/block{b}/unit{uu}/{a,b,c}/{standardized_conv2d/kernel,
     group_norm/{gamma,beta}}`, `.../unit01/a/proj/standardized_conv2d/kernel`,
     `resnet/group_norm/{gamma,beta}`, `resnet/head/conv2d/{kernel,bias}` (a
     1x1 convolution).

`to_linen_layout` turns any of them into our model's naming; `to_original_layout`
writes layout 1 for ViTs and layout 4 for BiT models.
"""
from collections.abc import Mapping
import re
from typing import Any

import numpy as np


POSEMB = 'Transformer/posembed_input/pos_embedding'
STACKED = 'Transformer/encoderblock/'
# Inside an encoder block: linen name -> pre-linen name.
TO_PRE_LINEN = {'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
                'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}
FROM_PRE_LINEN = {v: k for k, v in TO_PRE_LINEN.items()}
_GROUPNORM = re.compile(r'(^|/)gn(\d+|_root|_proj)/(scale|bias)$')
_BLOCK = re.compile(r'^Transformer/encoderblock_(\d+)/(.*)$')


_BIT_UNIT = re.compile(r'^resnet/(block\d+)/unit(\d+)/([abc])/'
                       r'(proj/)?(standardized_conv2d|group_norm)(?:_\d+)?/'
                       r'(kernel|gamma|beta)$')
_LINEN_UNIT = re.compile(r'^(block\d+)/unit(\d+)/(conv|gn)(\d|_proj)/'
                         r'(kernel|scale|bias)$')
# BiT's names outside the units <-> ours.
_BIT_TOP = {'resnet/root_block/standardized_conv2d/kernel': 'conv_root/kernel',
            'resnet/group_norm/gamma': 'norm_pre_head/scale',
            'resnet/group_norm/beta': 'norm_pre_head/bias',
            'resnet/head/conv2d/kernel': 'head/kernel',
            'resnet/head/conv2d/bias': 'head/bias'}
_BIT_PARAM = {'kernel': 'kernel', 'gamma': 'scale', 'beta': 'bias'}


def is_bit(flat: Mapping[str, Any]) -> bool:
  """Params of a BiT ResNet-v2, in its published layout or ours."""
  return any(k.startswith('resnet/') or k.startswith('norm_pre_head/')
             for k in flat)


def from_bit_layout(flat: Mapping[str, Any]) -> dict[str, Any]:
  """BiT's published names (layout 4) -> our `models.BiT` names."""
  out = {}
  for key, value in flat.items():
    if key in _BIT_TOP:
      name = _BIT_TOP[key]
      if name == 'head/kernel':  # a (1, 1, C, K) convolution: a dense layer
        value = np.reshape(value, np.shape(value)[-2:])
      out[name] = value
      continue
    match = _BIT_UNIT.match(key)
    if not match:
      raise ValueError(f'{key!r} is not a name of BiT\'s ResNet-v2 files '
                       '(resnet/root_block, resnet/block{b}/unit{uu}/{a,b,c}, '
                       'resnet/group_norm, resnet/head).')
    block, unit, layer, proj, kind, param = match.groups()
    if proj:
      module = 'conv_proj'
    else:
      module = ('conv' if kind == 'standardized_conv2d' else 'gn') + str(
          'abc'.index(layer) + 1)
    out[f'{block}/unit{int(unit)}/{module}/{_BIT_PARAM[param]}'] = value
  # GroupNorm params may be stored as (1, 1, 1, C).
  return {k: np.reshape(v, (-1,)) if k.endswith(('/scale', '/bias'))
          and not k.startswith('head/') else v for k, v in out.items()}


def to_bit_layout(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Our `models.BiT` names -> BiT's published layout 4."""
  top = {v: k for k, v in _BIT_TOP.items()}
  params = {v: k for k, v in _BIT_PARAM.items()}
  out = {}
  for key, value in flat.items():
    if key in top:
      if key == 'head/kernel':
        value = np.reshape(value, (1, 1, *np.shape(value)))
      out[top[key]] = value
      continue
    match = _LINEN_UNIT.match(key)
    if not match:
      raise ValueError(f'{key!r} is not a parameter of a BiT model.')
    block, unit, kind, which, param = match.groups()
    if which == '_proj':
      name = 'a/proj/standardized_conv2d'
    else:
      name = 'abc'[int(which) - 1] + (
          '/standardized_conv2d' if kind == 'conv' else '/group_norm')
    out[f'resnet/{block}/unit{int(unit):02d}/{name}/{params[param]}'] = value
  return out


def strip_training_prefix(flat: Mapping[str, Any]) -> tuple[dict, bool]:
  """Keeps only the params of a training checkpoint; True for big_vision.

  Optimizer slots and other state stored beside the params are dropped.
  """
  for prefix, big_vision in (('params/', True), ('opt/target/', False)):
    if any(k.startswith(prefix) for k in flat):
      return ({k[len(prefix):]: v for k, v in flat.items()
               if k.startswith(prefix)}, big_vision)
  return dict(flat), False


def posemb_prefix_slots(flat: Mapping[str, Any],
                        grid: tuple[int, int] | None = None) -> int:
  """Position-embedding slots before the patch grid's: exact given the grid;
  without one, a slot for the class token and each register (Google's and
  timm's default; weights whose embedding covers only the patches, timm's
  no_embed_class, come with their model and so with their grid).
  """
  if grid is not None:
    return np.shape(flat[POSEMB])[1] - grid[0] * grid[1]
  return int('cls' in flat) + (np.shape(flat['reg'])[1] if 'reg' in flat
                               else 0)


def rename_block_children(flat: Mapping[str, Any],
                          mapping: Mapping[str, str]) -> dict[str, Any]:
  """Renames the direct children of every encoder block through `mapping`."""
  def rename(key: str) -> str:
    parts = key.split('/')
    for i in range(1, len(parts)):
      if parts[i - 1].startswith('encoderblock') and parts[i] in mapping:
        parts[i] = mapping[parts[i]]
    return '/'.join(parts)
  return {rename(k): v for k, v in flat.items()}


def from_big_vision_posemb(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Moves big_vision's top-level `pos_embedding` to where our model has it.

  big_vision adds the position embedding to the patches *before* prepending
  the class token; our model (like Google's original) adds it after, to all
  tokens. A zero class-slot row makes the two compute the same function.
  """
  flat = dict(flat)
  if 'pos_embedding' not in flat:
    return flat  # sincos or no position embedding: nothing stored.
  posemb = flat.pop('pos_embedding')
  if 'cls' in flat:
    posemb = np.concatenate([np.zeros_like(posemb[:, :1]), posemb], axis=1)
  flat[POSEMB] = posemb
  return flat


def to_linen_layout(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Any published layout (module docstring) -> our model's flat naming.

  Encoder blocks stay stacked or unrolled as stored.
  """
  flat, big_vision = strip_training_prefix(flat)
  if any(k.startswith('resnet/') for k in flat):
    return from_bit_layout(flat)
  if big_vision:
    flat = from_big_vision_posemb(flat)
  if any('/MlpBlock_3/' in k for k in flat):  # pre-linen numbering
    flat = rename_block_children(flat, FROM_PRE_LINEN)
  # Pre-linen GroupNorm params were (1, 1, 1, C); linen's are (C,).
  return {k: v.reshape(-1) if _GROUPNORM.search(k) else v
          for k, v in flat.items()}


def to_original_layout(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Our flat naming -> Google's original layout 1 (unrolled, pre-linen),
  or BiT's layout 4 for BiT models."""
  if is_bit(flat):
    return to_bit_layout(flat)
  return rename_block_children(unstack_blocks(flat), TO_PRE_LINEN)


def is_stacked(flat: Mapping[str, Any]) -> bool:
  return any(k.startswith(STACKED) for k in flat)


def unstack_blocks(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`encoderblock/...` (layer axis 0) -> `encoderblock_{i}/...`, in numpy."""
  out = {}
  for key, value in flat.items():
    if key.startswith(STACKED):
      rest = key[len(STACKED):]
      for i in range(value.shape[0]):
        out[f'Transformer/encoderblock_{i}/{rest}'] = np.asarray(value[i])
    else:
      out[key] = value
  return out


def stack_blocks(flat: Mapping[str, Any]) -> dict[str, Any]:
  """`encoderblock_{i}/...` -> `encoderblock/...` (layer axis 0), in numpy.

  numpy rather than `models.stack_encoder_blocks`, so that loading a big
  checkpoint does not go through accelerator memory.
  """
  out, blocks = {}, {}
  for key, value in flat.items():
    match = _BLOCK.match(key)
    if match:
      blocks.setdefault(match[2], {})[int(match[1])] = value
    else:
      out[key] = value
  for rest, layers in blocks.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f'Cannot stack Transformer/encoderblock_{{i}}/{rest}: '
                       f'layers {sorted(layers)} are not 0..{len(layers) - 1}.')
    out[STACKED + rest] = np.stack([np.asarray(layers[i])
                                    for i in range(len(layers))])
  return out
