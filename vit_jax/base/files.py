"""Files that appear whole or not at all, and JSON that every parser reads.

A reader (another program, a person, a crashed run's successor) never sees a
half-written file: everything is written to a temporary file beside the
target, flushed to disk and renamed over it.
"""
from collections.abc import Callable
import json
import math
import os
import pathlib
import tempfile
from typing import Any

PathLike = str | os.PathLike


def write_atomic(path: PathLike, write: Callable[[str], None]) -> None:
  """`write(tmp_path)` then rename onto `path` (same directory, same disk).

  The file gets mode 0644 (mkstemp's 0600 would hide it from other users).
  On any failure the temporary file is removed and `path` is untouched.
  """
  path = pathlib.Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.',
                             suffix='.tmp')
  os.close(fd)
  try:
    write(tmp)
    with open(tmp, 'rb') as f:  # the data on disk before the rename
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def strict(value: Any) -> Any:
  """`value` with every non-finite float as None (JSON has no NaN/Infinity)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if hasattr(value, 'item') and getattr(value, 'ndim', None) == 0:
    return strict(value.item())  # numpy / jax scalars
  return value


def dumps(value: Any, indent: int | None = 2) -> str:
  """Strict JSON text: non-finite floats become null, never bare NaN."""
  return json.dumps(strict(value), indent=indent, allow_nan=False)


def write_json(path: PathLike, value: Any) -> None:
  """`value` as strict JSON (`dumps`), written atomically."""
  text = dumps(value) + '\n'
  write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
      text, encoding='utf-8'))


def write_text(path: PathLike, text: str) -> None:
  write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(
      text, encoding='utf-8'))
