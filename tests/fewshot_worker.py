"""One run of few-shot evaluation of a fixed tiny model on CIFAR-10 slices.

Usage: python fewshot_worker.py TFDS_DATA_DIR [PROCESS_ID NUM_PROCESSES PORT]
Prints one JSON line: the results and the 3-shot subset's example indices,
labels and features, gathered and sorted by index (the same on every
process). Devices per process come from XLA_FLAGS.
"""
import json
import sys

import jax
import numpy as np


def main():
  data_dir, *distributed = sys.argv[1:]
  if distributed:
    pid, nproc, port = distributed
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=int(nproc),
                               process_id=int(pid))
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import fewshot as linear  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  from vit_jax.training import fewshot  # pylint: disable=g-import-not-at-top
  model = models.create_model('ViT-Ti_16', 10, num_layers=1, hidden_size=32,
                              mlp_dim=64, num_heads=2, patch_size=8)
  params = jax.jit(model.init)(jax.random.key(0),
                               np.zeros((1, 32, 32, 3)))['params']
  evaluator = fewshot.FewShotEvaluator(
      model, mesh.create_mesh(), datasets=['cifar10'], batch_size=24,
      image_size=(32, 32), shots=[1, 3], train_split='train[:600]',
      test_split='test[:100]', data_dir=data_dir)
  x, y, index = linear.collect(evaluator._features, params,  # pylint: disable=protected-access
                               evaluator.tasks[0].train, ('label', 'index'))
  order = np.argsort(index)
  print(json.dumps({'devices': jax.device_count(),
                    'processes': jax.process_count(),
                    'results': evaluator(params),
                    'index': index[order].tolist(),
                    'labels': y[order].tolist(),
                    'features': x[order].tolist()}))


if __name__ == '__main__':
  main()
