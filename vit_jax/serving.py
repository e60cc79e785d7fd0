"""Runs an exported ViT from its files alone, without vit_jax's model code.

`python -m vit_jax.export` writes `<name>.card.json`, `<name>.stablehlo` and
`<name>.safetensors` (and `<name>.npz`). This loader needs only jax, numpy,
safetensors and Pillow: it never imports `vit_jax.models` or Flax.

    model = serving.load('out/vit.card.json')          # or the directory
    pixels = model.preprocess(images.load_rgb('cat.jpg'))  # [H, W, 3] 0..255
    logits = model(pixels[None])                       # [1, num_classes]

The StableHLO function (`jax.export`, symbolic batch dimension) is
`logits = f(params, pixels)`:
  params  dict {flat name: array}, exactly the arrays of <name>.safetensors
          (float32, or bfloat16 for a --bfloat16 export; cast up inside).
  pixels  float32 [batch, height, width, 3], RGB in [0, 255], already
          resized to the card's `image_size` with its `preprocessing.resize`
          mode (`vit_jax.images.eval_pixels`); any batch size. Resizing stays
          outside because photos of different sizes cannot share a tensor.
          The [0, 255] -> [-1, 1] scaling (x / 127.5 - 1) is inside.
  returns float32 [batch, num_classes] logits.
The weights are an argument rather than constants so that they are stored
once (the safetensors file) and big models stay under the 2 GiB limit of a
serialized module.

Params checksum (`params_checksum`, the card's `params.sha256`): SHA-256
over the params in ascending order of their flat names (Python string
order); for each: the name in UTF-8, NUL, the numpy dtype name ('float32',
'bfloat16'), NUL, the shape as comma-joined integers, NUL, the array's bytes
in C order, little-endian. It depends only on names, dtypes, shapes and
values, so the npz and safetensors files of one export give the same sum;
`load` verifies it.
"""
from collections.abc import Mapping
import hashlib
import json
import os
import pathlib
from typing import Any

import jax
import numpy as np
import safetensors.numpy

from vit_jax import images

CARD_SUFFIX = '.card.json'
CARD_FORMAT = 'vit_jax.export/1'
# jax.default_backend() -> the platform names jax.export lowers for.
_LOWERING_PLATFORMS = {'cpu': ('cpu',), 'gpu': ('cuda', 'rocm'),
                       'tpu': ('tpu',)}


def params_checksum(flat: Mapping[str, Any]) -> str:
  """SHA-256 of flat params in the canonical order (module docstring)."""
  digest = hashlib.sha256()
  for name in sorted(flat):
    array = np.asarray(flat[name])
    digest.update(name.encode('utf-8') + b'\0')
    digest.update(array.dtype.name.encode('ascii') + b'\0')
    digest.update(','.join(map(str, array.shape)).encode('ascii') + b'\0')
    little = array.astype(array.dtype.newbyteorder('<'), copy=False)
    digest.update(np.ascontiguousarray(little).tobytes())
  return digest.hexdigest()


def find_card(path: str | os.PathLike) -> pathlib.Path:
  """The card of an export: `path` itself, or the one card in directory `path`."""
  path = pathlib.Path(path)
  if path.is_dir():
    cards = sorted(path.glob('*' + CARD_SUFFIX))
    if len(cards) != 1:
      found = ', '.join(c.name for c in cards) or 'none'
      raise ValueError(f'{path} must hold exactly one *{CARD_SUFFIX} export '
                       f'card (found: {found}); pass the card file itself.')
    return cards[0]
  if not path.name.endswith(CARD_SUFFIX):
    raise ValueError(f'{path} is not an export card (*{CARD_SUFFIX}).')
  if not path.is_file():
    raise FileNotFoundError(f'Export card {path} does not exist.')
  return path


def read_card(path: str | os.PathLike) -> tuple[pathlib.Path, dict[str, Any]]:
  """(card path, card dict) of an export card or of its directory."""
  card_path = find_card(path)
  try:
    card = json.loads(card_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f'Cannot read export card {card_path}: {e}') from e
  if not isinstance(card, dict) or card.get('format') != CARD_FORMAT:
    raise ValueError(f'{card_path} is not a {CARD_FORMAT} export card.')
  return card_path, card


def export_file(card_path: pathlib.Path, card: Mapping[str, Any],
                kind: str) -> pathlib.Path:
  """Path of the export's `kind` file ('npz', 'safetensors', 'stablehlo')."""
  name = card.get('files', {}).get(kind)
  if not name:
    raise ValueError(f'Export {card_path} has no {kind} file; re-export with '
                     f'--formats including {kind}.')
  path = card_path.parent / name
  if not path.is_file():
    raise FileNotFoundError(f'{path} (the {kind} file of export {card_path}) '
                            'is missing.')
  return path


def verify_checksum(flat: Mapping[str, Any], card: Mapping[str, Any],
                    source: str | os.PathLike) -> None:
  """ValueError naming `source` unless `flat` has the card's params sha256."""
  expected = card['params']['sha256']
  actual = params_checksum(flat)
  if actual != expected:
    raise ValueError(f'Params of {source} have sha256 {actual}, but the card '
                     f'says {expected}: the file is corrupt or from another '
                     'export.')


def read_safetensors(card_path: pathlib.Path, card: Mapping[str, Any],
                     verify: bool = True) -> dict[str, np.ndarray]:
  """The export's params from its safetensors file, checksum verified."""
  path = export_file(card_path, card, 'safetensors')
  try:
    flat = safetensors.numpy.load_file(path)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f'Cannot read {path}: {type(e).__name__}: {e}') from e
  if verify:
    verify_checksum(flat, card, path)
  return flat


def read_labels(path: str | os.PathLike, num_classes: int) -> list[str]:
  """Label names, one per line, or ImageNet-style TSV `index<TAB>id<TAB>name`.

  From a line with three or more tab-separated fields the third is taken.
  """
  lines = [line for line in pathlib.Path(path).read_text(
      encoding='utf-8').splitlines() if line.strip()]
  names = [(line.split('\t')[2] if line.count('\t') >= 2 else line).strip()
           for line in lines]
  if len(names) != num_classes:
    raise ValueError(f'Labels file {path} has {len(names)} names but the '
                     f'model has {num_classes} classes.')
  return names


class ExportedModel:
  """An export's StableHLO function bound to its weights (module docstring)."""

  def __init__(self, card_path: pathlib.Path, card: dict[str, Any],
               exported: jax.export.Exported, params: dict[str, np.ndarray]):
    self.card_path, self.card = card_path, card
    self.image_size: tuple[int, int] = tuple(card['image_size'])
    self.resize: str = card['preprocessing']['resize']
    self.num_classes: int = card['num_classes']
    self.label_names: list[str] | None = card['label_names']
    self._params = jax.device_put(params)  # Once, not per call.
    self._call = jax.jit(exported.call)  # Compiled once per batch size.

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """Decoded uint8 RGB [h, w, 3] -> this model's float32 [0, 255] input."""
    return images.eval_pixels(image, self.image_size, self.resize)

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    """float32 [batch, height, width, 3] in [0, 255] -> [batch, classes]."""
    pixels = np.asarray(pixels, np.float32)
    expected = (*self.image_size, 3)
    if pixels.ndim != 4 or pixels.shape[1:] != expected:
      raise ValueError(f'Expected pixels of shape (batch, {expected[0]}, '
                       f'{expected[1]}, 3), got {pixels.shape}; resize with '
                       '.preprocess() first.')
    return np.asarray(self._call(self._params, pixels))


def load(path: str | os.PathLike, verify: bool = True) -> ExportedModel:
  """The export at `path` (its card, or the directory holding one card)."""
  card_path, card = read_card(path)
  hlo_path = export_file(card_path, card, 'stablehlo')
  exported = jax.export.deserialize(bytearray(hlo_path.read_bytes()))
  backend = jax.default_backend()
  usable = _LOWERING_PLATFORMS.get(backend, (backend,))
  if not set(usable) & set(exported.platforms):
    raise ValueError(f'{hlo_path} was exported for '
                     f'{", ".join(exported.platforms)}; this process runs on '
                     f'{backend}. Re-export with '
                     f'--platforms including {usable[0]}.')
  return ExportedModel(card_path, card, exported,
                       read_safetensors(card_path, card, verify))
