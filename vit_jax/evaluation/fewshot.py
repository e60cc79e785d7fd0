"""Few-shot linear evaluation: the paper's quick measure of a representation.

Frozen features of `shots` training images per class are mapped to
{-1, 1}^K targets by regularised least squares, solved in closed form, and
the map's argmax is scored on a test split (arXiv 2010.11929, section 4.1:
"few-shot accuracies are obtained by solving a regularized least-squares
regression problem ... exact solution in closed form"). The paper gives no
regulariser; we follow big_vision's `fewshot_lsr` evaluator, which Google's
later ViT work reports with:
  * features: the model's pre-logits (what its head reads), standardised by
    the few-shot set's own mean and std (+1e-5), the test set by the same;
  * a constant bias column of 100, so the bias is almost unregularised;
  * one fixed L2 strength, 2^10, for every dataset and shot count;
  * subsets: per class, a permutation seeded by `seed` and its first
    `shots` members, so for one seed the 1-shot set is inside the 5-shot set.
Solved in float64 on the host through the smaller Gram matrix (N x N for
N < D examples, else D x D), and predicted in chunks: memory stays
O(N*D + D*K + chunk*D) however large the test split or K.
"""
import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

SHOTS = (1, 5, 10, 25)
L2_REG = 2.0 ** 10
BIAS = 100.0
_CHUNK = 4096  # test rows predicted at a time


def parse_shots(text: str) -> tuple[int, ...]:
  """'1, 5,10' -> (1, 5, 10): the shot counts of a config field or flag."""
  parts = [part.strip() for part in str(text).split(',') if part.strip()]
  if not parts or not all(p.isdigit() and int(p) >= 1 for p in parts):
    raise ValueError('must be integers >= 1, comma-separated, e.g. '
                     '1,5,10,25.')
  return tuple(int(p) for p in parts)


def select_shots(labels: np.ndarray, shots: int, num_classes: int,
                 seed: int) -> np.ndarray:
  """Sorted indices of `shots` examples of each class of `labels`.

  Deterministic in `seed`; nested in `shots` for one seed. ValueError naming
  the classes that have fewer than `shots` examples.
  """
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen, short = [], []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < shots:
      short.append(f'{c} ({len(members)})')
    chosen.append(rng.permutation(members)[:shots])
  if short:
    raise ValueError(
        f'{shots}-shot needs {shots} examples of every class; '
        f'{len(short)} of {num_classes} classes have fewer: '
        f'{", ".join(short[:5])}{", ..." if len(short) > 5 else ""}; use a '
        'larger train split or fewer shots.')
  return np.sort(np.concatenate(chosen))


@dataclasses.dataclass(frozen=True)
class LinearMap:
  """A fitted few-shot map: standardisation, then [x, BIAS] @ weights."""
  mean: np.ndarray
  std: np.ndarray
  weights: np.ndarray  # [D + 1, K]

  def predict(self, features: np.ndarray) -> np.ndarray:
    """Predicted classes of `features` [n, D]."""
    out = np.empty(len(features), np.int64)
    for start in range(0, len(features), _CHUNK):
      x = self._design(features[start:start + _CHUNK])
      out[start:start + _CHUNK] = np.argmax(x @ self.weights, axis=1)
    return out

  def _design(self, features: np.ndarray) -> np.ndarray:
    x = (np.asarray(features, np.float64) - self.mean) / self.std
    return np.concatenate([x, np.full((len(x), 1), BIAS)], axis=1)


def fit(features: np.ndarray, labels: np.ndarray, num_classes: int,
        l2_reg: float = L2_REG) -> LinearMap:
  """The regularised least-squares map of `features` [N, D] to {-1, 1}^K."""
  features = np.asarray(features, np.float64)
  if not np.all(np.isfinite(features)):
    raise ValueError('Few-shot features are not all finite: the model '
                     'produces NaN or inf on these images.')
  mean = features.mean(axis=0)
  std = features.std(axis=0) + 1e-5
  linear = LinearMap(mean, std, np.zeros(0))
  x = linear._design(features)  # pylint: disable=protected-access
  y = 2.0 * np.eye(num_classes)[np.asarray(labels)] - 1.0
  n, d = x.shape
  if n < d:  # W = X^T (X X^T + l I)^-1 Y
    weights = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), y)
  else:  # W = (X^T X + l I)^-1 X^T Y
    weights = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ y)
  return dataclasses.replace(linear, weights=weights)


def accuracy(train: tuple[np.ndarray, np.ndarray],
             test: tuple[np.ndarray, np.ndarray], num_classes: int,
             l2_reg: float = L2_REG) -> float:
  """Test accuracy of the map fitted on train (features, labels)."""
  linear = fit(*train, num_classes, l2_reg)
  return float(np.mean(linear.predict(test[0]) == np.asarray(test[1])))


def collect(features_fn: Callable[[Any, jax.Array], jax.Array], params: Any,
            batches: Iterable[dict[str, Any]], fields: tuple[str, ...] = (
                'label',)) -> tuple[np.ndarray, ...]:
  """(features, *fields) of every unmasked example of padded global batches,
  numpy on every process (gathered across processes; each example once)."""
  parts = []
  for batch in batches:
    out = {'features': features_fn(params, batch['image']), 'mask':
           batch['mask'], **{f: batch[f] for f in fields}}
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
    out = jax.device_get(out)
    keep = np.asarray(out['mask'])
    parts.append([np.asarray(out[k])[keep] for k in ('features', *fields)])
  if not parts:
    raise ValueError('No batches to compute few-shot features from.')
  return tuple(np.concatenate(column) for column in zip(*parts))
