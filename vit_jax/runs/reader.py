"""Reading a training workdir without disturbing the run that may be writing it.

Export, predict, evaluate, inspect and fine-tuning read "the model in this
workdir" while its training may still run. They only read: the checkpoint
directory is never cleaned, renamed or locked, the step being saved is never
listed (Orbax renames a step into place only once it is complete), and only
the parameters are restored, as numpy arrays on the host, not the optimizer
state. The newest complete step is read unless a step is asked for; a newest
step that cannot be read (truncated files, or deleted meanwhile by the run's
keep-last-N) is passed over with a warning for the next newest, as training's
own resume does.
"""
import dataclasses
import logging
import os
import pathlib
from typing import Any

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from vit_jax.runs import paths

log = logging.getLogger(__name__)
# Re-listing after every step in the listing failed: the run's keep-last-N can
# delete the steps a slow reader listed while it reads them.
_ATTEMPTS = 3


class UnreadableStepError(ValueError):
  """A complete-looking checkpoint step whose files cannot be read."""


@dataclasses.dataclass(frozen=True)
class StoredRun:
  """A checkpoint step's parameters (numpy, linen tree) and meta."""
  step: int
  params: dict[str, Any]
  meta: dict[str, Any]
  path: pathlib.Path  # the step's directory


def checkpoint_dir(workdir: str | os.PathLike) -> pathlib.Path:
  """`workdir/checkpoints`; FileNotFoundError if `workdir` is no training workdir."""
  directory = pathlib.Path(workdir).absolute() / paths.CHECKPOINTS
  if not directory.is_dir():
    what = ('does not exist' if not pathlib.Path(workdir).exists() else
            'is not a training workdir: it has no checkpoints/ directory')
    raise FileNotFoundError(f'{workdir} {what}.')
  return directory


def complete_steps(directory: str | os.PathLike) -> list[int]:
  """Complete checkpoint steps in `directory`, ascending (in-flight ones excluded)."""
  try:
    return sorted(ocp.step.checkpoint_steps(epath.Path(directory)))
  except FileNotFoundError:
    return []


def read_meta(step_dir: str | os.PathLike) -> dict[str, Any]:
  """The JSON meta saved beside a step's arrays (config, model name, ...)."""
  meta = ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
      epath.Path(step_dir) / 'meta')
  return dict(meta)


def read_params(step_dir: str | os.PathLike) -> tuple[int, dict[str, Any]]:
  """(step, params) of a step directory: only those arrays, as numpy."""
  path = epath.Path(step_dir) / 'state'
  handler = ocp.PyTreeCheckpointHandler()
  tree = handler.metadata(path).tree
  if not isinstance(tree, dict) or 'params' not in tree:
    raise UnreadableStepError(f'{step_dir} holds no training state with params.')
  wanted = {'params': tree['params'], 'step': tree['step']}
  restore_args = jax.tree.map(
      lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  restored = ocp.Checkpointer(handler).restore(path, args=ocp.args.PyTreeRestore(
      wanted, restore_args=restore_args, partial_restore=True))
  return int(restored['step']), restored['params']


def read_step(directory: pathlib.Path, step: int) -> StoredRun:
  step_dir = directory / str(step)
  try:
    meta = read_meta(step_dir)
    stored_step, params = read_params(step_dir)
  except UnreadableStepError:
    raise
  except Exception as e:  # tensorstore, OCDBT, JSON, vanished files
    raise UnreadableStepError(
        f'{step_dir} unreadable: {type(e).__name__}: '
        f'{str(e).splitlines()[0][:300] if str(e) else ""}') from e
  return StoredRun(stored_step, params, meta, step_dir)


def read_run(workdir: str | os.PathLike, step: int | None = None) -> StoredRun:
  """The parameters and meta of `workdir` at `step` (default: newest readable).

  Raises FileNotFoundError (no workdir, no complete checkpoint, no such step)
  or UnreadableStepError (no step could be read, or the requested one).
  """
  directory = checkpoint_dir(workdir)
  if step is not None:
    steps = complete_steps(directory)
    if step not in steps:
      raise FileNotFoundError(
          f'{workdir} has no complete checkpoint of step {step}; complete '
          f'steps: {", ".join(map(str, steps)) or "none"}.')
    return read_step(directory, step)
  failed: dict[int, str] = {}
  for _ in range(_ATTEMPTS):
    candidates = [s for s in reversed(complete_steps(directory))
                  if s not in failed]
    if not candidates and not failed:
      raise FileNotFoundError(
          f'{workdir} has no complete checkpoint yet (checkpoints/ is empty or '
          'holds only a save in progress).')
    for candidate in candidates:
      try:
        return read_step(directory, candidate)
      except UnreadableStepError as e:
        if (directory / str(candidate)).is_dir():
          log.warning('Checkpoint step %d of %s is unreadable, reading an '
                      'older one: %s', candidate, workdir, e)
          failed[candidate] = str(e)
        # else: deleted by the run meanwhile; the next listing has newer ones.
  raise UnreadableStepError(
      f'No readable checkpoint in {directory}: ' + '; '.join(
          f'step {s}: {m}' for s, m in failed.items()))
