"""What stops a run safely: preemption (SIGTERM) and non-finite losses.

Both end with the newest good checkpoint on disk: a preempted run writes one
at a step every process agrees on and exits with status 75 (resumable); a
non-finite loss stops the run (or, with on_nonfinite='skip', the step's
update is dropped and counted) and no state that produced it is saved.
"""
import signal

from absl import logging
import jax

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM, resumable.


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was written before stopping."""

  def __init__(self, step: int):
    super().__init__(f'Preempted (SIGTERM): checkpoint of step {step} written; '
                     'run the same command again to resume.')
    self.step = step


class NonFiniteLossError(RuntimeError):
  """The loss or gradients stopped being finite; the run was stopped."""


class PreemptionWatcher:
  """Turns SIGTERM into a checkpoint at a step every process agrees on."""

  def __init__(self):
    self._signalled = False
    self._previous = None

  def __enter__(self) -> 'PreemptionWatcher':
    if jax.process_count() == 1:  # jax.distributed watches SIGTERM itself.
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning('SIGTERM: checkpointing after this step, then stopping.')
    self._signalled = True

  def reached(self, step: int) -> bool:
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      return multihost_utils.reached_preemption_sync_point(step)
    return self._signalled


class NonFiniteGuard:
  """Applies config.on_nonfinite to each step's metrics (fetched to the host)."""

  def __init__(self, mode: str):
    self.mode = mode
    self.skipped = 0
    self._last_finite: tuple[int, dict[str, float]] | None = None

  def accept(self, step: int, finite: bool, values: dict[str, float]) -> bool:
    """True to go on (finite, or skipped); False: the run must stop."""
    if finite:
      self._last_finite = (step, values)
      return True
    if self.mode == 'skip':
      self.skipped += 1
      logging.warning('Step %d: non-finite loss/gradients (%s); update skipped '
                      '(%d so far).', step, values, self.skipped)
      return True
    return False

  def error(self, step: int, values: dict[str, float],
            last_checkpoint: int | None) -> NonFiniteLossError:
    last = (f'step {self._last_finite[0]}: {self._last_finite[1]}'
            if self._last_finite else 'none')
    return NonFiniteLossError(
        f'Non-finite loss, gradients or update at step {step} ({values}). '
        f'Last finite metrics: {last}. Last good checkpoint: step '
        f'{last_checkpoint} (kept). Lower the learning rate, add '
        "grad_clip_norm, or set config.on_nonfinite='skip' to skip such steps.")
