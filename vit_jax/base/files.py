"""Files that appear whole or not at all, never through a link, read within bounds.

A reader (another program, a person, a crashed run's successor) never sees a
half-written file: everything is written to a temporary file beside the
target, flushed to disk and renamed over it. The rename replaces a symbolic
link at the target rather than writing where it points, and files that are
opened in place (the workdir's LOCK, event files) are opened with O_NOFOLLOW:
a workdir or export folder someone hands us cannot make us overwrite a file
outside it. Text we read (configs, cards, labels) is read up to
`limits.TEXT_BYTES`, so `/dev/zero` or a huge file is refused, not swallowed.
"""
from collections.abc import Callable
import errno
import json
import math
import os
import pathlib
import stat
import tempfile
from typing import Any

from vit_jax.base import limits

PathLike = str | os.PathLike


class UnsafeFileError(ValueError):
  """A path we would write is a link, a directory or a device; the message
  says which and what to do."""


def _refusal(path: PathLike, what: str) -> UnsafeFileError:
  return UnsafeFileError(
      f'{path} is {what}, where vit_jax writes a regular file of its own: '
      'refused (writing through it could change a file elsewhere). Remove it '
      'or choose another folder.')


def open_regular(path: PathLike, flags: int, mode: int = 0o644) -> int:
  """os.open(path, flags) that never follows a link at `path` and only opens
  a regular file (created if O_CREAT); UnsafeFileError otherwise."""
  try:
    fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
  except OSError as e:
    if e.errno == errno.ELOOP:
      raise _refusal(path, 'a symbolic link') from None
    if e.errno == errno.EISDIR:
      raise _refusal(path, 'a directory') from None
    raise
  if not stat.S_ISREG(os.fstat(fd).st_mode):
    os.close(fd)
    raise _refusal(path, 'not a regular file')
  return fd


def check_replaceable(path: PathLike) -> None:
  """UnsafeFileError if `path` exists as something a file must not replace
  (a directory); a link there is replaced by the rename, not followed."""
  if os.path.isdir(path) and not os.path.islink(path):
    raise _refusal(path, 'a directory')


def read_bytes(path: PathLike, what: str = 'file',
               limit: limits.Limit = limits.TEXT_BYTES) -> bytes:
  """The bytes of `path`, at most `limit`; LimitError past it (a device such
  as /dev/zero included), OSError if unreadable."""
  most = limit.value()
  with open(path, 'rb') as f:
    data = f.read(most + 1)
  if len(data) > most:
    limit.check(len(data), f'{what} {path} (read so far)')
  return data


def read_text(path: PathLike, what: str = 'file') -> str:
  """UTF-8 text of `path`, bounded as `read_bytes`."""
  return read_bytes(path, what).decode('utf-8')


def read_json(path: PathLike, what: str = 'file') -> Any:
  """JSON of `path`, bounded as `read_bytes`."""
  return json.loads(read_bytes(path, what))


def write_atomic(path: PathLike, write: Callable[[str], None]) -> None:
  """`write(tmp_path)` then rename onto `path` (same directory, same disk).

  The file gets mode 0644 (mkstemp's 0600 would hide it from other users).
  On any failure the temporary file is removed and `path` is untouched.
  """
  path = pathlib.Path(path)
  check_replaceable(path)
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
