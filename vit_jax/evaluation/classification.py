"""Classification metrics over a whole split, every example counted once.

The trainer's evaluation and `python -m vit_jax.evaluate` both reduce each
padded, masked batch of logits with `batch_sums` (inside the trainer's
jitted eval step) and add the sums up with `run`, so they report the same
numbers for the same split and parameters: top-1 and top-5 accuracy, mean
loss, per-class accuracy and the confusion matrix (rows: true class,
columns: predicted).
"""
from collections.abc import Callable, Iterable
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with (soft) one-hot labels."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def batch_sums(logits: jax.Array, labels: jax.Array, mask: jax.Array
               ) -> dict[str, jax.Array]:
  """Sums over the unmasked examples: correct (top-1, top-5), loss, count,
  and the confusion counts [true, predicted]."""
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.float32)
  predicted = jnp.argmax(logits, -1)
  top5 = jnp.any(jax.lax.top_k(logits, min(5, num_classes))[1]
                 == labels[:, None], axis=-1)
  loss = cross_entropy(logits, jax.nn.one_hot(labels, num_classes))
  pairs = labels * num_classes + predicted
  confusion = jnp.zeros(num_classes * num_classes, jnp.int32).at[pairs].add(
      mask.astype(jnp.int32)).reshape(num_classes, num_classes)
  return {'correct': jnp.sum((predicted == labels) & mask, dtype=jnp.int32),
          'correct_top5': jnp.sum(top5 & mask, dtype=jnp.int32),
          'count': jnp.sum(mask, dtype=jnp.int32),
          'loss_sum': jnp.sum(jnp.where(mask, loss, 0.0)),
          'confusion': confusion}

_LOG_EVERY_S = 30  # an evaluation progress line at most this often


def run(eval_step: Callable[[Any, Any], dict[str, jax.Array]], params: Any,
        batches: Iterable[Any], num_batches: int | None = None
        ) -> dict[str, Any]:
  """Sums of `eval_step(params, batch)` (`batch_sums`) over `batches`, numpy."""
  totals: dict[str, Any] = {}
  start = last = time.time()
  for i, batch in enumerate(batches):
    sums = jax.device_get(eval_step(params, batch))
    for key, value in sums.items():
      totals[key] = totals.get(key, 0) + np.asarray(value)
    if time.time() - last > _LOG_EVERY_S:
      last = time.time()
      logging.info('evaluating: %d%s batches (%.0f s)', i + 1,
                   f'/{num_batches}' if num_batches else '', last - start)
  return totals


def summarize(totals: dict[str, Any],
              label_names: list[str] | None = None) -> dict[str, Any]:
  """Metrics from `run`'s sums: scalars plus per-class accuracy and confusion."""
  count = int(totals.get('count', 0))
  denominator = max(count, 1)
  confusion = np.asarray(totals['confusion'], np.int64)
  per_class_count = confusion.sum(axis=1)
  per_class = np.where(per_class_count > 0,
                       np.diag(confusion) / np.maximum(per_class_count, 1),
                       np.nan)
  names = label_names or [str(i) for i in range(len(confusion))]
  return {
      'accuracy': int(totals['correct']) / denominator,
      'top5_accuracy': int(totals['correct_top5']) / denominator,
      'loss': float(totals['loss_sum']) / denominator,
      'num_examples': count,
      'per_class_accuracy': {name: (None if np.isnan(a) else float(a))
                             for name, a in zip(names, per_class)},
      'per_class_count': {name: int(n)
                          for name, n in zip(names, per_class_count)},
      'confusion_matrix': confusion.tolist(),
  }


SCALARS = ('accuracy', 'top5_accuracy', 'loss', 'num_examples')


def scalars(metrics: dict[str, Any]) -> dict[str, Any]:
  return {k: metrics[k] for k in SCALARS}
