"""Adapting pretrained weights to a new model: the fine-tuning start.

`load_pretrained` takes a checkpoint (an `.npz` path or a params tree in any
layout `load_npz` reads) and the new model's freshly initialised params, and
returns the checkpoint's weights shaped like the new model: a new head for
new classes, pre-logits kept or dropped, the patch embedding resized to a
new patch size (`checkpoint.patch_resize`), the position embedding resized to
the new patch grid (`checkpoint.posemb`). Whatever still differs is listed in
one error.
"""
from collections.abc import Iterable, Mapping
import logging
import os
from typing import Any

import numpy as np

from vit_jax.base import errors
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout
from vit_jax.checkpoint import npz
from vit_jax.checkpoint import patch_resize
from vit_jax.checkpoint import posemb

PathLike = str | os.PathLike
Params = dict[str, Any]
ADAPTATIONS = ('head', 'pre_logits', 'posemb', 'patch')

log = logging.getLogger(__name__)


def _match_block_layout(flat: dict, init: Mapping[str, Any]) -> dict:
  """Stacks or unrolls the checkpoint's encoder blocks like `init`."""
  if layout.is_stacked(init) and not layout.is_stacked(flat):
    return layout.stack_blocks(flat)
  if layout.is_stacked(flat) and not layout.is_stacked(init):
    return layout.unstack_blocks(flat)
  return flat


def _take_from_init(flat: dict, init: Mapping[str, Any], module: str) -> dict:
  """Replaces `module`'s params with those of `init` (absent if init has none)."""
  flat = {k: v for k, v in flat.items() if not k.startswith(module + '/')}
  flat.update({k: v for k, v in init.items() if k.startswith(module + '/')})
  return flat


def _same_shapes(flat: Mapping, init: Mapping, module: str) -> bool:
  mine = {k: np.shape(v) for k, v in flat.items() if k.startswith(module + '/')}
  theirs = {k: np.shape(v) for k, v in init.items()
            if k.startswith(module + '/')}
  return mine == theirs


def _resize_posemb(flat: dict, init: Mapping, source: str, method: str,
                   new_grid, old_grid) -> tuple[dict, list[str]]:
  """Resizes the checkpoint's position embedding to init's grid.

  Returns the params and notes for the error report: when the grids cannot
  be inferred, the mismatch is reported with the reason, not raised alone.
  """
  if layout.POSEMB not in flat or layout.POSEMB not in init:
    return flat, []
  old, new = flat[layout.POSEMB], init[layout.POSEMB]
  if old.shape[-1] != new.shape[-1]:
    return flat, []  # another width: a different model, reported as such.
  if old.shape == new.shape and not (old_grid and new_grid):
    return flat, []
  old_prefix = layout.posemb_prefix_slots(flat, old_grid)
  new_prefix = layout.posemb_prefix_slots(init, new_grid)
  try:
    old_grid = old_grid or posemb.infer_grid(old.shape[1] - old_prefix,
                                      f'position embedding of {source}')
    new_grid = new_grid or posemb.infer_grid(new.shape[1] - new_prefix,
                                      "model's position embedding")
    resized = posemb.interpolate_posemb(
        old, new_grid, num_prefix_tokens=old_prefix, old_grid=old_grid,
        method=method)
  except ValueError as e:
    return flat, [f'{layout.POSEMB} could not be resized: {e} Pass '
                  'load_pretrained(..., old_grid=(h, w), new_grid=(h, w)).']
  log.info('Resized %s of %s from grid %s to %s (%s).', layout.POSEMB,
           source, old_grid, new_grid, method)
  return {**flat, layout.POSEMB: resized}, []


def _resize_patches(flat: dict, init: Mapping, source: str
                    ) -> tuple[dict, list[str]]:
  """The patch embedding resized to init's patch size (FlexiViT's PI-resize).

  Plain ViTs only: a hybrid's embedding is a 1x1 convolution of ResNet
  features, not of pixels, so a hybrid's other patch size is left to the
  mismatch report, with a note saying why.
  """
  key = 'embedding/kernel'
  if key not in flat or key not in init:
    return flat, []
  old, new = np.shape(flat[key]), np.shape(init[key])
  if old == new or old[2:] != new[2:]:
    return flat, []  # unchanged, or another width: a different model.
  if 'conv_root/kernel' in init or 'conv_root/kernel' in flat:
    return flat, [f'{key} not resized: a hybrid (ResNet stem) embeds '
                  'features, not pixel patches.']
  log.info('Resized the patch embedding of %s from %s to %s (PI-resize).',
           source, old[:2], new[:2])
  return {**flat, key: patch_resize.resize_patch_kernel(
      np.asarray(flat[key]), new[:2])}, []


_HINTS = {'head': ('head/', 're-initialise the head for new classes'),
          'pre_logits': ('pre_logits/', 'drop or re-initialise pre_logits'),
          'posemb': (layout.POSEMB, 'resize the position embedding'),
          'patch': ('embedding/kernel', 'resize the patch embedding')}


def _check_fits(flat: Mapping, init: Mapping, source: str,
                adapt: frozenset, notes: list[str]) -> None:
  """One ValueError listing every missing, unexpected and mis-shaped key."""
  missing = sorted(set(init) - set(flat))
  unexpected = sorted(set(flat) - set(init))
  mismatched = sorted(k for k in set(flat) & set(init)
                      if np.shape(flat[k]) != np.shape(init[k]))
  if not (missing or unexpected or mismatched):
    return
  shapes = [f'{k}: checkpoint {np.shape(flat[k])} vs model {np.shape(init[k])}'
            for k in mismatched]
  message = f'Checkpoint {source} does not fit the model:'
  for title, lines in (('missing from the checkpoint', missing),
                       ('unexpected in the checkpoint', unexpected),
                       ('shape mismatches', shapes), ('notes', notes)):
    if lines:
      message += errors.listing(title, lines)
  involved = missing + unexpected + mismatched
  for name, (prefix, what) in _HINTS.items():
    if name not in adapt and any(k.startswith(prefix) for k in involved):
      message += f"\n  Pass adapt=(..., {name!r}) to {what}."
  raise ValueError(message)


def _check_model_config(init: Mapping, model_config: Any, source: str) -> None:
  if not isinstance(model_config, Mapping) and not hasattr(model_config,
                                                           'classifier'):
    return  # a BiT ResNet: no class token or pre-logits to check
  get = (model_config.get if isinstance(model_config, Mapping)
         else lambda k, d=None: getattr(model_config, k, d))
  has_cls = get('classifier', 'token') in ('token', 'token_unpooled')
  has_pre_logits = get('representation_size') is not None
  if has_cls != ('cls' in init) or has_pre_logits != any(
      k.startswith('pre_logits/') for k in init):
    raise ValueError(
        f'init_params do not match model_config (classifier='
        f'{get("classifier")!r}, representation_size='
        f'{get("representation_size")!r}) while loading {source}: pass the '
        'params initialised from that model.')


def load_pretrained(pretrained: PathLike | Mapping[str, Any],
                    init_params: Mapping[str, Any],
                    model_config: Any = None, *,
                    adapt: Iterable[str] = ADAPTATIONS,
                    new_grid: tuple[int, int] | None = None,
                    old_grid: tuple[int, int] | None = None,
                    posemb_method: str = 'bilinear') -> Params:
  """Adapts a pretrained checkpoint to a new model (fine-tuning).

  Args:
    pretrained: an `.npz` path or a params tree (any layout `load_npz` reads).
    init_params: freshly initialised params of the new model; they give the
      target keys, shapes and dtypes, and the re-initialised head.
    model_config: optional; the `VisionTransformer` (or a mapping of its
      fields) `init_params` came from, checked for consistency.
    adapt: which differences to adapt instead of reporting:
      'head': always take `head` from init_params (new classes);
      'pre_logits': keep the checkpoint's pre_logits if the new model has one
        of the same shape, else drop it / take the fresh one from init_params;
      'posemb': resize the position embedding's patch grid (class slot kept);
      'patch': resize the patch embedding to the model's patch size
        (FlexiViT's PI-resize, `patch_resize`), for plain ViTs.
    new_grid / old_grid: (height, width) in patches of the new model / the
      checkpoint; None infers a square grid from the token count. Needed for
      non-square grids.
    posemb_method: 'bilinear' (Google's scipy zoom) or 'bicubic' (timm's).

  Returns:
    A tree shaped like `init_params` (numpy arrays in init_params' dtypes,
    encoder blocks stacked or not like init_params).

  Raises:
    ValueError: naming the source and every missing, unexpected or mis-shaped
      key left after the requested adaptations.
  """
  adapt = frozenset(adapt)
  if adapt - set(ADAPTATIONS):
    raise ValueError(f'Unknown adaptations {sorted(adapt - set(ADAPTATIONS))}; '
                     f'choose from {ADAPTATIONS}.')
  if isinstance(pretrained, Mapping):
    # Also takes a variables dict ({'params': ...}) or a raw flat dump.
    source = '<params>'
    flat = layout.to_linen_layout(arrays.flatten(pretrained))
    arrays.check_values(flat, 'load_pretrained: params')
  else:
    source = os.fspath(pretrained)
    flat = arrays.flatten(npz.load_npz(pretrained))
  init = arrays.flatten(init_params)
  if model_config is not None:
    _check_model_config(init, model_config, source)
  flat = _match_block_layout(flat, init)
  if 'head' in adapt:
    flat = _take_from_init(flat, init, 'head')
  if 'pre_logits' in adapt and not _same_shapes(flat, init, 'pre_logits'):
    log.info('load_pretrained: pre_logits of %s replaced by the new model\'s '
             '(%s).', source, 'fresh' if 'pre_logits/kernel' in init else 'none')
    flat = _take_from_init(flat, init, 'pre_logits')
  notes = []
  if 'patch' in adapt:
    flat, notes = _resize_patches(flat, init, source)
  if 'posemb' in adapt:
    flat, posemb_notes = _resize_posemb(flat, init, source, posemb_method,
                                        new_grid, old_grid)
    notes += posemb_notes
  _check_fits(flat, init, source, adapt, notes)
  # Cast to the new model's dtypes (e.g. a bfloat16 export into float32).
  return arrays.unflatten({k: np.asarray(v, dtype=init[k].dtype)
                    for k, v in flat.items()})
