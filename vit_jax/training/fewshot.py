"""Few-shot linear evaluation of a model on datasets, on its device mesh.

`FewShotEvaluator` reads each dataset's training labels once (no image is
decoded), picks the class-balanced subsets of `evaluation.fewshot` (seeded,
nested in the shot count), and at each call computes the pre-logits features
of the largest subset and of the test split on the mesh through the
evaluation pipeline (every example once, on any number of devices and
processes), then fits and scores one map per shot count. The trainer runs
it per `config.fewshot`; `python -m vit_jax.evaluate --fewshot=...` on a
saved model.
"""
import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from vit_jax import models
from vit_jax.data import pipeline
from vit_jax.evaluation import fewshot
from vit_jax.parallel import mesh as mesh_lib


def features_fn(model: models.VisionTransformer, mesh: jax.sharding.Mesh):
  """Jitted (params, images in [-1, 1]) -> pre-logits features (the head's
  input), the head's params ignored."""
  body = model.clone(num_classes=0)

  def features(params: Any, images: jax.Array) -> jax.Array:
    params = {k: v for k, v in params.items() if k != 'head'}
    return body.apply({'params': params}, images, train=False)

  return jax.jit(mesh_lib.on_mesh(features, mesh))


def metric_name(dataset: str, shots: int) -> str:
  """'fewshot_cifar10_10shot': the dataset name as a metric-name word."""
  word = re.sub(r'[^A-Za-z0-9]+', '_', dataset).strip('_')
  return f'fewshot_{word}_{shots}shot'


@dataclasses.dataclass(frozen=True)
class _Task:
  dataset: str
  num_classes: int
  subsets: dict[int, np.ndarray]  # shots -> sorted example indices
  train: pipeline.EvalIterable  # the largest subset's examples
  test: pipeline.EvalIterable


class FewShotEvaluator:
  """`evaluator(params)` -> {metric_name(dataset, shots): test accuracy}."""

  def __init__(self, model: models.VisionTransformer,
               mesh: jax.sharding.Mesh, *, datasets: Sequence[str],
               batch_size: int, image_size: tuple[int, int],
               shots: Sequence[int] = fewshot.SHOTS, seed: int = 0,
               l2_reg: float = fewshot.L2_REG, train_split: str | None = None,
               test_split: str | None = None, data_dir: str | None = None,
               manual_dir: str | None = None, resize: str = 'resize'):
    if not datasets or not shots or min(shots) < 1:
      raise ValueError(f'Few-shot evaluation needs datasets and shot counts '
                       f'>= 1, got datasets={list(datasets)}, '
                       f'shots={list(shots)}.')
    self.l2_reg = l2_reg
    self._features = features_fn(model, mesh)
    sharding = mesh_lib.batch_sharding(mesh)
    read = dict(data_dir=data_dir, manual_dir=manual_dir,
                global_batch_size=batch_size, image_size=image_size,
                sharding=sharding, resize=resize)
    self.tasks = []
    for dataset in datasets:
      labels, num_classes, split = pipeline.split_labels(
          dataset, train_split, data_dir, manual_dir)
      subsets = {}
      for k in sorted(set(shots)):
        try:
          subsets[k] = fewshot.select_shots(labels, k, num_classes, seed)
        except ValueError as e:
          raise ValueError(f'{dataset} {split}: {e}') from None
      self.tasks.append(_Task(
          dataset, num_classes, subsets,
          train=pipeline.eval_iterator(dataset, split=split,
                                       examples=subsets[max(subsets)], **read),
          test=pipeline.eval_iterator(dataset, split=test_split, **read)))

  def __call__(self, params: Any) -> dict[str, float]:
    results = {}
    for task in self.tasks:
      x, y, index = fewshot.collect(self._features, params, task.train,
                                    ('label', 'index'))
      test = fewshot.collect(self._features, params, task.test)
      for k, subset in task.subsets.items():
        rows = np.isin(index, subset)
        results[metric_name(task.dataset, k)] = fewshot.accuracy(
            (x[rows], y[rows]), test, task.num_classes, self.l2_reg)
    return results


def from_config(config: ml_collections.ConfigDict, model, mesh,
                image_size: tuple[int, int]) -> FewShotEvaluator | None:
  """The evaluator `config.fewshot` asks for; None without datasets."""
  cfg = config.get('fewshot')
  datasets = parse_list(cfg.datasets) if cfg else []
  if not datasets:
    return None
  return FewShotEvaluator(
      model, mesh, datasets=datasets, batch_size=config.eval_batch_size,
      image_size=image_size, shots=fewshot.parse_shots(cfg.shots),
      seed=cfg.seed, l2_reg=cfg.l2_reg, train_split=cfg.train_split or None,
      test_split=cfg.test_split or None, data_dir=config.data_dir or None,
      manual_dir=config.manual_dir or None, resize=config.eval_resize)


def parse_list(value: str) -> list[str]:
  """'a, b,' -> ['a', 'b'] (config and flag lists are comma strings)."""
  return [part.strip() for part in str(value).split(',') if part.strip()]
