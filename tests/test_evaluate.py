"""python -m vit_jax.evaluate: the trainer's numbers, on TFDS splits and folders."""
import json
import subprocess
import sys

import numpy as np
import pytest

import runs
from vit_jax.sources import export
from vit_jax import sources
from vit_jax.training import trainer


@pytest.fixture(scope='module')
def trained(tfds_data_dir, tmp_path_factory):
  """A 6-step tiny run evaluated by the trainer on test[:200]."""
  workdir = tmp_path_factory.mktemp('trained')
  result = trainer.train_and_evaluate(runs.tiny_config(tfds_data_dir),
                                      workdir)
  return workdir, result


@pytest.fixture(scope='module')
def png_folder(tfds_data_dir, tmp_path_factory):
  """The same 200 test images as lossless PNGs in <class>/ folders."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('cifar_test')
  names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
           'horse', 'ship', 'truck']
  for name in names:
    (root / name).mkdir()
  for i, ex in enumerate(tfds.as_numpy(tfds.load(
      'cifar10', split='test[:200]', data_dir=tfds_data_dir,
      download=False))):
    Image.fromarray(ex['image']).save(root / names[ex['label']] / f'{i}.png')
  return root


def _evaluate(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'vit_jax.evaluate', *args],
                        cwd=runs.REPO, capture_output=True, text=True,
                        timeout=300)


def test_evaluate_equals_the_trainers_evaluation(trained, tfds_data_dir,
                                                 png_folder, tmp_path):
  workdir, result = trained
  out = tmp_path / 'tfds'
  tfds_run = _evaluate(f'--model={workdir}', 'tfds:cifar10:test[:200]',
                       f'--data_dir={tfds_data_dir}', '--batch_size=40',
                       f'--output={out}')
  assert tfds_run.returncode == 0, tfds_run.stderr
  metrics = json.loads((out / 'metrics.json').read_text())
  assert metrics['num_examples'] == result['eval_num_examples'] == 200
  assert metrics['accuracy'] == result['eval_accuracy']
  assert metrics['top5_accuracy'] == result['eval_top5_accuracy']
  assert metrics['loss'] == pytest.approx(result['eval_loss'], rel=1e-6)
  confusion = np.array(metrics['confusion_matrix'])
  assert confusion.sum() == 200
  assert np.trace(confusion) == round(200 * result['eval_accuracy'])
  assert (out / 'confusion_matrix.png').stat().st_size > 1000
  assert f'top-1 {100 * result["eval_accuracy"]:.2f} %' in tfds_run.stdout

  # The same images as PNG files, through the TF-free decoder, with model
  # code and through an export's StableHLO function: the same numbers.
  export.write_export(sources.from_workdir(workdir), tmp_path / 'export',
                      'tiny', platforms=('cpu',))
  for model in (workdir, tmp_path / 'export'):
    folder_out = tmp_path / f'folder_{model.name}'
    folder_run = _evaluate(f'--model={model}', str(png_folder),
                           '--batch_size=64', f'--output={folder_out}')
    assert folder_run.returncode == 0, folder_run.stderr
    folder = json.loads((folder_out / 'metrics.json').read_text())
    assert folder['num_examples'] == 200
    assert folder['confusion_matrix'] == metrics['confusion_matrix']
    assert folder['top5_accuracy'] == metrics['top5_accuracy']
    assert folder['loss'] == pytest.approx(metrics['loss'], rel=1e-5)
    assert folder['per_class_count'] == metrics['per_class_count']


def test_unreadable_files_are_named_and_left_out(trained, png_folder,
                                                 tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  workdir, _ = trained
  folder = tmp_path / 'folder'
  shutil.copytree(png_folder, folder)
  (folder / 'cat' / 'broken.png').write_bytes(b'\x89PNG not really')
  result = _evaluate(f'--model={workdir}', str(folder))
  assert result.returncode == 1
  assert f'error: {folder}/cat/broken.png: ' in result.stderr
  assert result.stderr.strip().endswith(
      'error: 1 file(s) could not be read and were left out.')
  assert '(200 examples)' in result.stdout


@pytest.mark.parametrize('args,message', [
    ([], 'name one image folder or tfds:NAME[:SPLIT]'),
    (['{folder}', '--data_dir=/x'], '--data_dir applies to tfds:... only'),
    (['{odd}'], "has 1 of 2 class folders that are not among the model's 10 "
     'label names (koala)'),
    (['tfds:cifar10:tset'], "Unknown or invalid split 'tset'"),
    (['/nonexistent'], '/nonexistent is not a folder'),
], ids=['no-data', 'data-dir', 'classes', 'split', 'missing'])
def test_usage_errors_exit_2(trained, png_folder, tfds_data_dir, tmp_path,
                             args, message):
  workdir, _ = trained
  odd = tmp_path / 'odd'
  for name in ('dog', 'koala'):
    (odd / name).mkdir(parents=True)
    (odd / name / 'x.png').write_bytes(
        (next(png_folder.glob('dog/*.png'))).read_bytes())
  args = [a.format(folder=png_folder, odd=odd) for a in args]
  if any(a.startswith('tfds:') for a in args):
    args.append(f'--data_dir={tfds_data_dir}')
  result = _evaluate(f'--model={workdir}', *args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: ') and message in result.stderr
  assert 'Traceback' not in result.stderr
