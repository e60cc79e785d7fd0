"""One writer per workdir: an exclusive lock on `workdir/LOCK` that names its holder.

Training takes the lock before it writes anything; a second run on the same
workdir stops at once with one line naming the holder (host, pid, start time
and command). The lock is the kernel's `flock` on the file, so it is released
whenever its holder ends, killed with SIGKILL included: a crashed run never
blocks its successor, which only notes that the previous holder died. The
holder's record is written into the file while the lock is held and cleared
on release. Readers (export, predict, evaluate, inspect) never take it.

`flock` works on local file systems and on NFS (where Linux maps it to POSIX
locks); on a file system without locks the lock cannot protect the workdir.
With several processes only process 0 takes it.
"""
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys

from vit_jax.base import files

LOCK_NAME = 'LOCK'


class WorkdirBusyError(RuntimeError):
  """Another live run holds the workdir."""


def _record() -> dict:
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'started': datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec='seconds'),
          'command': ' '.join(sys.argv)[:500]}


def describe(record: dict) -> str:
  if not record:
    return 'a run that left no record'
  return (f'pid {record.get("pid")} on {record.get("host")}, started '
          f'{record.get("started")} ({record.get("command")})')


_MAX_RECORD_BYTES = 65536  # ours are ~200 bytes; a bigger one is not ours


def _read(fd: int) -> dict:
  os.lseek(fd, 0, os.SEEK_SET)
  data = os.read(fd, _MAX_RECORD_BYTES)
  try:
    record = json.loads(data.decode('utf-8')) if data.strip() else {}
  except (ValueError, UnicodeDecodeError):
    return {'command': 'unreadable lock record'}
  return record if isinstance(record, dict) else {}


def _same_file(fd: int, path: pathlib.Path) -> bool:
  try:
    on_disk = os.lstat(path)
  except FileNotFoundError:
    return False
  held = os.fstat(fd)
  return (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino)


class WorkdirLock:
  """`with WorkdirLock(workdir) as lock:`; `lock.previous` is a dead holder's record.

  `lock_path` puts the lock file elsewhere, for a folder that is replaced
  whole (an export folder: its lock lies beside it, `.NAME.lock`, and is
  removed on release, `transient`); `other` is the flag the busy message
  suggests changing.
  """

  def __init__(self, workdir: str | os.PathLike,
               lock_path: str | os.PathLike | None = None,
               other: str = '--workdir', transient: bool = False):
    self.folder = pathlib.Path(workdir)
    self.path = pathlib.Path(lock_path or self.folder / LOCK_NAME)
    self._other = other
    self._transient = transient
    self._fd: int | None = None
    self.previous: dict = {}

  def acquire(self) -> 'WorkdirLock':
    """Takes the lock or raises WorkdirBusyError naming the live holder
    (files.UnsafeFileError if LOCK is a link, a directory or a device)."""
    while True:
      fd = self._open_and_lock()
      # A transient lock file may have been removed by its holder between our
      # open and our flock: then we hold a lock nobody else can see; retry.
      if not self._transient or _same_file(fd, self.path):
        break
      os.close(fd)
    # A record left behind means its holder ended without releasing: killed.
    self.previous = _read(fd)
    self._fd = fd
    try:
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, (json.dumps(_record()) + '\n').encode('utf-8'))
      os.fsync(fd)
    except BaseException:  # a full disk: released (and removed) at once
      self.release()
      raise
    return self

  def _open_and_lock(self) -> int:
    fd = files.open_regular(self.path, os.O_RDWR | os.O_CREAT)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f'{self.folder} is in use by another run: {describe(holder)}. '
          f'Wait for it to finish or stop it, or use another {self._other}.'
      ) from None
    except OSError:
      os.close(fd)
      raise
    return fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      if self._transient:
        # Removed while still held; a taker checks it locked the file that
        # is at the path (acquire), so no two hold "the" lock.
        self.path.unlink(missing_ok=True)
      else:
        # The workdir's LOCK stays, emptied: a reader sees no holder.
        os.ftruncate(self._fd, 0)
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> 'WorkdirLock':
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
