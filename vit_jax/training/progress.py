"""What a person watching a run sees: progress lines, summaries, the history.

Each step's metrics reach the host one step late (so the device is never
idle waiting); `Progress.record` collects them, `log` prints the loss
averaged over the log window with steps/s, images/s and an ETA, and writes
TensorBoard scalars. The history (mean train loss per log window, every
evaluation) is saved in each checkpoint's meta, so a resumed run's history
covers the whole run.
"""
import datetime
import pathlib
import time
from typing import Any

from absl import logging
import numpy as np

from vit_jax.training import summaries


def duration(seconds: float) -> str:
  """'3d 04:05:06' / '04:05:06': an ETA that does not wrap after 24 hours."""
  seconds = max(int(round(seconds)), 0)
  days, rest = divmod(seconds, 86400)
  clock = str(datetime.timedelta(seconds=rest)).zfill(8)
  return f'{days}d {clock}' if days else clock


class MetricWriter:
  """TensorBoard summaries under workdir/ (only where `enabled`: process 0)."""

  def __init__(self, workdir: pathlib.Path, enabled: bool):
    self._writer = summaries.SummaryWriter(workdir) if enabled else None

  def write(self, step: int, metrics: dict[str, Any], prefix: str) -> None:
    if self._writer:
      for name, value in metrics.items():
        if np.ndim(value) == 0:
          self._writer.scalar(f'{prefix}/{name}', value, step)
      self._writer.flush()

  def __enter__(self) -> 'MetricWriter':
    return self

  def __exit__(self, *exc) -> None:
    if self._writer:
      self._writer.close()


class Progress:
  """Window-averaged progress lines, rates, ETA and the run's history."""

  def __init__(self, total_steps: int, batch_size: int, writer: MetricWriter,
               history: dict[str, list] | None = None):
    self._total, self._batch, self._writer = total_steps, batch_size, writer
    self._start = self._last_time = time.time()
    self._last_step = None
    self._window: list[dict[str, float]] = []
    history = history or {}
    self.train_history: list[list] = list(history.get('train', []))
    self.eval_history: list[list] = list(history.get('eval', []))

  def record(self, values: dict[str, float]) -> None:
    """One step's host metrics (for the next log line's averages)."""
    self._window.append(values)

  def log(self, step: int) -> dict[str, float]:
    """Logs and writes the window's means; returns them."""
    window, self._window = self._window, []
    means = {k: float(np.mean([v[k] for v in window])) for k in window[-1]}
    means['learning_rate'] = window[-1]['learning_rate']
    self.train_history.append([step, means['loss']])
    now = time.time()
    if self._last_step is not None:
      steps_per_s = (step - self._last_step) / max(now - self._last_time, 1e-9)
      means['steps_per_s'] = steps_per_s
      means['images_per_s'] = steps_per_s * self._batch
      eta = duration((self._total - step) / max(steps_per_s, 1e-9))
      speed = (f'{steps_per_s:.2f} steps/s  {means["images_per_s"]:.0f} '
               f'img/s  ETA {eta}')
    else:  # no rate yet: the time so far includes compiling
      speed = 'speed and ETA from the next line on'
    self._last_step, self._last_time = step, now
    logging.info('step %d/%d  loss %.4f (mean of %d)  lr %.3g  %s', step,
                 self._total, means['loss'], len(window),
                 means['learning_rate'], speed)
    self._writer.write(step, means, 'train')
    return means

  def evaluated(self, step: int, metrics: dict[str, Any]) -> None:
    scalars = {k: v for k, v in metrics.items() if np.ndim(v) == 0}
    self.eval_history.append([step, scalars])
    self._writer.write(step, scalars, 'eval')

  def history(self) -> dict[str, list]:
    """What each checkpoint stores and metrics.json reports."""
    return {'train': self.train_history, 'eval': self.eval_history}

  def summary(self) -> dict[str, Any]:
    last = self.train_history[-1][1] if self.train_history else None
    return {'train_loss': last,
            'train_loss_history': self.train_history,
            'eval_history': self.eval_history,
            'wall_time_s': time.time() - self._start}


def result_line(result: dict[str, Any]) -> str:
  """The final result as one line a person reads."""
  parts = [f'step {result["step"]}']
  if result.get('eval_accuracy') is not None:
    parts.append(f'eval top-1 {100 * result["eval_accuracy"]:.2f} %')
  if result.get('eval_top5_accuracy') is not None:
    parts.append(f'top-5 {100 * result["eval_top5_accuracy"]:.2f} %')
  if result.get('eval_loss') is not None:
    parts.append(f'eval loss {result["eval_loss"]:.4f}')
  if result.get('eval_masked_patch_loss') is not None:
    parts.append(f'masked patch loss {result["eval_masked_patch_loss"]:.4f}')
  if result.get('eval_masked_patch_accuracy') is not None:
    parts.append('masked patch accuracy '
                 f'{100 * result["eval_masked_patch_accuracy"]:.2f} %')
  if result.get('eval_num_examples') is not None:
    parts.append(f'on {result["eval_num_examples"]:,} examples')
  if result.get('train_loss') is not None:
    parts.append(f'train loss {result["train_loss"]:.4f}')
  parts += [f'{k.removeprefix("eval_fewshot_")} {100 * v:.2f} %'
            for k, v in result.items() if k.startswith('eval_fewshot_')]
  return ', '.join(parts)
