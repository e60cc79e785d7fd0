"""ViT weights as `.npz` files: read every published layout, write Google's.

`load_npz` reads Google's original / AugReg files, big_vision files and our
own exports (key layouts: `checkpoint.layout`); bfloat16 arrays, which numpy
stores as raw 2-byte voids, come back as bfloat16. Every array must be
floating point and finite (`arrays.check_values`). `save_npz` writes Google's
original naming, which their code and timm read unchanged.
"""
from collections.abc import Mapping
import os
from typing import Any

import ml_dtypes
import numpy as np

from vit_jax.base import files
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout

PathLike = str | os.PathLike
Params = dict[str, Any]


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
        flat[key] = arrays.as_bfloat16(npz[key])
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
  flat = layout.to_linen_layout(_read_npz(path))  # params only, no opt state
  arrays.check_values(flat, f'Checkpoint {path}')
  return arrays.unflatten(flat)


def save_npz(path: PathLike, params: Mapping[str, Any], *,
             bfloat16: bool = False) -> None:
  """Writes `params` as Google's original flat `.npz` (pre-linen numbering).

  Google's vision_transformer `checkpoint.load` and timm's npz loader read
  the file unchanged (scanned blocks are unrolled first). With
  `bfloat16=True` arrays are stored as bfloat16 ('|V2' raw bytes), half the
  size; `load_npz` reads them back, but Google's and timm's loaders do not.
  The file appears atomically: a crash never leaves a half-written `path`.
  """
  flat = arrays.flatten(params)
  arrays.check_values(flat, 'save_npz: params')
  flat = layout.to_original_layout(flat)
  dtype = ml_dtypes.bfloat16 if bfloat16 else None
  flat = {k: np.asarray(v, dtype=dtype) for k, v in flat.items()}
  files.write_atomic(path, lambda tmp: _savez(tmp, flat))


def _savez(path: str, flat: dict[str, np.ndarray]) -> None:
  with open(path, 'wb') as f:  # a file object: np.savez would append '.npz'
    np.savez(f, **flat)
