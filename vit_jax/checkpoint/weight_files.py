"""The one reader of weights files: every source's arrays pass through `read`.

`.npz` (Google's, big_vision's, our exports) and `.safetensors` (timm,
Hugging Face, our exports) files are read here and nowhere else, so no
source can skip a check again:

  * the file is a regular file, and the arrays it declares (an npz's
    uncompressed members, a safetensors header's byte ranges) add up to at
    most `limits.WEIGHTS_BYTES` before any is read: a small compressed file
    cannot make us allocate gigabytes;
  * damage (truncation, bad offsets or headers, CRC errors, pickles) is one
    ValueError line naming the file (and the array), not a library traceback;
  * every array is floating point and finite (`arrays.check_values`), so a
    file of NaNs or integers is refused at load instead of predicting `nan`.
"""
import json
import os
import struct
import zipfile

import numpy as np
import safetensors.numpy

from vit_jax.base import limits
from vit_jax.checkpoint import arrays

PathLike = str | os.PathLike
_DAMAGED = 'The file is truncated, corrupt or not a weights file.'


def read(path: PathLike, check: bool = True) -> dict[str, np.ndarray]:
  """{name: array} of an .npz or .safetensors file (by content, not name).

  FileNotFoundError if missing; ValueError (limits.LimitError for sizes) in
  one line for anything else that is wrong; `check=False` skips only the
  values check (for callers that report it with more context).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path}: no such file')
  if not os.path.isfile(path):
    raise ValueError(f'{path} is not a regular file; name a weights file.')
  with open(path, 'rb') as f:
    magic = f.read(6)
  if magic == b'\x93NUMPY':
    raise ValueError(f'{path} holds a single array (.npy), not an .npz '
                     'archive of named parameters.')
  flat = (_read_npz(path) if magic.startswith(b'PK')
          else _read_safetensors(path))
  if not flat:
    raise ValueError(f'{path} contains no arrays.')
  if check:
    arrays.check_values(flat, path)
  return flat


def keys(path: PathLike) -> list[str]:
  """The array names of a .safetensors file, from its header alone."""
  return sorted(_safetensors_header(os.fspath(path)))


def _read_npz(path: str) -> dict[str, np.ndarray]:
  try:
    with zipfile.ZipFile(path) as archive:
      declared = sum(info.file_size for info in archive.infolist())
  except (zipfile.BadZipFile, OSError, ValueError) as e:
    raise ValueError(f'Cannot read checkpoint {path}: {e}. {_DAMAGED}'
                     ) from None
  limits.WEIGHTS_BYTES.check(declared, f'{path}: arrays')
  try:
    npz = np.load(path, allow_pickle=False)
  except Exception as e:  # zipfile, numpy header and pickle refusals alike.
    raise ValueError(f'Cannot read checkpoint {path}: {type(e).__name__}: '
                     f'{e}. {_DAMAGED}') from None
  flat = {}
  with npz:
    for key in npz.files:
      try:
        # zipfile stops at each member's declared size (bounded above), so
        # a member cannot inflate past it whatever its header says.
        flat[key] = arrays.as_bfloat16(npz[key])
      except Exception as e:  # CRC, zlib, EOF and header errors.
        raise ValueError(f'Cannot read array {key!r} of checkpoint {path}: '
                         f'{type(e).__name__}: {e}. {_DAMAGED}') from None
  return flat


def _safetensors_header(path: str) -> dict:
  """The JSON header, its offsets checked against the file's size."""
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    head = f.read(8)
    if len(head) < 8:
      raise ValueError(f'Cannot read {path}: {size} bytes, too short for a '
                       f'safetensors header. {_DAMAGED}')
    (length,) = struct.unpack('<Q', head)
    if length > size - 8:
      raise ValueError(f'Cannot read {path}: its header claims {length:,} '
                       f'bytes of a {size:,}-byte file. {_DAMAGED}')
    try:
      header = json.loads(f.read(length))
    except (ValueError, UnicodeDecodeError) as e:
      raise ValueError(f'Cannot read {path}: damaged header ({e}). '
                       f'{_DAMAGED}') from None
  if not isinstance(header, dict):
    raise ValueError(f'Cannot read {path}: the header is not a JSON object. '
                     f'{_DAMAGED}')
  header.pop('__metadata__', None)
  data = size - 8 - length
  for name, entry in header.items():
    offsets = entry.get('data_offsets') if isinstance(entry, dict) else None
    if (not isinstance(offsets, list) or len(offsets) != 2
        or not all(isinstance(o, int) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data):
      raise ValueError(f'Cannot read {path}: array {name!r} lies outside '
                       f'the file ({offsets!r:.60} of {data:,} data bytes). '
                       f'{_DAMAGED}')
  return header


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  header = _safetensors_header(path)
  declared = sum(e['data_offsets'][1] - e['data_offsets'][0]
                 for e in header.values())
  limits.WEIGHTS_BYTES.check(declared, f'{path}: arrays')
  try:
    return safetensors.numpy.load_file(path)
  except Exception as e:  # SafetensorError and friends: shapes, overlaps.
    message = str(e).splitlines()[0] if str(e) else ''
    raise ValueError(f'Cannot read {path}: {type(e).__name__}: {message}. '
                     f'{_DAMAGED}') from None
