"""An export's card: the JSON that describes it and vouches for every file.

An export is one folder (`python -m vit_jax.export --output=DIR`): the card
`<name>.card.json` and the files it lists. The card names each file by a
path inside the folder with its size and SHA-256; readers check all three
before using a file, so a card never describes other files than its own
(a re-export killed half-way, a file swapped by hand). It also carries the
params checksum (`params_checksum`, over names, dtypes, shapes and values,
so the npz and safetensors of one export agree).

Params checksum: SHA-256 over the params in ascending order of their flat
names (Python string order); for each: the name in UTF-8, NUL, the numpy
dtype name ('float32', 'bfloat16'), NUL, the shape as comma-joined integers,
NUL, the array's bytes in C order, little-endian.
"""
from collections.abc import Mapping
import hashlib
import os
import pathlib
from typing import Any

import numpy as np

from vit_jax.base import files
from vit_jax.base import limits
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import weight_files
from vit_jax.serving import images

CARD_SUFFIX = '.card.json'
CARD_FORMAT = 'vit_jax.export/2'
# The head's bias in the files: a ViT's (Google's names), a BiT ResNet's.
HEAD_BIASES = ('head/bias', 'resnet/head/conv2d/bias')


class CardError(ValueError):
  """An export card or one of its files is missing, malformed or altered."""


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


def file_sha256(path: str | os.PathLike) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 22):
      digest.update(chunk)
  return digest.hexdigest()


def is_export(path: str | os.PathLike) -> bool:
  """Whether `path` is an export card or a folder holding one."""
  path = pathlib.Path(path)
  return path.name.endswith(CARD_SUFFIX) or (
      path.is_dir() and any(path.glob('*' + CARD_SUFFIX)))


def find_card(path: str | os.PathLike) -> pathlib.Path:
  """The card of an export: `path` itself, or the one card in folder `path`."""
  path = pathlib.Path(path)
  if path.is_dir():
    cards = sorted(path.glob('*' + CARD_SUFFIX))
    if len(cards) != 1:
      found = ', '.join(c.name for c in cards) or 'none'
      raise CardError(f'{path} must hold exactly one *{CARD_SUFFIX} export '
                      f'card (found: {found}); pass the card file itself.')
    return cards[0]
  if not path.name.endswith(CARD_SUFFIX):
    raise CardError(f'{path} is not an export card (*{CARD_SUFFIX}).')
  if not path.is_file():
    raise FileNotFoundError(f'Export card {path} does not exist.')
  return path


def _is_int(value: Any, minimum: int = 1) -> bool:
  return (isinstance(value, int) and not isinstance(value, bool)
          and value >= minimum)


def _problems(card: Any) -> list[str]:
  """What is missing or of the wrong type in a card (schema only)."""
  if not isinstance(card, dict):
    return [f'the card is a JSON {type(card).__name__}, not an object']
  if card.get('format') != CARD_FORMAT:
    return [f'format is {card.get("format")!r}, not {CARD_FORMAT!r} (re-export '
            'with this version of vit_jax)']
  problems = []
  model = card.get('model')
  if not (isinstance(model, dict) and isinstance(model.get('name'), str)
          and isinstance(model.get('options'), dict)):
    problems.append('model must be {"name": str, "options": {...}}')
  if not _is_int(card.get('num_classes')):
    problems.append(f'num_classes={card.get("num_classes")!r} is not a '
                    'positive integer')
  labels = card.get('label_names', 'missing')
  if labels is not None and not (
      isinstance(labels, list) and all(isinstance(n, str) for n in labels)
      and len(labels) == card.get('num_classes')):
    problems.append(f'label_names must be null or a list of num_classes='
                    f'{card.get("num_classes")!r} strings, got '
                    f'{labels if labels == "missing" else type(labels).__name__}'
                    + (f' of {len(labels)}' if isinstance(labels, list) else ''))
  size = card.get('image_size')
  if not (isinstance(size, list) and len(size) == 2
          and all(_is_int(s) for s in size)):
    problems.append(f'image_size={size!r} is not [height, width]')
  pre = card.get('preprocessing')
  try:
    images.Preprocessing.from_json(pre)
  except (TypeError, KeyError, ValueError) as e:
    problems.append(f'preprocessing is not a valid description ({e})')
  params = card.get('params')
  if not (isinstance(params, dict) and isinstance(params.get('sha256'), str)
          and isinstance(params.get('dtype'), str)):
    problems.append('params must hold "sha256" and "dtype" strings')
  files = card.get('files')
  if not isinstance(files, dict) or not files:
    problems.append('files must be a non-empty {kind: {"path", "bytes", '
                    '"sha256"}} object')
  else:
    for kind, entry in files.items():
      if not (isinstance(entry, dict) and isinstance(entry.get('path'), str)
              and _is_int(entry.get('bytes'), 0)
              and isinstance(entry.get('sha256'), str)):
        problems.append(f'files.{kind} must be {{"path": str, "bytes": int, '
                        f'"sha256": str}}, got {entry!r:.80}')
  return problems


def read_card(path: str | os.PathLike) -> tuple[pathlib.Path, dict[str, Any]]:
  """(card path, card) of an export card or its folder; CardError if malformed."""
  card_path = find_card(path)
  try:
    card = files.read_json(card_path, 'export card')
  except limits.LimitError:
    raise
  except (OSError, ValueError) as e:
    raise CardError(f'Cannot read export card {card_path}: {e}') from e
  problems = _problems(card)
  if problems:
    raise CardError(f'Export card {card_path} is damaged: '
                    + '; '.join(problems) + '.')
  return card_path, card


def export_file(card_path: pathlib.Path, card: Mapping[str, Any], kind: str,
                verify: bool = True) -> pathlib.Path:
  """The export's `kind` file, inside the export folder, checked against the card.

  With `verify` its size and SHA-256 must be those the card lists.
  """
  entry = card['files'].get(kind)
  if not entry:
    raise CardError(f'Export {card_path} has no {kind} file; re-export with '
                    f'--formats including {kind}.')
  folder = card_path.parent.resolve()
  path = (folder / entry['path']).resolve()
  if pathlib.PurePath(entry['path']).is_absolute() or not path.is_relative_to(
      folder) or path == folder:
    raise CardError(f'Export card {card_path} names {kind} file '
                    f'{entry["path"]!r}, outside its own folder: refused.')
  if not path.exists():
    raise FileNotFoundError(f'{path} (the {kind} file of export {card_path}) '
                            'is missing.')
  if verify and path.is_file():
    size = path.stat().st_size
    if size != entry['bytes'] or file_sha256(path) != entry['sha256']:
      raise CardError(
          f'{path} is not the {kind} file that export card {card_path} '
          f'describes ({size} bytes vs {entry["bytes"]} listed, or another '
          'SHA-256): the file was replaced, damaged or comes from another '
          'export. Export again.')
  return path


def verify_params(flat: Mapping[str, Any], card: Mapping[str, Any],
                  source: str | os.PathLike) -> None:
  """CardError unless `flat` are the card's params (checksum and classes)."""
  arrays.check_values(flat, str(source))
  actual = params_checksum(flat)
  if actual != card['params']['sha256']:
    raise CardError(f'Params of {source} have sha256 {actual}, but the card '
                    f'says {card["params"]["sha256"]}: the file is corrupt or '
                    'from another export.')
  classes = next((np.shape(flat[k])[-1] for k in HEAD_BIASES if k in flat), 0)
  if classes != card['num_classes']:
    raise CardError(f'{source} has a {classes}-class head but its card says '
                    f'num_classes={card["num_classes"]}.')


def read_safetensors(card_path: pathlib.Path, card: Mapping[str, Any],
                     verify: bool = True) -> dict[str, np.ndarray]:
  """The export's params from its safetensors file, checked against the card."""
  path = export_file(card_path, card, 'safetensors', verify)
  try:
    flat = weight_files.read(path, check=False)
  except ValueError as e:
    raise CardError(str(e)) from None
  if verify:
    verify_params(flat, card, path)
  return flat


def read_labels(path: str | os.PathLike, num_classes: int) -> list[str]:
  """Label names, one per line, or ImageNet-style TSV `index<TAB>id<TAB>name`.

  From a line with three or more tab-separated fields the third is taken.
  """
  try:
    text = files.read_text(path, 'labels file')
  except UnicodeDecodeError as e:
    raise ValueError(f'Labels file {path} is not UTF-8 text ({e.reason} at '
                     f'byte {e.start}); save it as UTF-8.') from None
  except OSError as e:
    raise ValueError(f'Cannot read labels file {path}: {e.strerror}.') from None
  lines = [line for line in text.splitlines() if line.strip()]
  names = [(line.split('\t')[2] if line.count('\t') >= 2 else line).strip()
           for line in lines]
  if len(names) != num_classes:
    raise ValueError(f'Labels file {path} has {len(names)} names but the '
                     f'model has {num_classes} classes.')
  return names
