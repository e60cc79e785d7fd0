"""The files of a workdir, and the check that a workdir can be written.

`prepare_for_writing` turns every way a workdir can be unusable (no path, a
file, a place without write permission, a read-only file system,
`checkpoints` being a file or a link) into one WorkdirError line before
anything runs.
"""
import errno
import os
import pathlib
import tempfile

CHECKPOINTS = 'checkpoints'
CONFIG = 'config.json'
METRICS = 'metrics.json'
ADAPTATION = 'adaptation.json'


class WorkdirError(ValueError):
  """The workdir cannot hold a run; the message says why."""


def is_workdir(path: str | os.PathLike) -> bool:
  """Whether `path` looks like a training workdir (it has checkpoints/)."""
  return pathlib.Path(path, CHECKPOINTS).exists()


def _check_creatable(path: pathlib.Path, workdir) -> None:
  """WorkdirError if `path` (missing) could not be created, found without
  creating anything: from its nearest existing ancestor."""
  parent = path.absolute().parent
  while not parent.exists():
    parent = parent.parent
  why = ('Read-only file system'
         if os.statvfs(parent).f_flag & os.ST_RDONLY else
         f'{parent} is not a directory' if not parent.is_dir() else
         'Permission denied' if not os.access(parent, os.W_OK | os.X_OK)
         else None)
  if why:
    raise WorkdirError(f'--workdir={workdir} cannot be created: {why}.')


def prepare_for_writing(workdir: str | os.PathLike,
                        create: bool = True) -> pathlib.Path:
  """Creates `workdir` if needed; WorkdirError if it cannot hold a run.

  `create=False` only checks what can be checked without writing (a new
  workdir is then created by a later call, once the run is accepted)."""
  if not os.fspath(workdir).strip():
    raise WorkdirError('--workdir is empty; name the directory for the run\'s '
                       'checkpoints and metrics, e.g. --workdir=runs/vit.')
  path = pathlib.Path(workdir).expanduser()
  if path.exists() and not path.is_dir():
    raise WorkdirError(f'--workdir={workdir} is a file, not a directory.')
  if not create and not path.exists():
    _check_creatable(path, workdir)
    return path
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise WorkdirError(f'--workdir={workdir} cannot be created: '
                       f'{e.strerror or e}.') from None
  checkpoints = path / CHECKPOINTS
  if checkpoints.is_symlink():
    # Orbax writes, renames and deletes step folders in there: through a link
    # a workdir someone hands us could make it delete folders elsewhere.
    raise WorkdirError(f'{checkpoints} is a symbolic link; a workdir\'s '
                       'checkpoints/ must be its own directory (replace the '
                       'link with the folder, or point --workdir at the '
                       'place the link names).')
  if checkpoints.exists() and not checkpoints.is_dir():
    raise WorkdirError(f'{checkpoints} is a file; a workdir\'s checkpoints/ '
                       'must be a directory (move the file away).')
  try:
    # A new file of a random name (O_EXCL): nothing planted can be written
    # through.
    fd, probe = tempfile.mkstemp(dir=path, prefix='.write-test-')
    os.close(fd)
    os.unlink(probe)
  except OSError as e:
    why = ('is on a read-only file system' if e.errno == errno.EROFS else
           'is not writable' if e.errno in (errno.EACCES, errno.EPERM) else
           f'cannot be written ({e.strerror})')
    raise WorkdirError(f'--workdir={workdir} {why}; choose another.') from None
  return path
