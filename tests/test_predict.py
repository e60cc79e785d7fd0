"""Prediction on real photos: preprocessing equals training's, the CLI."""
import io
import json
import pathlib
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vit_jax import checkpoint
from vit_jax import models
from vit_jax import predict
from vit_jax import sources
from vit_jax.serving import images
from vit_jax.sources import export

REPO = pathlib.Path(__file__).resolve().parents[1]


def _photos(folder: pathlib.Path, n: int, step: int = 37) -> list[pathlib.Path]:
  """`n` photos spread over the 1000 classes (varied sizes and subjects)."""
  return sorted(folder.glob('*.JPEG'))[::step][:n]


@pytest.mark.parametrize('mode', images.RESIZE_MODES)
def test_numpy_preprocessing_matches_training_eval_on_real_photos(
    imagenet_samples, mode):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from vit_jax.data import preprocess  # pylint: disable=g-import-not-at-top
  sizes = {(photo.size[1], photo.size[0]) for photo in map(
      Image.open, _photos(imagenet_samples, 24))}
  assert len(sizes) > 5  # varied shapes, portrait and landscape
  for path in _photos(imagenet_samples, 24):
    data = path.read_bytes()
    rgb = images.load_rgb(path)
    for size in ((224, 224), (96, 160)):
      ours = images.eval_image(rgb, size, mode)
      # The same decoded pixels through TF: identical arithmetic.
      same = preprocess.eval_image(tf.io.encode_png(rgb), size, mode).numpy()
      np.testing.assert_allclose(ours, same, atol=1e-6, err_msg=str(path))
      # From the JPEG bytes: TF's fast DCT differs from Pillow's by ~1 level.
      tf_jpeg = preprocess.eval_image(tf.constant(data), size, mode).numpy()
      diff = np.abs(ours - tf_jpeg) * 127.5
      assert diff.mean() < 2.0 and diff.max() < 16, (path, diff.max())


def test_load_rgb_handles_modes_formats_and_exif(imagenet_samples, tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  photo = Image.open(_photos(imagenet_samples, 1)[0]).convert('RGB')
  rgba = photo.convert('RGBA')
  rgba.putalpha(Image.linear_gradient('L').resize(photo.size))
  variants = {'gray.jpg': photo.convert('L'), 'rgba.png': rgba,
              'palette.png': photo.convert('P'), 'gray_alpha.png':
              photo.convert('LA'), 'cmyk.jpg': photo.convert('CMYK'),
              'gray16.png': Image.fromarray(
                  (np.asarray(photo.convert('L'), np.uint16) * 257))}
  for name, image in variants.items():
    image.save(tmp_path / name)
    ours = images.load_rgb(tmp_path / name)
    assert ours.shape == (photo.size[1], photo.size[0], 3), name
    assert ours.dtype == np.uint8
    if name.endswith('.png'):  # lossless: TF's decoder gives the same pixels
      theirs = tf.io.decode_image((tmp_path / name).read_bytes(), channels=3,
                                  expand_animations=False).numpy()
      np.testing.assert_array_equal(ours, theirs, err_msg=name)
  np.testing.assert_array_equal(images.load_rgb(tmp_path / 'rgba.png'),
                                np.asarray(photo))  # alpha dropped
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to view
  photo.save(tmp_path / 'rotated.jpg', exif=exif, quality=95)
  upright = images.load_rgb(tmp_path / 'rotated.jpg')
  assert upright.shape == (photo.size[0], photo.size[1], 3)
  # A 16-bit TIFF reads like the 16-bit PNG (the high byte of each sample).
  Image.fromarray(np.asarray(variants['gray16.png'])).save(
      tmp_path / 'gray16.tif')
  np.testing.assert_array_equal(images.load_rgb(tmp_path / 'gray16.tif'),
                                images.load_rgb(tmp_path / 'gray16.png'))
  # 32-bit integer and float pixels have no 0..255 meaning: one clear error,
  # not black or white pictures.
  grey = np.asarray(photo.convert('L'))
  Image.fromarray(grey.astype(np.int32)).save(tmp_path / 'int32.tif')
  Image.fromarray(grey.astype(np.float32) / 255).save(tmp_path / 'float.tif')
  for name, kind in (('int32.tif', '32-bit integer'),
                     ('float.tif', 'floating-point')):
    with pytest.raises(images.UnsupportedImageError,
                       match=f'{kind} pixels .* no standard mapping'):
      images.load_rgb(tmp_path / name)


@pytest.fixture(scope='module')
def imagenet_npz(tmp_path_factory):
  """A randomised tiny ViT with a 1000-class head at 224px, as an npz."""
  model = models.create_model('ViT-Ti_16', 1000, num_layers=1, hidden_size=32,
                              mlp_dim=64, num_heads=2, patch_size=16)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 224, 224, 3)))['params']
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda x: rng.normal(0, 0.3, x.shape).astype(x.dtype),
                        shapes)
  path = tmp_path_factory.mktemp('model') / 'imagenet_tiny.npz'
  checkpoint.save_npz(path, params)
  return path


@pytest.fixture
def photo_folder(imagenet_samples, tmp_path):
  """Real photos plus grayscale / RGBA / palette PNGs and three bad files."""
  folder = tmp_path / 'photos'
  (folder / 'more').mkdir(parents=True)
  photos = _photos(imagenet_samples, 20)
  for photo in photos[:16]:
    shutil.copy(photo, folder / photo.name)
  Image.open(photos[16]).convert('L').save(folder / 'more' / 'gray.jpg')
  Image.open(photos[17]).convert('RGBA').save(folder / 'more' / 'rgba.png')
  Image.open(photos[18]).convert('P').save(folder / 'more' / 'palette.png')
  data = photos[19].read_bytes()
  (folder / 'truncated.JPEG').write_bytes(data[:len(data) // 3])
  (folder / 'notes.jpg').write_text('not an image')
  (folder / 'empty.png').write_bytes(b'')
  (folder / 'README.txt').write_text('skipped: not an image extension')
  return folder


def _predict(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', 'vit_jax.predict', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_predict_npz_on_real_photos_prints_label_names_and_reports_bad_files(
    imagenet_npz, imagenet_samples, photo_folder):
  labels = imagenet_samples / 'index_synset_name.tsv'
  result = _predict(f'--model={imagenet_npz}', '--model_name=ViT-Ti_16',
                    f'--labels={labels}', '--top_k=3', '--batch_size=8',
                    str(photo_folder))
  assert result.returncode == 1, result.stderr
  bad = {str(photo_folder / name)
         for name in ('truncated.JPEG', 'notes.jpg', 'empty.png')}
  errors = [l for l in result.stderr.splitlines() if l.startswith('error: ')]
  assert errors[-1] == 'error: 3 of 22 file(s) could not be read.'
  assert {l.split(': ')[1] for l in errors[:-1]} == bad
  header, *rows = result.stdout.splitlines()
  assert header.split() == ['image', 'top-1', 'top-2', 'top-3']
  assert len(rows) == 19
  names = {line.split('\t')[2] for line in labels.read_text().splitlines()}
  for row in rows:
    path, *cells = row.split()
    assert pathlib.Path(path).exists() and path not in bad
    predicted, probs = cells[0::2], [float(p) for p in cells[1::2]]
    assert set(predicted) <= names and probs == sorted(probs, reverse=True)
  # Top-1 is the model's argmax on the training eval preprocessing.
  model = models.create_model('ViT-Ti_16', 1000, num_layers=1, hidden_size=32,
                              mlp_dim=64, num_heads=2)
  first = pathlib.Path(rows[0].split()[0])
  logits = model.apply({'params': checkpoint.load_npz(imagenet_npz)},
                       images.eval_image(images.load_rgb(first),
                                         (224, 224))[None])
  ordered = [line.split('\t')[2] for line in labels.read_text().splitlines()]
  assert rows[0].split()[1] == ordered[int(np.argmax(logits))]


def test_predict_export_runs_stablehlo_without_model_code(
    imagenet_npz, imagenet_samples, photo_folder, tmp_path):
  export.write_export(sources.from_npz(
      imagenet_npz, 'ViT-Ti_16',
      preprocessing=images.Preprocessing(resize='resize_crop'),
      labels=imagenet_samples / 'tfds_imagenet2012_labels.txt'),
      tmp_path / 'export', 'tiny', platforms=('cpu',))
  # In-process with model code, as the reference.
  reference = io.StringIO()
  failed = predict.predict_files(
      sources.classifier(sources.load(tmp_path / 'export')),
      images.list_images([photo_folder]), k=5, output_format='jsonl',
      out=reference, err=io.StringIO())
  assert failed == 3
  script = textwrap.dedent(f"""
      import runpy, sys
      sys.argv = ['predict', '--model={tmp_path / 'export'}', '--format=jsonl',
                  '--batch_size=5', {str(photo_folder)!r}]
      try:
        runpy.run_module('vit_jax.predict', run_name='__main__')
      except SystemExit as e:
        code = e.code
      for module in ('vit_jax.models', 'flax', 'tensorflow'):
        assert module not in sys.modules, module
      sys.exit(code)
  """)
  result = subprocess.run([sys.executable, '-c', script], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr
  assert 'StableHLO export' in result.stderr
  rows = [json.loads(line) for line in result.stdout.splitlines()]
  expected = [json.loads(line) for line in reference.getvalue().splitlines()]
  assert [r['path'] for r in rows] == [r['path'] for r in expected]
  assert len(rows) == 22 and sum('error' in r for r in rows) == 3
  for row, ref in zip(rows, expected):
    if 'error' in ref:
      assert row['error'] == ref['error'] and row['path'].endswith(
          ('truncated.JPEG', 'notes.jpg', 'empty.png'))
      continue
    assert [t['label'] for t in row['top_k']] == [
        t['label'] for t in ref['top_k']]
    assert all(t['label'].startswith('n') for t in row['top_k'])  # synsets
    np.testing.assert_allclose([t['prob'] for t in row['top_k']],
                               [t['prob'] for t in ref['top_k']], atol=2e-6)

  good = _predict(f'--model={tmp_path / "export" / "tiny.card.json"}',
                  *map(str, _photos(imagenet_samples, 3)))
  assert good.returncode == 0 and len(good.stdout.splitlines()) == 4


@pytest.mark.parametrize('args,message', [
    ([], '--model is required'),
    (['--model=/nonexistent/model.npz'],
     '--model=/nonexistent/model.npz: no such file or directory'),
    (['--model={npz}'], 'is an .npz, which holds no architecture'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--labels={labels}',
      '--num_classes=1000'], 'has 1 names but the model has 1000 classes'),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--format=xml'],
     "--format=xml: value should be one of <table|jsonl>"),
    (['--model={npz}', '--model_name=ViT-Ti_16', '--top_k=0'], 'top_k'),
    (['--model={export}', '--step=3'], '--step does not apply to --model='),
    (['--model={export}', '--image_size=96'],
     '--image_size does not apply to --model='),
    (['--model={export}', '--model_name=ViT-B_16'],
     '--model_name does not apply to --model='),
])
def test_usage_errors_exit_2_naming_the_value(imagenet_npz, imagenet_samples,
                                              tmp_path, args, message):
  labels = tmp_path / 'labels.txt'
  labels.write_text('only one\n')
  if any('{export}' in a for a in args):
    export.write_export(sources.from_npz(imagenet_npz, 'ViT-Ti_16'),
                        tmp_path / 'export', 'tiny', platforms=('cpu',))
  args = [a.format(npz=imagenet_npz, labels=labels, export=tmp_path / 'export')
          for a in args]
  photo = str(_photos(imagenet_samples, 1)[0])
  result = _predict(*args, photo)
  assert result.returncode == 2, result.stderr
  assert message in result.stderr


def test_preprocessing_takes_grey_arrays_and_refuses_float_images():
  """A grey HxW array came back (32, 32, 32); a float image in [0, 1] was
  read as 0..255 (nearly black), both without an error."""
  grey = np.random.default_rng(0).integers(0, 256, (40, 50), np.uint8)
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  for image in (grey, grey[..., None]):
    np.testing.assert_array_equal(images.eval_pixels(image, (32, 32)),
                                  images.eval_pixels(rgb, (32, 32)))
  with pytest.raises(ValueError, match=r'dtype float32; a float image in '
                                       r'\[0, 1\] needs'):
    images.eval_pixels(rgb.astype(np.float32) / 255, (32, 32))
  with pytest.raises(ValueError, match=r'got \(40, 50, 4\)'):
    images.eval_pixels(np.zeros((40, 50, 4), np.uint8), (32, 32))
