"""Few-shot linear evaluation: the solver, the subsets, the mesh, the trainer
and the evaluate program."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from vit_jax.evaluation import fewshot

import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


def clusters(num_classes, per_class, dim, spread, rng, centres=None):
  if centres is None:
    centres = rng.normal(size=(num_classes, dim)) * 10
  labels = np.repeat(np.arange(num_classes), per_class)
  points = centres[labels] + spread * rng.normal(size=(len(labels), dim))
  return (points, labels), centres


@pytest.mark.parametrize('dim', [24, 300])  # N >= D and N < D solves
def test_separable_clusters_are_classified_perfectly(dim):
  rng = np.random.default_rng(0)
  train, centres = clusters(10, 5, dim, 0.5, rng)
  test, _ = clusters(10, 50, dim, 0.5, rng, centres)
  assert fewshot.accuracy(train, test, 10) == 1.0


def test_random_labels_stay_near_chance():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2250, 64))
  y = rng.integers(0, 10, size=2250)
  accuracy = fewshot.accuracy((x[:250], y[:250]), (x[250:], y[250:]), 10)
  # Chance 0.1; 2000 test points: binomial std 0.0067, six of them allowed.
  assert abs(accuracy - 0.1) < 0.04, accuracy


@pytest.mark.parametrize('n,d', [(20, 50), (200, 30)])
def test_the_closed_form_is_the_ridge_solution(n, d):
  rng = np.random.default_rng(0)
  features, labels = rng.normal(size=(n, d)) * 3 + 1, rng.integers(0, 4, n)
  linear = fewshot.fit(features, labels, 4, l2_reg=7.0)
  x = (features - features.mean(0)) / (features.std(0) + 1e-5)
  x = np.concatenate([x, np.full((n, 1), fewshot.BIAS)], 1)
  y = 2 * np.eye(4)[labels] - 1
  # The minimiser of |xw - y|^2 + 7 |w|^2, from its normal equations.
  expected = np.linalg.solve(x.T @ x + 7.0 * np.eye(d + 1), x.T @ y)
  np.testing.assert_allclose(linear.weights, expected, rtol=1e-6, atol=1e-9)


def test_subsets_are_balanced_deterministic_and_nested():
  labels = np.random.default_rng(0).integers(0, 5, size=500)
  one = fewshot.select_shots(labels, 1, 5, seed=3)
  five = fewshot.select_shots(labels, 5, 5, seed=3)
  assert np.array_equal(five, fewshot.select_shots(labels, 5, 5, seed=3))
  assert np.bincount(labels[five], minlength=5).tolist() == [5] * 5
  assert np.bincount(labels[one], minlength=5).tolist() == [1] * 5
  assert set(one) <= set(five) and len(set(five)) == 25
  assert not np.array_equal(five, fewshot.select_shots(labels, 5, 5, seed=4))
  with pytest.raises(ValueError, match=r'classes have fewer: 4 \(0\)'):
    fewshot.select_shots(labels[labels < 4], 2, 5, seed=0)


def test_non_finite_features_are_refused():
  x = np.ones((4, 3))
  x[1, 1] = np.nan
  with pytest.raises(ValueError, match='not all finite'):
    fewshot.fit(x, np.arange(4) % 2, 2)


WORKER = pathlib.Path(__file__).with_name('fewshot_worker.py')


def _worker_env(devices):
  return {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONWARNINGS': 'ignore',
          'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}


def _one_process(data_dir, devices):
  out = subprocess.run([sys.executable, str(WORKER), data_dir], cwd=REPO,
                       env=_worker_env(devices), capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return _result(out.stdout)


def _result(output: str) -> dict:
  return json.loads([l for l in output.splitlines() if l.startswith('{')][-1])


def _assert_same(run, reference):
  assert run['index'] == reference['index']
  assert run['labels'] == reference['labels']
  np.testing.assert_allclose(run['features'], reference['features'],
                             rtol=1e-5, atol=1e-5)
  assert run['results'] == reference['results']


def test_one_device_eight_devices_and_two_processes_agree(tfds_data_dir):
  one, eight = _one_process(tfds_data_dir, 1), _one_process(tfds_data_dir, 8)
  assert (one['devices'], eight['devices']) == (1, 8)
  # The 3-shot subset: 30 distinct examples, 3 per class, no padding rows.
  assert len(one['index']) == len(set(one['index'])) == 30
  assert np.bincount(one['labels']).tolist() == [3] * 10
  assert sorted(one['results']) == ['fewshot_cifar10_1shot',
                                    'fewshot_cifar10_3shot']
  _assert_same(eight, one)
  port = runs.free_port()
  procs = [runs.start([sys.executable, str(WORKER), tfds_data_dir, str(i), '2',
                       str(port)], env=_worker_env(4)) for i in range(2)]
  outputs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[-2000:] for o in outputs]
  for output in outputs:  # each process holds the whole, gathered result
    run = _result(output)
    assert (run['devices'], run['processes']) == (8, 2)
    _assert_same(run, one)


def _event_tags(workdir: pathlib.Path) -> set[str]:
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tags = set()
  for path in workdir.glob('events.out.tfevents.*'):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      tags.update(v.tag for v in event.summary.value)
  return tags


def test_the_trainer_evaluates_few_shot_and_the_program_agrees(
    tfds_data_dir, tmp_path):
  from vit_jax.training import trainer  # pylint: disable=g-import-not-at-top
  splits = {'fewshot.train_split': 'train[:500]',
            'fewshot.test_split': 'test[:200]'}
  config = runs.tiny_config(
      tfds_data_dir, total_steps=4, eval_every=2,
      **{'fewshot.datasets': 'cifar10', 'fewshot.shots': '1,2', **splits})
  result = trainer.train_and_evaluate(config, tmp_path / 'run')
  keys = ('eval_fewshot_cifar10_1shot', 'eval_fewshot_cifar10_2shot')
  assert all(0 <= result[k] <= 1 for k in keys), result
  saved = json.loads((tmp_path / 'run' / 'metrics.json').read_text())
  assert [saved[k] for k in keys] == [result[k] for k in keys]
  # At each evaluation (steps 2 and 4), beside the classification metrics.
  assert [step for step, m in saved['eval_history']
          if 'fewshot_cifar10_2shot' in m and 'accuracy' in m] == [2, 4]
  assert {'eval/fewshot_cifar10_1shot', 'eval/fewshot_cifar10_2shot',
          'eval/accuracy'} <= _event_tags(tmp_path / 'run')

  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.evaluate', f'--model={tmp_path / "run"}',
       '--fewshot=cifar10', '--shots=1,2', '--train_split=train[:500]',
       '--test_split=test[:200]', f'--data_dir={tfds_data_dir}',
       f'--output={tmp_path / "eval"}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.splitlines()[0] == (
      f'cifar10_1shot  {100 * result[keys[0]]:.2f} %')
  metrics = json.loads((tmp_path / 'eval' / 'metrics.json').read_text())
  assert metrics['fewshot_cifar10_2shot'] == pytest.approx(result[keys[1]])


@pytest.mark.parametrize('args,message', [
    (['--fewshot=cifar10', '--shots=0'], 'must be integers >= 1'),
    (['--fewshot=cifar10', '--shots=1', '--train_split=train[:5]'],
     'classes have fewer'),
    (['--fewshot=no_such_dataset'], 'no_such_dataset'),
    (['--shots=5', 'somewhere'], '--shots applies to --fewshot only'),
])
def test_the_program_refuses_bad_few_shot_requests_in_one_line(
    tfds_data_dir, tmp_path, args, message):
  from vit_jax import checkpoint, models  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  model = models.create_model('ViT-Ti_16', 10, num_layers=1, hidden_size=32,
                              mlp_dim=64, num_heads=2, patch_size=8)
  params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 32, 32, 3)))
  checkpoint.save_npz(tmp_path / 'tiny.npz', params['params'])
  out = subprocess.run(
      [sys.executable, '-m', 'vit_jax.evaluate', f'--model={tmp_path}/tiny.npz',
       '--model_name=ViT-Ti_16', f'--data_dir={tfds_data_dir}', *args],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 2, out.stderr[-2000:]
  assert out.stderr.startswith('error: ') and message in out.stderr, (
      out.stderr[-2000:])
