"""The trainer's helpers: config checks, progress lines, metrics, preemption."""
import json
import math
import pathlib
import signal
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: checkpointed on SIGTERM, resumable.
_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
           'float16': jnp.float16}


class Preempted(Exception):
  """SIGTERM arrived; a checkpoint of `step` was written before stopping."""

  def __init__(self, step: int):
    super().__init__(f'Preempted (SIGTERM): checkpoint of step {step} written; '
                     'run the same command again to resume.')
    self.step = step


class NonFiniteLossError(RuntimeError):
  """The loss or gradients stopped being finite; the run was stopped."""


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  return (size, size) if isinstance(size, int) else tuple(size)


def model_overrides(model_config: ml_collections.ConfigDict) -> dict[str, Any]:
  """config.model as keyword arguments for `models.create_model` (None: keep)."""
  overrides = {k: v for k, v in model_config.items() if v is not None}
  for key in ('dtype', 'param_dtype'):
    if key in overrides:
      if overrides[key] not in _DTYPES:
        raise ValueError(f'config.model.{key}={overrides[key]!r}; allowed: '
                         f'{", ".join(_DTYPES)}.')
      overrides[key] = _DTYPES[overrides[key]]
  for key in ('patch_size', 'resnet_layers'):
    if isinstance(overrides.get(key), (list, tuple)):
      overrides[key] = tuple(overrides[key])
  return overrides


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int) -> None:
  """Each device must get whole micro-batches, each process whole batches."""
  per = num_devices * config.accum_steps
  if config.accum_steps < 1 or config.batch_size % per:
    raise ValueError(
        f'config.batch_size={config.batch_size} must be divisible by the '
        f'{num_devices} devices x accum_steps={config.accum_steps} = {per}.')
  if config.eval_batch_size % num_devices or (
      config.eval_batch_size % num_processes):
    raise ValueError(
        f'config.eval_batch_size={config.eval_batch_size} must be divisible '
        f'by the {num_devices} devices and {num_processes} processes.')
  if config.on_nonfinite not in ('stop', 'skip'):
    raise ValueError(f"config.on_nonfinite={config.on_nonfinite!r}; allowed: "
                     "'stop', 'skip'.")


def randaugment(config: ml_collections.ConfigDict) -> tuple[int, int] | None:
  if not config.randaugment_layers:
    return None
  return (config.randaugment_layers, config.randaugment_magnitude)


class MetricWriter:
  """TensorBoard summaries under workdir/ (only where `enabled`: process 0)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self._writer = None
    if enabled:
      from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
      workdir.mkdir(parents=True, exist_ok=True)
      self._writer = tensorboard.SummaryWriter(str(workdir))

  def write(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
    if prefix == 'eval':
      logging.info('eval step %d: %s', step, json.dumps(metrics))
    if self._writer:
      for name, value in metrics.items():
        self._writer.scalar(f'{prefix}/{name}', value, step)
      self._writer.flush()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    if self._writer:
      self._writer.close()


class PreemptionWatcher:
  """Turns SIGTERM into a checkpoint at a step every process agrees on."""

  def __init__(self):
    self._signalled = False
    self._previous = None

  def __enter__(self):
    if jax.process_count() == 1:  # jax.distributed watches SIGTERM itself.
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc):
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


class Progress:
  """Progress lines (steps/s, images/s, ETA) and the non-finite loss check."""

  def __init__(self, total_steps: int, batch_size: int, writer: MetricWriter):
    self._total, self._batch, self._writer = total_steps, batch_size, writer
    self._start = self._last_time = time.time()
    self._last_step = None
    self._last_finite: tuple[int, dict[str, float]] | None = None
    self._skipped = 0
    self._history: list[tuple[int, float]] = []  # (step, loss) as logged

  def check_finite(self, step: int, metrics, mode: str,
                   ckpt) -> dict[str, float]:
    """The step's metrics on the host; raises NonFiniteLossError per `mode`."""
    values = {k: np.asarray(v).item() for k, v in jax.device_get(metrics).items()}
    if values.pop('finite'):
      self._last_finite = (step, values)
      return values
    if mode == 'skip':
      self._skipped += 1
      logging.warning('Step %d: non-finite loss/gradients (%s); update skipped '
                      '(%d so far).', step, values, self._skipped)
      return values
    last = (f'step {self._last_finite[0]}: {self._last_finite[1]}'
            if self._last_finite else 'none')
    ckpt.wait_until_finished()  # the save in flight is a good one: keep it
    raise NonFiniteLossError(
        f'Non-finite loss, gradients or update at step {step} ({values}). '
        'Last finite '
        f'metrics: {last}. Last good checkpoint: step {ckpt.latest_step()} '
        '(kept). Lower the learning rate, add grad_clip_norm, or set '
        "config.on_nonfinite='skip' to skip such steps.")

  def log(self, step: int, values: dict[str, float]) -> None:
    """Logs and writes the host metrics that `check_finite` returned."""
    values = dict(values)
    self._history.append((step, values['loss']))
    now = time.time()
    if self._last_step is not None:
      steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
      values['steps_per_s'] = steps_per_s
      values['images_per_s'] = steps_per_s * self._batch
      eta = time.strftime('%H:%M:%S', time.gmtime(
          (self._total - step) / max(steps_per_s, 1e-9)))
      speed = (f'{steps_per_s:.2f} steps/s  {values["images_per_s"]:.0f} '
               f'img/s  ETA {eta}')
    else:  # no rate yet: the time so far is mostly compiling
      speed = ('speed and ETA from the next line on (this one includes '
               'compiling)')
    self._last_step, self._last_time = step, now
    logging.info('step %d/%d  loss %.4f  lr %.3g  %s', step, self._total,
                 values['loss'], values['learning_rate'], speed)
    self._writer.write(step, values, 'train')

  def summary(self) -> dict[str, Any]:
    return {'train_loss': self._history[-1][1] if self._history else math.nan,
            'train_loss_history': self._history,
            'skipped_steps': self._skipped,
            'wall_time_s': time.time() - self._start}
