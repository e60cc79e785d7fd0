"""Parameters as flat {'a/b/c': array} dicts, and the checks every loaded file passes.

Every weight file that enters the library (an `.npz`, a safetensors file, a
timm or Hugging Face checkpoint, an export) goes through `check_values`:
arrays must be floating point and finite, so a file of NaNs or integers is
refused at load, naming the first bad array, instead of predicting `nan`.
"""
from collections.abc import Mapping
from typing import Any

import ml_dtypes
import numpy as np

_FLOATS = (np.float16, np.float32, np.float64, ml_dtypes.bfloat16)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """Nested dict -> {'a/b/c': leaf}."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}/'))
    else:
      flat[prefix + key] = value
  return flat


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{'a/b/c': leaf} -> nested dict."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *scopes, name = key.split('/')
    node = tree
    for scope in scopes:
      node = node.setdefault(scope, {})
    node[name] = value
  return tree


def as_bfloat16(array: np.ndarray) -> np.ndarray:
  """Views numpy's raw 2-byte voids ('|V2', how np.save writes bf16) as bf16."""
  if array.dtype.kind == 'V' and array.dtype.itemsize == 2:
    return array.view(ml_dtypes.bfloat16)
  return array


def check_values(flat: Mapping[str, Any], source: str) -> None:
  """ValueError naming the first array of `flat` that is empty of meaning:
  not an array (None, a string), not floating point, or not finite."""
  for name in sorted(flat):
    value = flat[name]
    if value is None or not hasattr(value, 'dtype'):
      raise ValueError(f'{source}: {name} is {type(value).__name__}, not an '
                       'array of weights.')
    if np.dtype(value.dtype) not in [np.dtype(t) for t in _FLOATS]:
      raise ValueError(f'{source}: {name} has dtype {value.dtype}; weights '
                       'must be floating point (float32, bfloat16, float16).')
    array = np.asarray(value)
    if not np.isfinite(array.astype(np.float32, copy=False)).all():
      bad = int(np.size(array) - np.isfinite(array.astype(np.float32)).sum())
      raise ValueError(f'{source}: {name} holds {bad} non-finite value(s) '
                       f'(NaN or infinity) of {np.size(array)}; the weights '
                       'are corrupt.')
