"""Hostile files (#27's security part): no file decides our memory, and nothing
we write follows a link out of its folder.

Each test injects the real fault: the 800-byte timm config that asked for a
3.2 M-pixel resize, a 17 KB PNG declaring 12000 x 12000 pixels, /dev/zero as
a labels file, a symlinked LOCK, links planted where a workdir or export is
written, damaged and compressed-bomb weights files, a concurrent export.
"""
import json
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from vit_jax import sources
from vit_jax.base import files
from vit_jax.base import limits
from vit_jax.checkpoint import weight_files
from vit_jax.runs import lock as lock_lib
from vit_jax.runs import paths
from vit_jax.serving import card as card_lib
from vit_jax.serving import images

import test_hf_sources as hf_tests
import test_pytorch_sources as pytorch_tests

REPO = pathlib.Path(__file__).resolve().parents[1]
GREY = b'\x00'  # one filter byte per PNG row


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data
          + struct.pack('>I', zlib.crc32(kind + data)))


def bomb_png(path: pathlib.Path, side: int) -> None:
  """A valid greyscale PNG of side x side black pixels, a few KB on disk."""
  packer = zlib.compressobj(9)
  row = bytes(1 + side)
  body = b''.join(packer.compress(row) for _ in range(side)) + packer.flush()
  path.write_bytes(b'\x89PNG\r\n\x1a\n'
                   + _png_chunk(b'IHDR', struct.pack('>IIBBBBB', side, side,
                                                     8, 0, 0, 0, 0))
                   + _png_chunk(b'IDAT', body) + _png_chunk(b'IEND', b''))


# --- memory: images ----------------------------------------------------------

def test_a_small_png_declaring_144m_pixels_is_refused_before_decoding(
    tmp_path):
  path = tmp_path / 'bomb.png'
  bomb_png(path, 12000)
  assert path.stat().st_size < 200_000
  with pytest.raises(limits.LimitError, match=(
      r'bomb\.png: 12000x12000 image, decoded: 144,000,000 pixels, over the '
      r'limit of 40,000,000 \(set VIT_JAX_MAX_IMAGE_PIXELS')):
    images.load_rgb(path)


def test_a_folder_of_bombs_costs_no_memory_in_predict(tmp_path):
  """The issue's four 17 KB files peaked at 7 GB; now each is one line."""
  folder = tmp_path / 'photos'
  folder.mkdir()
  for i in range(4):
    bomb_png(folder / f'b{i}.png', 12000)
  model = tmp_path / 'model'
  sources.write_export(pytorch_tests.tiny_source(), model, 'tiny',
                       formats=('npz',))
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--model={model}',
       str(folder)], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 1, result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 5, result.stderr  # one per file, then the summary
  assert all('over the limit' in e for e in errors[:4])


def test_a_large_jpeg_is_decoded_smaller_to_fit(tmp_path, monkeypatch):
  """Over the limit, libjpeg decodes at 1/2..1/8 scale (Pillow's draft):
  the full-resolution bitmap is never made."""
  path = tmp_path / 'big.jpg'
  Image.new('RGB', (400, 300), (200, 10, 10)).save(path, quality=95)
  monkeypatch.setenv('VIT_JAX_MAX_IMAGE_PIXELS', str(200 * 150))
  assert images.load_rgb(path).shape == (150, 200, 3)
  monkeypatch.setenv('VIT_JAX_MAX_IMAGE_PIXELS', str(100 * 75))
  assert images.load_rgb(path).shape == (75, 100, 3)
  monkeypatch.setenv('VIT_JAX_MAX_IMAGE_PIXELS', '100')  # below 1/8 scale
  with pytest.raises(limits.LimitError, match='big.jpg'):
    images.load_rgb(path)
  png = tmp_path / 'big.png'
  Image.new('RGB', (400, 300)).save(png)
  monkeypatch.setenv('VIT_JAX_MAX_IMAGE_PIXELS', str(200 * 150))
  with pytest.raises(limits.LimitError, match='big.png: 400x300'):
    images.load_rgb(png)


def test_the_resize_before_a_crop_is_bounded_for_thin_images():
  """A 1 x 60000 strip with its shorter side resized to 37 px would be 2.2 G
  pixels wide: refused before the resize allocates it."""
  strip = np.zeros((1, 60000, 3), np.uint8)
  for interpolation in ('bilinear', 'pil_bilinear'):
    p = images.Preprocessing(resize='resize_crop', interpolation=interpolation)
    with pytest.raises(limits.LimitError, match='a 1x60000 image resized'):
      images.eval_pixels(strip, (32, 32), p)
  # A photo's aspect ratio passes, and gives the model's size.
  photo = np.zeros((300, 400, 3), np.uint8)
  assert images.eval_pixels(photo, (32, 32), images.Preprocessing(
      resize='resize_crop')).shape == (32, 32, 3)


def test_timm_crop_pct_that_would_take_the_machine_is_one_line(tmp_path):
  """The issue's 800-byte config.json: crop_pct 1e-5 made predict resize a
  photo's short side to 3.2 M pixels (11 GB, then the OOM killer)."""
  folder = tmp_path / 'timm'
  pytorch_tests.timm_folder(folder)
  config = json.loads((folder / 'config.json').read_text())
  config['pretrained_cfg']['crop_pct'] = 1e-5
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=(
      r'timm/config\.json: crop_fraction=1e-05 must be in \[0\.25, 1\]')):
    sources.load(folder)


@pytest.mark.parametrize('field, value, match', [
    ('image_size', 100000, r'image_size=100000: expected an integer in '
                           r'\[1, 4,096\]'),
    ('image_size', 'big', r"image_size='big': expected an integer"),
    ('hidden_size', '32', r"hidden_size='32': expected an integer"),
    ('num_hidden_layers', 10**9, r'num_hidden_layers=1000000000'),
])
def test_hf_config_sizes_are_typed_and_bounded(tmp_path, field, value, match):
  folder = tmp_path / 'hf'
  hf_tests.hf_folder(folder, config={**hf_tests.CONFIG, field: value})
  with pytest.raises(ValueError, match=r'hf/config\.json: ' + match):
    sources.load(folder)


@pytest.mark.parametrize('preprocessor, match', [
    ({'rescale_factor': 0}, r'rescale_factor=0: expected a positive number'),
    ({'image_mean': 'grey'}, r"image_mean='grey': expected a number"),
])
def test_hf_preprocessor_values_are_one_line(tmp_path, preprocessor, match):
  folder = tmp_path / 'hf'
  hf_tests.hf_folder(folder, preprocessor=preprocessor)
  with pytest.raises(ValueError, match=r'preprocessor_config\.json: ' + match):
    sources.load(folder)


def test_label_names_that_do_not_name_every_class_are_refused(tmp_path):
  folder = tmp_path / 'timm'
  pytorch_tests.timm_folder(folder)
  config = json.loads((folder / 'config.json').read_text())
  config['label_names'] = ['a', 'b', 'c']
  (folder / 'config.json').write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r'names 3 labels for a 10-class head'):
    sources.load(folder)


def test_a_model_input_size_past_the_limit_is_refused(tmp_path):
  source = pytorch_tests.tiny_source()
  with pytest.raises(limits.LimitError, match=r'input size 8192x8192'):
    sources.at_image_size(source, (8192, 8192))


# --- memory: text files --------------------------------------------------------

def test_labels_from_dev_zero_are_bounded(monkeypatch):
  monkeypatch.setenv('VIT_JAX_MAX_TEXT_BYTES', '4096')
  with pytest.raises(limits.LimitError,
                     match=r'labels file /dev/zero \(read so far\)'):
    card_lib.read_labels('/dev/zero', 10)


def test_predict_with_labels_from_dev_zero_is_one_line(tmp_path):
  model = tmp_path / 'model'
  sources.write_export(pytorch_tests.tiny_source(), model, 'tiny',
                       formats=('npz',))
  photo = tmp_path / 'p.png'
  Image.new('RGB', (40, 40)).save(photo)
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--model={model}',
       '--labels=/dev/zero', str(photo)], cwd=REPO, capture_output=True,
      text=True, timeout=600,
      env={**os.environ, 'VIT_JAX_MAX_TEXT_BYTES': '65536'})
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: ') and 'over the limit' in (
      result.stderr), result.stderr
  assert 'Traceback' not in result.stderr


def test_a_bad_limit_setting_is_one_line(monkeypatch):
  monkeypatch.setenv('VIT_JAX_MAX_IMAGE_PIXELS', 'lots')
  with pytest.raises(limits.LimitError, match="VIT_JAX_MAX_IMAGE_PIXELS='lots'"):
    limits.IMAGE_PIXELS.value()


# --- memory and damage: weights files -------------------------------------------

def test_a_compressed_npz_cannot_inflate_past_the_limit(tmp_path, monkeypatch):
  path = tmp_path / 'bomb.npz'
  np.savez_compressed(path, kernel=np.zeros((4096, 4096), np.float32))
  assert path.stat().st_size < 200_000  # 64 MiB of arrays
  monkeypatch.setenv('VIT_JAX_MAX_WEIGHTS_BYTES', str(2**20))
  with pytest.raises(limits.LimitError, match=r'bomb\.npz: arrays: 67,108'):
    weight_files.read(path)


def _safetensors_with_header(path, header: dict, data: bytes = b'') -> None:
  text = json.dumps(header).encode()
  path.write_bytes(struct.pack('<Q', len(text)) + text + data)


@pytest.mark.parametrize('damage, match', [
    ('offsets_past_end', r"array 'w' lies outside the file"),
    ('huge_header_length', r'its header claims 4,611,686,018,427,387,904'),
    ('truncated', r'too short for a safetensors header'),
    ('overlapping', r'Cannot read .*SafetensorError'),
    ('huge_shape', r'Cannot read .*SafetensorError'),
])
def test_damaged_safetensors_are_one_line(tmp_path, damage, match):
  path = tmp_path / 'model.safetensors'
  if damage == 'offsets_past_end':
    _safetensors_with_header(path, {'w': {'dtype': 'F32', 'shape': [4],
                                          'data_offsets': [0, 16]}}, b'x' * 8)
  elif damage == 'huge_header_length':
    path.write_bytes(struct.pack('<Q', 2**62) + b'{}')
  elif damage == 'truncated':
    path.write_bytes(b'\x10\x00')
  elif damage == 'overlapping':
    _safetensors_with_header(path, {
        'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]},
        'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}},
                             b'\x00' * 12)
  else:
    _safetensors_with_header(path, {'w': {'dtype': 'F32',
                                          'shape': [2**40, 2**20],
                                          'data_offsets': [0, 8]}}, b'\0' * 8)
  with pytest.raises(ValueError, match=match) as info:
    weight_files.read(path)
  assert '\n' not in str(info.value)


@pytest.mark.parametrize('bad', ['nan', 'int32'])
def test_timm_and_hf_weights_pass_the_values_check(tmp_path, bad):
  """A model.safetensors of NaN predicted `airplane nan` with exit 0; int32
  weights `automobile 1.000`."""
  for kind, build in (('timm', pytorch_tests.timm_folder),
                      ('hf', hf_tests.hf_folder)):
    folder = tmp_path / kind
    state = build(folder)
    name = sorted(state)[0]
    state[name] = (np.full_like(state[name], np.nan) if bad == 'nan'
                   else state[name].astype(np.int32))
    safetensors.numpy.save_file(state, folder / 'model.safetensors')
    match = 'non-finite' if bad == 'nan' else 'dtype int32'
    with pytest.raises(ValueError, match=match):
      sources.load(folder)


# --- links: nothing we write goes through one ------------------------------------

KEEP = 'keep me\n'


@pytest.fixture
def victim(tmp_path) -> pathlib.Path:
  """A file outside the folder being written, that must stay as it is."""
  path = tmp_path / 'victim.txt'
  path.write_text(KEEP)
  return path


@pytest.fixture
def workdir(tmp_path) -> pathlib.Path:
  path = tmp_path / 'run'
  path.mkdir()
  return path

def test_a_symlinked_lock_cannot_empty_a_file_outside_the_workdir(victim,
                                                                 workdir):
  (workdir / 'LOCK').symlink_to(victim)
  with pytest.raises(files.UnsafeFileError, match=r'LOCK is a symbolic link'):
    lock_lib.WorkdirLock(workdir).acquire()
  assert victim.read_text() == KEEP


@pytest.mark.parametrize('kind', ['directory', 'fifo'])
def test_a_lock_that_is_no_regular_file_is_one_line(workdir, kind):
  if kind == 'directory':
    (workdir / 'LOCK').mkdir()
  else:
    os.mkfifo(workdir / 'LOCK')
  with pytest.raises(files.UnsafeFileError, match='LOCK is'):
    lock_lib.WorkdirLock(workdir).acquire()


def test_the_trainer_refuses_a_symlinked_lock_in_one_line(victim, workdir,
                                                          tfds_data_dir):
  import runs  # pylint: disable=import-outside-toplevel
  (workdir / 'LOCK').symlink_to(victim)
  result = subprocess.run(runs.cli(tfds_data_dir, workdir), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1 and 'LOCK is a symbolic link' in errors[0]
  assert victim.read_text() == KEEP


def test_a_symlinked_checkpoints_folder_is_refused(tmp_path, workdir):
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  (workdir / 'checkpoints').symlink_to(elsewhere)
  with pytest.raises(paths.WorkdirError, match='symbolic link'):
    paths.prepare_for_writing(workdir)


def test_a_link_planted_at_the_write_probe_is_not_written_through(victim,
                                                                  workdir):
  (workdir / f'.write-test-{os.getpid()}').symlink_to(victim)
  paths.prepare_for_writing(workdir)  # probes with a name of its own
  assert victim.read_text() == KEEP


def test_atomic_writes_replace_a_link_and_never_follow_it(tmp_path, victim):
  (tmp_path / 'metrics.json').symlink_to(victim)
  files.write_json(tmp_path / 'metrics.json', {'accuracy': 1.0})
  assert victim.read_text() == KEEP
  assert not (tmp_path / 'metrics.json').is_symlink()
  assert json.loads((tmp_path / 'metrics.json').read_text()) == {
      'accuracy': 1.0}
  (tmp_path / 'config.json').mkdir()
  with pytest.raises(files.UnsafeFileError, match='is a directory'):
    files.write_json(tmp_path / 'config.json', {})


def test_event_files_are_opened_without_following_links(tmp_path, victim):
  (tmp_path / 'events').symlink_to(victim)
  with pytest.raises(files.UnsafeFileError, match='symbolic link'):
    files.open_regular(tmp_path / 'events', os.O_WRONLY | os.O_APPEND)
  assert victim.read_text() == KEEP


def test_exporting_onto_a_link_leaves_neither_the_target_changed_nor_a_link(
    tmp_path):
  target = tmp_path / 'somewhere' / 'earlier'
  sources.write_export(pytorch_tests.tiny_source(), target, 'earlier',
                       formats=('npz',))
  before = {p.name: p.read_bytes() for p in target.iterdir()}
  out = tmp_path / 'out'
  out.symlink_to(target)
  sources.write_export(pytorch_tests.tiny_source(), out, 'tiny',
                       formats=('npz', 'timm'))
  assert {p.name: p.read_bytes() for p in target.iterdir()} == before
  assert out.is_dir() and not out.is_symlink()
  assert (out / 'tiny.npz').is_file()
  leftovers = [p.name for p in tmp_path.iterdir() if '.old-' in p.name
               or '.partial-' in p.name]
  assert leftovers == []


def test_every_exported_file_is_readable_by_others(tmp_path):
  """Exported .safetensors files were 0600, the rest of the export 0644."""
  out = tmp_path / 'out'
  sources.write_export(pytorch_tests.tiny_source(), out, 'tiny',
                       formats=('npz', 'safetensors', 'timm', 'hf'))
  modes = {str(p.relative_to(out)): p.stat().st_mode & 0o777
           for p in out.rglob('*')}
  assert {m for p, m in modes.items() if (out / p).is_file()} == {0o644}, modes
  assert {m for p, m in modes.items() if (out / p).is_dir()} == {0o755}, modes


def test_a_second_export_into_the_same_folder_at_once_is_refused(tmp_path):
  """Both exited 0 before; the folder held the first one's model."""
  out = tmp_path / 'out'
  holder = subprocess.Popen(
      [sys.executable, '-c',
       'import sys; from vit_jax.runs import lock; '
       f'l = lock.WorkdirLock({str(out)!r}, {str(tmp_path / ".out.lock")!r})'
       '.acquire(); print("held", flush=True); sys.stdin.read()'],
      cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == 'held'
    with pytest.raises(lock_lib.WorkdirBusyError,
                       match=r'in use by another run: pid .*--output'):
      sources.write_export(pytorch_tests.tiny_source(), out, 'tiny',
                           formats=('npz',))
    assert not out.exists()
  finally:
    holder.stdin.close()
    holder.wait(timeout=600)
  sources.write_export(pytorch_tests.tiny_source(), out, 'tiny',
                       formats=('npz',))  # released: the export goes ahead
  assert (out / 'tiny.npz').is_file()
