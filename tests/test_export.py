"""Export: every format reloads to the source's logits; the card; the CLI."""
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from configs import pretrain
from vit_jax import checkpoint
from vit_jax import export
from vit_jax import images
from vit_jax import model_sources
from vit_jax import models
from vit_jax import npz_layout
from vit_jax import posemb
from vit_jax import serving

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY_MODEL = dict(num_layers=1, hidden_size=32, mlp_dim=64, num_heads=2)
# A tiny model on a slice of real CIFAR-10 (as tests/test_train.py), with
# scanned layers so that the export has to unroll them.
TINY_TRAINING = {
    **{f'model.{k}': v for k, v in TINY_MODEL.items()},
    'model.patch_size': 8, 'model.scan_layers': True,
    'train_split': 'train[:1%]', 'eval_split': 'test[:40]', 'batch_size': 16,
    'eval_batch_size': 40, 'total_steps': 4, 'log_every': 1,
    'checkpoint_every': 2, 'schedule.warmup_steps': 1,
    'optimizer.learning_rate': 0.03,
}
# Google's original names for a 1-layer model, written out independently.
GOOGLE_KEYS = {'cls', 'embedding/bias', 'embedding/kernel', 'head/bias',
               'head/kernel', 'Transformer/posembed_input/pos_embedding',
               'Transformer/encoder_norm/bias', 'Transformer/encoder_norm/scale'
               } | {f'Transformer/encoderblock_0/{k}' for k in (
                   'LayerNorm_0/bias', 'LayerNorm_0/scale', 'LayerNorm_2/bias',
                   'LayerNorm_2/scale', 'MlpBlock_3/Dense_0/bias',
                   'MlpBlock_3/Dense_0/kernel', 'MlpBlock_3/Dense_1/bias',
                   'MlpBlock_3/Dense_1/kernel')} | {
                       f'Transformer/encoderblock_0/MultiHeadDotProductAttention_1/{m}/{p}'
                       for m in ('query', 'key', 'value', 'out')
                       for p in ('kernel', 'bias')}


def tiny_config(data_dir: str, **overrides):
  config = pretrain.get_config('cifar10_quick')
  for key, value in {**TINY_TRAINING, 'data_dir': data_dir,
                     **overrides}.items():
    *parents, leaf = key.split('.')
    node = config
    for parent in parents:
      node = node[parent]
    node[leaf] = value
  return config


def random_params(model, size, seed=0):
  """Random params (the zero-initialised head would make logits trivial)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *size, 3)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: rng.normal(0, 0.2, x.shape).astype(x.dtype),
                      shapes)


def photo_pixels(folder: pathlib.Path, size, n=5) -> np.ndarray:
  """Real photos as the exported function takes them: [n, size, 3] 0..255."""
  files = sorted(folder.glob('*.JPEG'))[:n]
  return np.stack([images.eval_pixels(images.load_rgb(f), size)
                   for f in files])


def run_serving(card_path, pixels: np.ndarray, tmp_path) -> np.ndarray:
  """Logits of the StableHLO export in a process without model code."""
  np.save(tmp_path / 'pixels.npy', pixels)
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      from vit_jax import serving
      model = serving.load({str(card_path)!r})
      pixels = np.load({str(tmp_path / 'pixels.npy')!r})
      logits = [model(pixels[:2]), model(pixels)]  # two batch sizes
      for module in ('vit_jax.models', 'flax', 'tensorflow'):
        assert module not in sys.modules, module
      np.save({str(tmp_path / 'logits.npy')!r}, np.concatenate(logits))
  """)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  logits = np.load(tmp_path / 'logits.npy')
  # Batch size changes the compiled code, hence float rounding, not more.
  np.testing.assert_allclose(logits[:2], logits[2:4], rtol=1e-5, atol=1e-6)
  return logits[2:]


@pytest.fixture(scope='module')
def workdir(tfds_data_dir, tmp_path_factory):
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('workdir')
  train.train_and_evaluate(tiny_config(tfds_data_dir), str(path))
  return path


@pytest.fixture(scope='module')
def tiny_npz(tmp_path_factory):
  """A randomised 1000-class tiny ViT at 64px, as Google's npz."""
  model = models.create_model('ViT-Ti_16', 1000, **TINY_MODEL)
  params = random_params(model, (64, 64))
  path = tmp_path_factory.mktemp('npz') / 'tiny.npz'
  checkpoint.save_npz(path, params)
  return path, model, params


def test_workdir_export_reloads_with_the_same_logits_in_every_format(
    workdir, imagenet_samples, tmp_path):
  from vit_jax import workdir as vit_workdir  # pylint: disable=g-import-not-at-top
  trained = vit_workdir.load_workdir(workdir)
  assert 'encoderblock' in trained.params['Transformer']  # scanned
  pixels = photo_pixels(imagenet_samples, trained.image_size)
  expected = np.asarray(trained.model.apply(
      {'params': trained.params}, images.to_unit_range(pixels)))
  assert np.ptp(expected, axis=0).min() > 1e-3  # logits differ per image
  close = lambda a: np.testing.assert_allclose(a, expected, rtol=1e-5,
                                               atol=1e-6)

  card_path = export.export(model_sources.from_workdir(workdir), tmp_path,
                            'tiny')
  unrolled = trained.model.clone(scan_layers=False)
  close(unrolled.apply({'params': checkpoint.load_npz(tmp_path / 'tiny.npz')},
                       images.to_unit_range(pixels)))
  from_safetensors = model_sources.source_from_card(card_path)
  close(jax.jit(model_sources.logits_fn(from_safetensors.model))(
      from_safetensors.params, pixels))
  close(run_serving(card_path, pixels, tmp_path))

  # The npz in Google's original layout, the safetensors with its names.
  with np.load(tmp_path / 'tiny.npz') as npz:
    raw = dict(npz)
  assert set(raw) == GOOGLE_KEYS
  stored = safetensors.numpy.load_file(tmp_path / 'tiny.safetensors')
  assert set(stored) == GOOGLE_KEYS
  for key in GOOGLE_KEYS:
    np.testing.assert_array_equal(stored[key], raw[key])


def test_card_describes_the_workdir_model_and_checksums_its_params(
    workdir, tmp_path):
  card_path = export.export(model_sources.from_workdir(workdir, step=2),
                            tmp_path, 'step2', formats=('npz',))
  card = json.loads(card_path.read_text())
  assert card_path.name == 'step2.card.json'
  assert card['model']['name'] == 'ViT-Ti_16'
  options = card['model']['options']
  assert (options['hidden_size'], options['num_layers'],
          options['patch_size']) == (32, 1, [8, 8])
  assert options['dtype'] == 'float32' and not options['scan_layers']
  assert card['num_classes'] == 10
  assert card['label_names'][:3] == ['airplane', 'automobile', 'bird']
  assert card['image_size'] == [32, 32]
  assert card['preprocessing']['resize'] == 'resize'
  assert card['preprocessing']['value_range'] == [-1.0, 1.0]
  assert card['step'] == 2
  assert card['source']['checkpoint'] == str(workdir / 'checkpoints' / '2')
  assert card['files'] == {'npz': 'step2.npz'} and card['stablehlo'] is None
  with np.load(tmp_path / 'step2.npz') as npz:
    raw = dict(npz)
  assert card['params']['sha256'] == serving.params_checksum(raw)
  assert card['params']['count'] == sum(v.size for v in raw.values())
  latest = export.export(model_sources.from_workdir(workdir), tmp_path,
                         'latest', formats=('npz',))
  assert json.loads(latest.read_text())['step'] == 4
  assert json.loads(latest.read_text())['params']['sha256'] != (
      card['params']['sha256'])


def test_checksum_is_canonical_and_verified_on_load(tiny_npz, tmp_path):
  path, _, _ = tiny_npz
  source = model_sources.from_npz(path, 'ViT-Ti_16')
  card_path = export.export(source, tmp_path, 'tiny',
                            formats=('safetensors',))
  card = json.loads(card_path.read_text())
  flat = safetensors.numpy.load_file(tmp_path / 'tiny.safetensors')
  shuffled = dict(reversed(list(flat.items())))
  assert serving.params_checksum(shuffled) == card['params']['sha256']
  flat['head/bias'] = flat['head/bias'] + np.float32(1e-3)
  safetensors.numpy.save_file(flat, tmp_path / 'tiny.safetensors')
  with pytest.raises(ValueError, match=r'tiny\.safetensors have sha256 .* '
                     'the card says'):
    model_sources.source_from_card(card_path)


def test_npz_source_infers_the_architecture_and_bfloat16_export(
    tiny_npz, imagenet_samples, tmp_path):
  path, model, params = tiny_npz
  source = model_sources.from_npz(path, 'ViT-Ti_16')
  assert source.image_size == (64, 64) and source.model.num_classes == 1000
  assert (source.model.num_layers, source.model.hidden_size) == (1, 32)
  pixels = photo_pixels(imagenet_samples, (64, 64), n=4)
  f32 = np.asarray(model.apply({'params': params},
                               images.to_unit_range(pixels)))

  card_path = export.export(source, tmp_path, 'bf16', bfloat16=True)
  card = json.loads(card_path.read_text())
  assert card['params']['dtype'] == 'bfloat16'
  assert checkpoint.load_npz(tmp_path / 'bf16.npz')['cls'].dtype == (
      ml_dtypes.bfloat16)
  stored = safetensors.numpy.load_file(tmp_path / 'bf16.safetensors')
  assert {v.dtype for v in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
  # Served logits: those of float32 compute with the rounded weights.
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(
      np.float32), params)
  served = run_serving(card_path, pixels, tmp_path)
  np.testing.assert_allclose(served, model.apply(
      {'params': rounded}, images.to_unit_range(pixels)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(served, f32, atol=0.05 * np.abs(f32).max())


def test_npz_of_another_architecture_is_refused_naming_the_file(tiny_npz):
  path, _, _ = tiny_npz
  with pytest.raises(ValueError, match=r'tiny\.npz does not fit R50\+ViT-B_16'
                     r'.*params differ:\n  block1/unit1/conv1/kernel: file -, '
                     r'model \(1, 1, 64, 64\)'):
    model_sources.from_npz(path, 'R50+ViT-B_16')
  with pytest.raises(ValueError, match=r'--num_classes=10 but the head of '
                     r'.*tiny\.npz has 1000'):
    model_sources.from_npz(path, 'ViT-Ti_16', num_classes=10)


def test_npz_source_at_another_resolution_and_with_overrides(tiny_npz):
  path, _, params = tiny_npz
  pe = params['Transformer']['posembed_input']['pos_embedding']  # 1 + 4x4
  with pytest.raises(ValueError, match='params differ'):
    model_sources.from_npz(path, 'ViT-Ti_16', image_size=(48, 80))
  source = model_sources.from_npz(path, 'ViT-Ti_16', image_size=(48, 80),
                                  resize_posemb=True)
  assert source.image_size == (48, 80)
  np.testing.assert_array_equal(source.params[npz_layout.POSEMB],
                                posemb.interpolate_posemb(
                                    pe, (3, 5), num_prefix_tokens=1))
  logits = model_sources.logits_fn(source.model)(
      source.params, np.zeros((1, 48, 80, 3), np.float32))
  assert logits.shape == (1, 1000)
  # A grid of as many patches as stored is taken as the stored one.
  same = model_sources.from_npz(path, 'ViT-Ti_16', image_size=(32, 128),
                                resize_posemb=True)
  np.testing.assert_array_equal(same.params[npz_layout.POSEMB], pe)

  assert model_sources.parse_overrides(
      ['num_heads=4', 'classifier=gap', 'patch_size=(8, 8)']) == {
          'num_heads': 4, 'classifier': 'gap', 'patch_size': (8, 8)}
  with pytest.raises(ValueError, match="'num_heads' is not key=value"):
    model_sources.parse_overrides(['num_heads'])
  # Overrides win over the arrays (here wrongly), not over INFERENCE_OPTIONS.
  with pytest.raises(ValueError, match=r'query/kernel: file \(32, 2, 16\), '
                     r'model \(32, 4, 8\)'):
    model_sources.from_npz(path, 'ViT-Ti_16', overrides={'num_heads': 4})
  assert not model_sources.from_npz(
      path, 'ViT-Ti_16', overrides={'scan_layers': True}).model.scan_layers


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_export_cli_from_npz_with_imagenet_labels(tiny_npz, imagenet_samples,
                                                  tmp_path):
  path, _, _ = tiny_npz
  result = _cli('vit_jax.export', f'--npz={path}', '--model_name=ViT-Ti_16',
                f'--labels={imagenet_samples / "index_synset_name.tsv"}',
                '--eval_resize=resize_crop', f'--output={tmp_path}',
                '--platforms=cpu')
  assert result.returncode == 0, result.stderr
  assert 'ViT-Ti_16 (1000 classes, 64x64, step None)' in result.stdout
  assert 'tiny.stablehlo' in result.stdout and 'sha256' in result.stdout
  card = json.loads((tmp_path / 'tiny.card.json').read_text())
  assert card['label_names'][:2] == ['tench', 'goldfish']
  assert card['preprocessing'] == {**card['preprocessing'],
                                   'resize': 'resize_crop',
                                   'crop_fraction': 0.875}
  assert card['stablehlo']['platforms'] == ['cpu']
  assert card['source'] == {'kind': 'npz', 'path': str(path)}

  usage = _cli('vit_jax.export', f'--npz={path}', f'--output={tmp_path}')
  assert usage.returncode == 2 and f'--npz={path} needs --model_name' in (
      usage.stderr)
  usage = _cli('vit_jax.export', f'--npz={path}', '--model_name=ViT-Ti_16',
               f'--output={tmp_path}', '--formats=npz,onnx')
  assert usage.returncode == 2 and '--formats=npz,onnx' in usage.stderr
  bad = _cli('vit_jax.export', f'--npz={path}', '--model_name=ViT-B16',
             f'--output={tmp_path}')
  assert bad.returncode == 1 and "Unknown model name 'ViT-B16'" in bad.stderr


def test_predict_from_a_workdir_prints_its_label_names(workdir,
                                                       imagenet_samples):
  photos = sorted(imagenet_samples.glob('*.JPEG'))[:3]
  result = _cli('vit_jax.predict', f'--model={workdir}', '--top_k=10',
                '--format=jsonl', *map(str, photos))
  assert result.returncode == 0, result.stderr
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  assert [row['path'] for row in rows] == list(map(str, photos))
  assert {t['label'] for t in rows[0]['top_k']} == {
      'airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog',
      'horse', 'ship', 'truck'}


@pytest.mark.parametrize('classify_a_workdir', [False, True])
def test_export_and_predict_keep_tensorflow_out(request, classify_a_workdir):
  script = ('import sys, numpy, vit_jax.export, vit_jax.predict, '
            'vit_jax.serving\n')
  if classify_a_workdir:  # Only this case needs the real data (to train).
    path = request.getfixturevalue('workdir')
    script += textwrap.dedent(f"""
        classifier = vit_jax.predict.load_classifier({str(path)!r})
        classifier.logits(numpy.zeros((1, *classifier.image_size, 3),
                                      numpy.float32))
    """)
  script += "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
