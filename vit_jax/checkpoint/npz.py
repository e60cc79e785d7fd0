"""ViT weights as `.npz` files: read every published layout, write Google's.

`load_npz` reads Google's original / AugReg files, big_vision files and our
own exports (key layouts: `checkpoint.layout`) through `weight_files.read`
(bounded, damage in one line); bfloat16 arrays, which numpy stores as raw
2-byte voids, come back as bfloat16. Every array must be floating point and
finite (`arrays.check_values`). `save_npz` writes Google's
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
from vit_jax.checkpoint import weight_files

PathLike = str | os.PathLike
Params = dict[str, Any]


def load_npz(path: PathLike) -> Params:
  """Reads a ViT `.npz` checkpoint in any published layout.

  Returns our linen tree of numpy arrays: linen numbering, the position
  embedding at Transformer/posembed_input (with a class slot for token
  models), 1-D GroupNorm params; encoder blocks stacked or not, as stored.
  """
  # Values are checked after the layout keeps the params (no optimizer state).
  flat = layout.to_linen_layout(weight_files.read(path, check=False))
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
