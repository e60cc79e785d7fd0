"""Pretrained ViT weights as `.npz`: load every published layout, adapt, export.

`load_npz` reads Google's original / AugReg files, big_vision files and our
own exports (layouts: `vit_jax.npz_layout`); bfloat16 arrays, which numpy
stores as raw 2-byte voids, come back as bfloat16. `load_pretrained` adapts a
checkpoint to a new model (classes, pre_logits, resolution); `save_npz`
writes Google's original naming, which their code and timm read unchanged.
Position-embedding resizing lives in `vit_jax.posemb` (re-exported here).
"""
from collections.abc import Iterable, Mapping
import logging
import os
import tempfile
from typing import Any

import ml_dtypes
import numpy as np

from vit_jax import npz_layout
from vit_jax.npz_layout import POSEMB, flatten, unflatten
from vit_jax.posemb import infer_grid, interpolate_posemb

__all__ = ['ADAPTATIONS', 'interpolate_posemb', 'load_npz', 'load_pretrained',
           'save_npz']

PathLike = str | os.PathLike
Params = dict[str, Any]
ADAPTATIONS = ('head', 'pre_logits', 'posemb')
_MAX_LISTED = 25

log = logging.getLogger(__name__)


# ---- reading and writing ---------------------------------------------------

def _read_npz(path: PathLike) -> dict[str, np.ndarray]:
  """All arrays of `path`; ValueError naming the file (and key) if unreadable."""
  hint = 'The file is truncated, corrupt or not an .npz archive.'
  try:
    npz = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise
  except Exception as e:  # zipfile, numpy header and pickle refusals alike.
    raise ValueError(f'Cannot read checkpoint {path}: {type(e).__name__}: '
                     f'{e}. {hint}') from e
  if not isinstance(npz, np.lib.npyio.NpzFile):
    raise ValueError(f'{path} holds a single array, not an .npz archive of '
                     'named parameters.')
  flat = {}
  with npz:
    for key in npz.files:
      try:
        flat[key] = npz_layout.as_bfloat16(npz[key])
      except Exception as e:  # CRC, zlib, EOF and header errors.
        raise ValueError(f'Cannot read array {key!r} of checkpoint {path}: '
                         f'{type(e).__name__}: {e}. {hint}') from e
  if not flat:
    raise ValueError(f'Checkpoint {path} contains no arrays.')
  return flat


def load_npz(path: PathLike) -> Params:
  """Reads a ViT `.npz` checkpoint in any published layout.

  Returns our linen tree of numpy arrays: linen numbering, the position
  embedding at Transformer/posembed_input (with a class slot for token
  models), 1-D GroupNorm params; encoder blocks stacked or not, as stored.
  """
  return unflatten(npz_layout.to_linen_layout(_read_npz(path)))


def save_npz(path: PathLike, params: Mapping[str, Any], *,
             bfloat16: bool = False) -> None:
  """Writes `params` as Google's original flat `.npz` (pre-linen numbering).

  Google's vision_transformer `checkpoint.load` and timm's npz loader read
  the file unchanged (scanned blocks are unrolled first). With
  `bfloat16=True` arrays are stored as bfloat16 ('|V2' raw bytes), half the
  size; `load_npz` reads them back, but Google's and timm's loaders do not.
  The file appears atomically: a crash never leaves a half-written `path`.
  """
  flat = npz_layout.to_original_layout(flatten(params))
  dtype = ml_dtypes.bfloat16 if bfloat16 else None
  flat = {k: np.asarray(v, dtype=dtype) for k, v in flat.items()}
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, suffix='.npz.tmp')
  try:
    with os.fdopen(fd, 'wb') as f:
      np.savez(f, **flat)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the file from others.
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


# ---- adapting to a new model ----------------------------------------------

def _match_block_layout(flat: dict, init: Mapping[str, Any]) -> dict:
  """Stacks or unrolls the checkpoint's encoder blocks like `init`."""
  if npz_layout.is_stacked(init) and not npz_layout.is_stacked(flat):
    return npz_layout.stack_blocks(flat)
  if npz_layout.is_stacked(flat) and not npz_layout.is_stacked(init):
    return npz_layout.unstack_blocks(flat)
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
  if POSEMB not in flat or POSEMB not in init:
    return flat, []
  old, new = flat[POSEMB], init[POSEMB]
  if old.shape[-1] != new.shape[-1]:
    return flat, []  # another width: a different model, reported as such.
  if old.shape == new.shape and not (old_grid and new_grid):
    return flat, []
  old_prefix, new_prefix = int('cls' in flat), int('cls' in init)
  try:
    old_grid = old_grid or infer_grid(old.shape[1] - old_prefix,
                                      f'position embedding of {source}')
    new_grid = new_grid or infer_grid(new.shape[1] - new_prefix,
                                      "model's position embedding")
    resized = interpolate_posemb(old, new_grid, num_prefix_tokens=old_prefix,
                                 old_grid=old_grid, method=method)
  except ValueError as e:
    return flat, [f'{POSEMB} could not be resized: {e} Pass '
                  'load_pretrained(..., old_grid=(h, w), new_grid=(h, w)).']
  log.info('Resized %s of %s from grid %s to %s (%s).', POSEMB, source,
           old_grid, new_grid, method)
  return {**flat, POSEMB: resized}, []


def _listing(title: str, lines: list[str]) -> str:
  shown = lines[:_MAX_LISTED]
  more = (f'\n    ... and {len(lines) - len(shown)} more'
          if len(lines) > len(shown) else '')
  return f'\n  {title} ({len(lines)}):\n    ' + '\n    '.join(shown) + more


_HINTS = {'head': ('head/', 're-initialise the head for new classes'),
          'pre_logits': ('pre_logits/', 'drop or re-initialise pre_logits'),
          'posemb': (POSEMB, 'resize the position embedding')}


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
      message += _listing(title, lines)
  involved = missing + unexpected + mismatched
  for name, (prefix, what) in _HINTS.items():
    if name not in adapt and any(k.startswith(prefix) for k in involved):
      message += f"\n  Pass adapt=(..., {name!r}) to {what}."
  raise ValueError(message)


def _check_model_config(init: Mapping, model_config: Any, source: str) -> None:
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
      'posemb': resize the position embedding's patch grid (class slot kept).
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
    flat = npz_layout.to_linen_layout(flatten(pretrained))
  else:
    source, flat = os.fspath(pretrained), flatten(load_npz(pretrained))
  init = flatten(init_params)
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
  if 'posemb' in adapt:
    flat, notes = _resize_posemb(flat, init, source, posemb_method, new_grid,
                                 old_grid)
  _check_fits(flat, init, source, adapt, notes)
  # Cast to the new model's dtypes (e.g. a bfloat16 export into float32).
  return unflatten({k: np.asarray(v, dtype=init[k].dtype)
                    for k, v in flat.items()})
