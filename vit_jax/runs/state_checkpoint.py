"""Training-state checkpoints with Orbax: save, keep the last N, resume.

    ckpt = StateCheckpointer(workdir + '/checkpoints', max_to_keep=3)
    ckpt.save(step, state, {'data_position': 1234, 'config': config_dict})
    ...
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=x.sharding), state)
    state, meta = ckpt.restore(abstract)   # latest complete checkpoint

`state` is any pytree of jax arrays (params, optax state, step, raw RNG key
data); `meta` is a JSON-serialisable dict (tuples come back as lists). Each
step is a directory `<step>/` holding `state/` (Orbax OCDBT arrays) and `meta/`.

Safety: Orbax writes a step under `<step>.orbax-checkpoint-tmp*` and renames
it only once every file is committed, so a crash mid-save leaves no
`<step>/`; `latest_step` and `all_steps` list only renamed (complete) steps,
never the one still being written in the background. A save that fails
(disk full, permissions) raises CheckpointWriteError with the OS's reason
and the newest complete step, which stays intact. `restore()` without a
step falls back, with a warning, past newest steps that fail to read
(truncated or corrupted files); the next `save` moves those aside to
`<step>.unreadable/` (kept for inspection, invisible to Orbax), so that the
resumed run's checkpoints are not shadowed by them.
Arrays restore onto the shardings of `abstract_state`, whatever mesh or
device count saved them.
"""
from collections.abc import Mapping
import contextlib
import json
import logging
import os
import re
import time
from typing import Any

import jax
import orbax.checkpoint as ocp

from vit_jax.base import errors
from vit_jax.runs import reader

log = logging.getLogger(__name__)

# A save that waits longer than this for the previous one is worth one line.
SLOW_SAVE_SECONDS = 1.0


def _check_json(meta: Mapping[str, Any]) -> None:
  # Orbax would only fail later, in its background thread, with a traceback
  # that does not say which entry.
  if not isinstance(meta, Mapping):
    raise TypeError(f'meta must be a dict, got {type(meta).__name__}.')
  for key, value in meta.items():
    try:
      json.dumps(value)
    except (TypeError, ValueError) as e:
      raise TypeError(f'meta[{key!r}] is not JSON-serialisable ({e}); convert '
                      'it (e.g. ConfigDict.to_dict(), int(...)).') from e


def _as_abstract(leaf: Any) -> Any:
  """Concrete jax arrays stand for their own shape, dtype and sharding."""
  if isinstance(leaf, jax.Array):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


def _orbax_name(path: tuple) -> str:
  """The name Orbax stores a leaf under: keys, attributes, indices '.'-joined."""
  parts = []
  for entry in path:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(entry, attr):
        parts.append(str(getattr(entry, attr)))
        break
  return '.'.join(parts)


class CorruptCheckpointError(ValueError):
  """A complete-looking checkpoint step whose files cannot be read."""


class CheckpointWriteError(RuntimeError):
  """A save failed; the complete checkpoints on disk are untouched."""


def _write_failure_reason(error: BaseException) -> str:
  """The OS's reason inside TensorStore's long error text, else its start."""
  text = str(error)
  code = re.search(r"os_error_code='?(\d+)", text)
  if code:
    return f'{os.strerror(int(code.group(1)))} (errno {code.group(1)})'
  if isinstance(error, OSError) and error.strerror:
    return f'{error.strerror} (errno {error.errno})'
  return text.split(' [tensorstore_spec')[0][:400]


class StateCheckpointer:
  """Saves and restores the full training state with an Orbax CheckpointManager.

  Args:
    directory: where the steps live (created if missing).
    max_to_keep: complete checkpoints kept; older ones are deleted.
    async_save: write in a background thread; `save` returns once the arrays
      are copied off the accelerator.
  """

  def __init__(self, directory: str | os.PathLike, *, max_to_keep: int = 3,
               async_save: bool = True):
    if not isinstance(max_to_keep, int) or max_to_keep < 1:
      raise ValueError(f'max_to_keep={max_to_keep!r}: at least the newest '
                       'checkpoint must be kept (1 or more).')
    self.directory = os.path.abspath(os.fspath(directory))
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
        create=True,
        # Half-written steps of a killed run are garbage (and can be large).
        cleanup_tmp_directories=True)
    # Explicit handlers: item_metadata() and restore work in a fresh process
    # before anything was saved.
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(),
                       'meta': ocp.JsonCheckpointHandler()})
    self._unreadable: set[int] = set()  # steps restore() had to skip
    self._in_flight: int | None = None  # step whose async save may not be done
    self._failed = False  # a CheckpointWriteError was raised already
    self._warned_slow = False  # said once per run, not at every save

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Starts saving `state` and `meta` as `step`; True if a save started.

    Returns False (nothing written) if `step` already exists (never
    overwritten) or, unless `force`, is not newer than the latest checkpoint
    (`force` skips Orbax's should-save policy). Raises TypeError at once if
    `meta` is not JSON-serialisable.
    """
    _check_json(meta)
    # A failure of the previous background save is reported as that step's.
    previous, waiting_since = self._in_flight, time.monotonic()
    self.wait_until_finished()
    waited = time.monotonic() - waiting_since
    if (previous is not None and waited > SLOW_SAVE_SECONDS
        and not self._warned_slow):
      # Orbax says this at every save, in its own words (dropped by the CLI).
      self._warned_slow = True
      log.warning('Step %d waited %.1f s for checkpoint %s to finish writing: '
                  'saving this often slows training; consider a larger '
                  'checkpoint_every. (Said once.)', step, waited, previous)
    self._set_aside_unreadable()
    if step in self.all_steps():
      log.warning('Checkpoint step %d already exists in %s; not overwritten.',
                  step, self.directory)
      return False
    with self._reporting_write_errors(step):
      started = self._manager.save(
          step, force=force,
          args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  meta=ocp.args.JsonSave(dict(meta))))
    self._in_flight = step if started else None
    return started

  @contextlib.contextmanager
  def _reporting_write_errors(self, step: int | None):
    try:
      yield
    except Exception as e:  # TensorStore, OSError, Orbax's thread errors
      self._failed = True
      latest = self.latest_step()
      kept = (f'The newest complete checkpoint, step {latest}, is intact.'
              if latest is not None else 'No complete checkpoint exists yet.')
      raise CheckpointWriteError(
          f'Could not write checkpoint step {step} in {self.directory}: '
          f'{_write_failure_reason(e)}. {kept}') from e

  def _set_aside_unreadable(self) -> None:
    # Orbax refuses to save a step not newer than its latest one, and its
    # keep-last-N would count the unreadable steps: move them out of its view.
    # (Single-host: with several processes only one should rename.)
    for step in sorted(self._unreadable):
      src, dst = self.step_path(step), self.step_path(step) + '.unreadable'
      suffix = 0
      while os.path.exists(dst):
        suffix += 1
        dst = f'{self.step_path(step)}.unreadable.{suffix}'
      if os.path.isdir(src):
        os.rename(src, dst)
        log.warning('Moved unreadable checkpoint %s to %s.', src, dst)
    if self._unreadable:
      self._unreadable.clear()
      self._manager.reload()

  def all_steps(self) -> list[int]:
    """Complete steps on disk, ascending (an in-flight save is not listed)."""
    # Read the directory, not the manager's in-memory list, which already
    # holds a step whose background save has not committed yet.
    return reader.complete_steps(self.directory)

  def latest_step(self) -> int | None:
    """The newest complete step, or None."""
    steps = self.all_steps()
    return steps[-1] if steps else None

  def _check_matches(self, step: int, abstract_state: Any) -> None:
    """ValueError listing every key/shape where abstract_state and disk differ."""
    try:
      stored = self._manager.item_metadata(step)['state'].tree
    except Exception as e:
      raise CorruptCheckpointError(
          f'metadata of {self.step_path(step)} unreadable: {e}') from e
    on_disk = {m.name: tuple(m.shape) for m in jax.tree.leaves(stored)}
    wanted = {_orbax_name(path): tuple(x.shape) for path, x
              in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    missing = [n for n in wanted if n not in on_disk]
    unexpected = [n for n in on_disk if n not in wanted]
    shapes = [f'{n}: on disk {on_disk[n]} vs requested {s}'
              for n, s in wanted.items() if n in on_disk and on_disk[n] != s]
    if missing or unexpected or shapes:
      raise ValueError(
          f'Checkpoint {self.step_path(step)} does not match the abstract '
          'state (a different model or optimizer?):'
          + errors.listing('requested but not on disk', sorted(missing))
          + errors.listing('on disk but not requested', sorted(unexpected))
          + errors.listing('shape mismatches', sorted(shapes)))

  def _restore_step(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    self._check_matches(step, abstract_state)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          meta=ocp.args.JsonRestore()))
    except Exception as e:  # tensorstore / OCDBT / JSON read errors
      raise CorruptCheckpointError(
          f'{self.step_path(step)} unreadable: {type(e).__name__}: {e}') from e
    return restored['state'], restored['meta']

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict]:
    """Restores (state, meta) onto the shardings of `abstract_state`.

    Args:
      abstract_state: the state's pytree of `jax.ShapeDtypeStruct` with
        `.sharding` (concrete arrays work too); any mesh or device count.
      step: the step to restore; None takes the newest complete step that
        reads, logging a warning for each newer one that does not.

    Raises:
      FileNotFoundError: no complete checkpoint (or not `step`).
      ValueError: the tree or shapes on disk differ from abstract_state;
        or (CorruptCheckpointError) no candidate step is readable.
    """
    abstract_state = jax.tree.map(_as_abstract, abstract_state)
    steps = self.all_steps()
    if step is not None:
      if step not in steps:
        raise FileNotFoundError(f'No complete checkpoint {self.step_path(step)};'
                                f' complete steps: {steps}.')
      return self._restore_step(step, abstract_state)
    if not steps:
      raise FileNotFoundError(f'No complete checkpoint in {self.directory}.')
    failures = []
    for candidate in reversed(steps):
      try:
        return self._restore_step(candidate, abstract_state)
      except CorruptCheckpointError as e:
        log.warning('Checkpoint step %d is unreadable, falling back to an '
                    'older one: %s', candidate, e)
        self._unreadable.add(candidate)
        failures.append(str(e))
    raise CorruptCheckpointError(
        f'No readable checkpoint in {self.directory}:\n  '
        + '\n  '.join(failures))

  def wait_until_finished(self) -> None:
    """Blocks until the background save (if any) has committed.

    Raises CheckpointWriteError if that save failed.
    """
    with self._reporting_write_errors(self._in_flight):
      self._manager.wait_until_finished()
    self._in_flight = None

  def close(self) -> None:
    """Waits for pending saves and releases Orbax's threads."""
    if self._failed:  # already reported: do not raise it a second time
      with contextlib.suppress(Exception):
        self._manager.close()
      return
    with self._reporting_write_errors(self._in_flight):
      self._manager.close()

  def __enter__(self) -> 'StateCheckpointer':
    return self

  def __exit__(self, *exc) -> None:
    self.close()
