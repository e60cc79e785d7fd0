"""Export: every format reloads to the source's logits; the card vouches for
every file; an export folder is complete or absent; the CLI."""
import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from configs import pretrain
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import serving
from vit_jax import sources
from vit_jax.checkpoint import posemb
from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.sources import export
from vit_jax.sources import npz as npz_source

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
  from vit_jax.training import trainer  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp('workdir')
  trainer.train_and_evaluate(tiny_config(tfds_data_dir), str(path))
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
  trained = sources.load_workdir(workdir)
  assert 'encoderblock' in trained.params['Transformer']  # scanned
  pixels = photo_pixels(imagenet_samples, trained.image_size)
  expected = np.asarray(trained.model.apply(
      {'params': trained.params}, images.to_unit_range(pixels)))
  assert np.ptp(expected, axis=0).min() > 1e-3  # logits differ per image
  close = lambda a: np.testing.assert_allclose(a, expected, rtol=1e-5,
                                               atol=1e-6)

  out = tmp_path / 'export'
  card_path = export.write_export(sources.from_workdir(workdir), out, 'tiny')
  assert sorted(p.name for p in out.iterdir()) == [
      'tiny.card.json', 'tiny.npz', 'tiny.safetensors', 'tiny.stablehlo']
  unrolled = trained.model.clone(scan_layers=False)
  close(unrolled.apply({'params': checkpoint.load_npz(out / 'tiny.npz')},
                       images.to_unit_range(pixels)))
  back = sources.from_export(card_path)
  close(jax.jit(sources.logits_fn(back.model))(back.params, pixels))
  close(run_serving(card_path, pixels, tmp_path))

  # The npz in Google's original layout, the safetensors with its names.
  with np.load(out / 'tiny.npz') as npz:
    raw = dict(npz)
  assert set(raw) == GOOGLE_KEYS
  stored = safetensors.numpy.load_file(out / 'tiny.safetensors')
  assert set(stored) == GOOGLE_KEYS
  for key in GOOGLE_KEYS:
    np.testing.assert_array_equal(stored[key], raw[key])


def test_card_describes_the_model_and_vouches_for_every_file(
    workdir, tmp_path):
  card_path = export.write_export(sources.from_workdir(workdir, step=2),
                                  tmp_path / 'step2', 'step2',
                                  formats=('npz',))
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
  assert card['preprocessing']['mean'] == card['preprocessing']['std'] == [
      0.5, 0.5, 0.5]  # [-1, 1]
  assert card['preprocessing']['interpolation'] == 'bilinear'
  assert card['step'] == 2
  assert card['source']['checkpoint'] == str(workdir / 'checkpoints' / '2')
  npz_file = tmp_path / 'step2' / 'step2.npz'
  assert card['files'] == {'npz': {
      'path': 'step2.npz', 'bytes': npz_file.stat().st_size,
      'sha256': card_lib.file_sha256(npz_file)}}
  assert card['stablehlo'] is None
  with np.load(npz_file) as npz:
    raw = dict(npz)
  assert card['params']['sha256'] == serving.params_checksum(raw)
  assert card['params']['count'] == sum(v.size for v in raw.values())
  latest = export.write_export(sources.from_workdir(workdir),
                               tmp_path / 'latest', 'latest', formats=('npz',))
  assert json.loads(latest.read_text())['step'] == 4
  assert json.loads(latest.read_text())['params']['sha256'] != (
      card['params']['sha256'])


@pytest.fixture
def full_export(tiny_npz, tmp_path):
  path, _, _ = tiny_npz
  out = tmp_path / 'export'
  export.write_export(sources.from_npz(path, 'ViT-Ti_16'), out, 'tiny',
                      platforms=('cpu',))
  return out


def _edit_card(out: pathlib.Path, edit) -> None:
  card_path = out / 'tiny.card.json'
  card = json.loads(card_path.read_text())
  edit(card)
  card_path.write_text(json.dumps(card))


@pytest.mark.parametrize('damage,message', [
    (lambda out: (out / 'tiny.safetensors').write_bytes(
        (out / 'tiny.safetensors').read_bytes()[:-8]),
     r'tiny.safetensors is not the safetensors file that export card .* '
     r'describes \(\d+ bytes vs \d+ listed'),
    (lambda out: (out / 'tiny.stablehlo').write_bytes(b'\0' * 64),
     r'tiny.stablehlo is not the stablehlo file'),
    (lambda out: _edit_card(out, lambda c: c.pop('image_size')),
     r'is damaged: image_size=None is not \[height, width\]'),
    (lambda out: _edit_card(out, lambda c: c.update(files=['tiny.npz'])),
     r'is damaged: files must be a non-empty \{kind'),
    (lambda out: _edit_card(out, lambda c: c['files'].update(
        stablehlo={'path': '../../etc/passwd', 'bytes': 1, 'sha256': 'x'})),
     r"names stablehlo file '../../etc/passwd', outside its own folder"),
    (lambda out: _edit_card(out, lambda c: c.update(image_size=[96, 96])),
     r'takes pixels \(64, 64, 3\) and gives 1000 classes, but its card says '
     r'image_size=\[96, 96\]'),
    (lambda out: _edit_card(out, lambda c: c.update(label_names=['a', 'b'])),
     r'label_names must be null or a list of num_classes=1000 strings, got '
     r'list of 2'),
    (lambda out: _edit_card(out, lambda c: c.update(num_classes=10)),
     r'label_names|has a 1000-class head but its card says num_classes=10'),
], ids=['truncated-safetensors', 'replaced-stablehlo', 'missing-field',
        'files-not-a-dict', 'path-outside', 'image-size', 'label-names',
        'num-classes'])
def test_damaged_exports_are_refused_in_one_line(full_export, damage,
                                                 message):
  damage(full_export)
  with pytest.raises(ValueError, match=message):
    serving.load(full_export)


def test_a_failed_or_killed_export_leaves_the_earlier_one_intact(
    tiny_npz, full_export, tmp_path, monkeypatch):
  path, _, _ = tiny_npz
  before = {p.name: p.read_bytes() for p in full_export.iterdir()}

  def fail(*args, **kwargs):
    raise OSError(28, 'No space left on device')

  monkeypatch.setattr(export, '_stablehlo', fail)
  with pytest.raises(OSError):
    export.write_export(sources.from_npz(path, 'ViT-Ti_16', image_size=(32, 32)),
                        full_export, 'tiny', platforms=('cpu',))
  assert {p.name: p.read_bytes() for p in full_export.iterdir()} == before
  assert [p.name for p in tmp_path.iterdir()] == ['export']  # no leftovers
  monkeypatch.undo()

  # The CLI killed at several moments: the folder is always one whole export.
  fresh = sources.from_npz(path, 'ViT-Ti_16', image_size=(32, 32))
  new_sha = card_lib.params_checksum(sources.base.original_flat(fresh.params))
  old_sha = json.loads(before['tiny.card.json'])['params']['sha256']
  for delay in (1.0, 2.5, 4.0):
    proc = subprocess.Popen(
        [sys.executable, '-m', 'vit_jax.export', f'--model={path}',
         '--model_name=ViT-Ti_16', '--image_size=32', f'--output={full_export}',
         '--name=tiny', '--platforms=cpu'], cwd=REPO,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    served = serving.load(full_export)  # complete: every file checks out
    assert served.card['params']['sha256'] in (old_sha, new_sha)
  # Whatever a kill left beside it is cleared by the next export.
  export.write_export(fresh, full_export, 'tiny', platforms=('cpu',))
  assert [p.name for p in tmp_path.iterdir()] == ['export']
  assert serving.load(full_export).card['params']['sha256'] == new_sha


def test_export_refuses_to_overwrite_a_folder_that_is_not_an_export(
    tiny_npz, tmp_path):
  path, _, _ = tiny_npz
  (tmp_path / 'notes.txt').write_text('mine')
  with pytest.raises(ValueError, match=r'exists and is not an export folder '
                     r'\(it holds notes.txt\)'):
    export.write_export(sources.from_npz(path, 'ViT-Ti_16'), tmp_path, 'tiny')
  assert (tmp_path / 'notes.txt').read_text() == 'mine'


def test_npz_source_infers_the_architecture_and_bfloat16_export(
    tiny_npz, imagenet_samples, tmp_path):
  path, model, params = tiny_npz
  source = sources.from_npz(path, 'ViT-Ti_16')
  assert source.image_size == (64, 64) and source.model.num_classes == 1000
  assert (source.model.num_layers, source.model.hidden_size) == (1, 32)
  pixels = photo_pixels(imagenet_samples, (64, 64), n=4)
  f32 = np.asarray(model.apply({'params': params},
                               images.to_unit_range(pixels)))

  out = tmp_path / 'bf16'
  card_path = export.write_export(source, out, 'bf16', bfloat16=True)
  card = json.loads(card_path.read_text())
  assert card['params']['dtype'] == 'bfloat16'
  assert checkpoint.load_npz(out / 'bf16.npz')['cls'].dtype == (
      ml_dtypes.bfloat16)
  stored = safetensors.numpy.load_file(out / 'bf16.safetensors')
  assert {v.dtype for v in stored.values()} == {np.dtype(ml_dtypes.bfloat16)}
  # Served logits: those of float32 compute with the rounded weights.
  rounded = jax.tree.map(lambda x: x.astype(ml_dtypes.bfloat16).astype(
      np.float32), params)
  served = run_serving(card_path, pixels, tmp_path)
  np.testing.assert_allclose(served, model.apply(
      {'params': rounded}, images.to_unit_range(pixels)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(served, f32, atol=0.05 * np.abs(f32).max())


def test_npz_of_another_architecture_or_no_vit_is_refused_naming_the_file(
    tiny_npz, tmp_path):
  path, _, _ = tiny_npz
  with pytest.raises(ValueError, match=r'(?s)tiny\.npz does not fit R50\+'
                     r'ViT-B_16.*params that differ \(\d+\):\n    block1/unit1/conv1/'
                     r'kernel: file -, model \(1, 1, 64, 64\)'):
    sources.from_npz(path, 'R50+ViT-B_16')
  with pytest.raises(ValueError, match=r'--num_classes=10 but the head of '
                     r'.*tiny\.npz has 1000'):
    sources.from_npz(path, 'ViT-Ti_16', num_classes=10)
  resnet = tmp_path / 'resnet.npz'
  np.savez(resnet, **{'conv1/kernel': np.ones((7, 7, 3, 64), np.float32),
                      'fc/bias': np.zeros(10, np.float32)})
  with pytest.raises(ValueError, match=r'resnet.npz is not a ViT checkpoint: '
                     r'it lacks embedding/kernel'):
    sources.from_npz(resnet, 'ViT-B_16')


def test_nan_or_integer_weights_are_refused_naming_the_array(tiny_npz,
                                                             tmp_path):
  path, _, params = tiny_npz
  with np.load(path) as npz:
    raw = dict(npz)
  raw['Transformer/encoder_norm/scale'] = np.full(32, np.nan, np.float32)
  np.savez(tmp_path / 'nan.npz', **raw)
  with pytest.raises(ValueError, match=r'nan.npz: Transformer/encoder_norm/'
                     r'scale holds 32 non-finite value\(s\)'):
    checkpoint.load_npz(tmp_path / 'nan.npz')
  raw['Transformer/encoder_norm/scale'] = np.ones(32, np.int32)
  np.savez(tmp_path / 'int.npz', **raw)
  with pytest.raises(ValueError, match=r'encoder_norm/scale has dtype int32; '
                     'weights must be floating point'):
    sources.from_npz(tmp_path / 'int.npz', 'ViT-Ti_16')
  with pytest.raises(ValueError, match=r'load_pretrained: params: '
                     r'embedding/bias is NoneType'):
    checkpoint.load_pretrained({**params, 'embedding': {'kernel': None,
                                                        'bias': None}}, params)
  with pytest.raises(ValueError, match=r'save_npz: params: head/bias is '
                     'NoneType'):
    checkpoint.save_npz(tmp_path / 'x.npz', {**params, 'head': {
        'kernel': params['head']['kernel'], 'bias': None}})


def test_npz_source_at_another_resolution_and_with_overrides(tiny_npz):
  path, _, params = tiny_npz
  pe = params['Transformer']['posembed_input']['pos_embedding']  # 1 + 4x4
  source = sources.from_npz(path, 'ViT-Ti_16', image_size=(48, 80))
  assert source.image_size == (48, 80)
  resized = source.params['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_array_equal(resized, posemb.interpolate_posemb(
      pe, (3, 5), num_prefix_tokens=1))
  logits = sources.logits_fn(source.model)(
      source.params, np.zeros((1, 48, 80, 3), np.float32))
  assert logits.shape == (1, 1000)
  # A grid of as many patches as stored is taken as the stored one.
  same = sources.from_npz(path, 'ViT-Ti_16', image_size=(32, 128))
  np.testing.assert_array_equal(
      same.params['Transformer']['posembed_input']['pos_embedding'], pe)

  assert npz_source.parse_overrides(
      ['num_heads=4', 'classifier=gap', 'patch_size=(8, 8)']) == {
          'num_heads': 4, 'classifier': 'gap', 'patch_size': (8, 8)}
  with pytest.raises(ValueError, match="'num_heads' is not key=value"):
    npz_source.parse_overrides(['num_heads'])
  # Overrides win over the arrays (here wrongly), not over INFERENCE_OPTIONS.
  with pytest.raises(ValueError, match=r'query/kernel: file \(32, 2, 16\), '
                     r'model \(32, 4, 8\)'):
    sources.from_npz(path, 'ViT-Ti_16', overrides={'num_heads': 4})
  assert not sources.from_npz(
      path, 'ViT-Ti_16', overrides={'scan_layers': True}).model.scan_layers


def _cli(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', module, *args], cwd=REPO,
                        capture_output=True, text=True, timeout=300)


def test_export_cli_from_npz_with_imagenet_labels(tiny_npz, imagenet_samples,
                                                  tmp_path):
  path, _, _ = tiny_npz
  out = tmp_path / 'out'
  result = _cli('vit_jax.export', f'--model={path}', '--model_name=ViT-Ti_16',
                f'--labels={imagenet_samples / "index_synset_name.tsv"}',
                '--eval_resize=resize_crop', f'--output={out}',
                '--platforms=cpu')
  assert result.returncode == 0, result.stderr
  assert 'ViT-Ti_16 (1000 classes, 64x64, step None)' in result.stdout
  assert 'tiny.stablehlo' in result.stdout and 'sha256' in result.stdout
  card = json.loads((out / 'tiny.card.json').read_text())
  assert card['label_names'][:2] == ['tench', 'goldfish']
  assert card['preprocessing'] == {**card['preprocessing'],
                                   'resize': 'resize_crop',
                                   'crop_fraction': 0.875}
  assert card['stablehlo']['platforms'] == ['cpu']
  assert card['source'] == {'kind': 'npz', 'path': str(path)}


@pytest.mark.parametrize('args,message', [
    (['--model={npz}', '--output={out}'],
     'is an .npz, which holds no architecture: add --model_name'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--output={out}',
      '--formats=npz,onnx'], "Unknown export format 'onnx'"),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--output={out}',
      '--formats='], 'No export format given'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--output={out}',
      '--platforms=bogus'], "Unknown StableHLO platform 'bogus'"),
    (['--model={npz}', '--model_name=ViT-B16', '--output={out}'],
     "Unknown model name 'ViT-B16'"),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--step=3',
      '--output={out}'], '--step does not apply to --model='),
    (['--model={npz}', '--model_name=ViT-Ti_16'], '--output is required'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--output={out}',
      '--image_size=abc'], '--image_size=abc: give H or H,W'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--output={out}',
      '--labels={bad_labels}'], 'is not UTF-8 text'),
], ids=['no-model-name', 'format', 'no-format', 'platform', 'model-name',
        'step', 'no-output', 'image-size', 'labels-encoding'])
def test_export_usage_errors_exit_2_in_one_line(tiny_npz, tmp_path, args,
                                                message):
  path, _, _ = tiny_npz
  bad_labels = tmp_path / 'labels.txt'
  bad_labels.write_bytes(b'caf\xe9\n' * 1000)  # Latin-1, not UTF-8
  args = [a.format(npz=path, out=tmp_path / 'out', bad_labels=bad_labels)
          for a in args]
  result = _cli('vit_jax.export', *args)
  assert result.returncode == 2, result.stderr
  lines = result.stderr.strip().splitlines()
  assert lines[0].startswith('error: ') and message in lines[0], lines
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'out').exists()


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
  script = 'import sys, numpy, vit_jax.sources, vit_jax.serving\n'
  if classify_a_workdir:  # Only this case needs the real data (to train).
    path = request.getfixturevalue('workdir')
    script += textwrap.dedent(f"""
        classifier = vit_jax.sources.classifier(
            vit_jax.sources.load({str(path)!r}))
        classifier.logits(numpy.zeros((1, *classifier.image_size, 3),
                                      numpy.float32))
    """)
  script += "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
