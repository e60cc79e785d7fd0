"""Input pipeline: real CIFAR-10, real ImageNet photos, generated image folders."""
import itertools
import json
import os
import pathlib
import sys
import warnings

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import runs
from vit_jax.data import augment
from vit_jax.data import sources as data_sources
from vit_jax.data import pipeline as ip
from vit_jax.data import preprocess

TRAIN_VALUES = {'Dog': range(20, 84, 8), 'cat': range(84, 148, 8),
                'zebra': range(148, 212, 8)}  # 24 train images, 8 per class.
CLASSES = ['Dog', 'cat', 'emu', 'zebra']  # sorted(): upper case first.


def _sharding(num_devices: int) -> NamedSharding:
  mesh = Mesh(np.array(jax.devices()[:num_devices]), ('data',))
  return NamedSharding(mesh, P('data'))


def _colour(value: int, shape) -> tf.Tensor:
  return tf.fill(list(shape) + [3], tf.constant(value, tf.uint8))


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> pathlib.Path:
  """train/{Dog,cat: png, zebra: jpeg} + 3 bad files, test/ with 'emu'.

  Every image is one constant colour, unique per image, so any crop or resize
  of it still tells which file it came from.
  """
  root = tmp_path_factory.mktemp('folder')
  for cls, values in TRAIN_VALUES.items():
    os.makedirs(root / 'train' / cls)
    for i, v in enumerate(values):
      shape = (10 + 3 * i, 17 - i)
      if cls == 'zebra':
        data = tf.io.encode_jpeg(_colour(v, shape), quality=100)
        name = f'{i}.JPEG'
      else:
        data, name = tf.io.encode_png(_colour(v, shape)), f'{i}.png'
      tf.io.write_file(str(root / 'train' / cls / name), data)
  good = tf.io.encode_jpeg(_colour(50, (40, 40))).numpy()
  (root / 'train' / 'cat' / 'truncated.jpg').write_bytes(good[:len(good) // 2])
  (root / 'train' / 'Dog' / 'garbage.png').write_bytes(b'not an image' * 10)
  (root / 'train' / 'Dog' / 'empty.png').write_bytes(b'')
  (root / 'train' / 'Dog' / 'notes.txt').write_text('ignored: not an image')
  for i in range(37):  # 37: the last eval batch is partial everywhere.
    cls = CLASSES[i % 4]
    os.makedirs(root / 'test' / cls, exist_ok=True)
    tf.io.write_file(str(root / 'test' / cls / f'{i:02d}.png'),
                     tf.io.encode_png(_colour(3 + 6 * i, (9 + i % 5, 12))))
  return root


def _test_labels():
  return {3 + 6 * i: CLASSES.index(CLASSES[i % 4]) for i in range(37)}


def _values(image: jax.Array) -> np.ndarray:
  """Colour of each constant-colour image, back in 0..255."""
  return np.rint((np.asarray(image)[:, 0, 0, 0] + 1) * 127.5).astype(int)


def _folder_info(folder):
  with pytest.warns(RuntimeWarning, match=r'Skipped 3 of 27 image files'):
    data_sources._SOURCES.clear()  # A fresh scan, so the warning is raised here.
    return ip.get_dataset_info(f'imagefolder:{folder}')


# ----------------------------------------------------------- image folders
def test_folder_info_class_order_and_corrupt_files_warned(folder):
  info = _folder_info(folder)
  assert info.label_names == CLASSES and info.num_classes == 4
  assert (info.train_split, info.eval_split) == ('train', 'test')
  assert (info.num_train_examples, info.num_eval_examples) == (24, 37)
  assert info.default_resolution == 224
  with warnings.catch_warnings():  # Cached: no second scan, no second warning.
    warnings.simplefilter('error')
    ip.get_dataset_info(f'imagefolder:{folder}')


def test_folder_train_epochs_cover_every_image_once(folder):
  _folder_info(folder)
  it = ip.train_iterator(f'imagefolder:{folder}', split='train',
                         global_batch_size=8, image_size=(8, 12),
                         sharding=_sharding(8), seed=0)
  epochs = []
  for _ in range(2):
    seen, labels = [], []
    for _ in range(3):  # 24 images / 8 = 3 batches per epoch.
      b = next(it)
      assert b['image'].shape == (8, 8, 12, 3) and b['label'].shape == (8, 4)
      assert len(b['image'].addressable_shards) == 8
      image = np.asarray(b['image'])
      # A crop of a constant image stays constant (JPEG within +-2 levels).
      assert np.ptp(image, axis=(1, 2, 3)).max() < 2 / 127.5 + 1e-6
      seen += _values(b['image']).tolist()
      labels += np.asarray(b['label']).argmax(1).tolist()
    expected = [v for vs in TRAIN_VALUES.values() for v in vs]
    near = [min(expected, key=lambda e: abs(e - v)) for v in seen]
    assert max(abs(a - b) for a, b in zip(near, seen)) <= 2
    assert sorted(near) == sorted(expected)  # Every image exactly once.
    cls_of = {v: CLASSES.index(c) for c, vs in TRAIN_VALUES.items() for v in vs}
    assert labels == [cls_of[v] for v in near]
    epochs.append(near)
  assert epochs[0] != epochs[1]  # Reshuffled each epoch.
  assert it.examples == 6 * 8


@pytest.mark.parametrize('num_devices,batch', [(1, 5), (8, 8)])
def test_folder_eval_exactly_once(folder, num_devices, batch):
  _folder_info(folder)
  ev = ip.eval_iterator(f'imagefolder:{folder}', split='test',
                        global_batch_size=batch, image_size=6,
                        sharding=_sharding(num_devices))
  assert len(ev) == -(-37 // batch)
  for _ in range(2):  # Re-iterable.
    rows = []
    for b in ev:
      assert b['label'].dtype == np.int32 and b['mask'].dtype == bool
      assert b['image'].shape == (batch, 6, 6, 3)
      assert len(b['mask'].addressable_shards) == num_devices
      mask = np.asarray(b['mask'])
      rows += list(zip(_values(b['image'])[mask], np.asarray(b['label'])[mask]))
      assert not np.asarray(b['image'])[~mask].any()  # Padding is zeros.
    assert sorted(rows) == sorted(_test_labels().items())


def test_folder_errors(folder, tmp_path):
  sh = _sharding(8)
  with pytest.raises(ValueError, match='does not exist'):
    ip.get_dataset_info(f'imagefolder:{tmp_path}/missing')
  os.makedirs(tmp_path / 'empty' / 'train' / 'cat')
  with pytest.raises(ValueError, match='holds no readable'):
    ip.get_dataset_info(f'imagefolder:{tmp_path}/empty')
  _folder_info(folder)
  with pytest.raises(ValueError, match=r"split 'validation'.*\['test', 'train'\]"):
    ip.eval_iterator(f'imagefolder:{folder}', split='validation',
                     global_batch_size=8, image_size=8, sharding=sh)
  with pytest.raises(ValueError, match='global_batch_size=12 .* 8 devices'):
    ip.train_iterator(f'imagefolder:{folder}', split='train', seed=0,
                      global_batch_size=12, image_size=8, sharding=sh)
  with pytest.raises(ValueError, match="resize must be one of"):
    ip.eval_iterator(f'imagefolder:{folder}', global_batch_size=8,
                     image_size=8, sharding=sh, resize='crop')


def test_batch_error_raised_before_reading_any_data():
  # The dataset does not exist: the batch check must fire first and alone.
  with pytest.raises(ValueError, match='not divisible by the 8 devices'):
    ip.train_iterator('no_such_dataset_xyz', split='train', seed=0,
                      global_batch_size=20, image_size=8, sharding=_sharding(8))


def test_unknown_dataset_lists_close_matches():
  with pytest.raises(ValueError, match=r"Unknown dataset 'cifar1O'.*cifar10"):
    ip.get_dataset_info('cifar1O')


# -------------------------------------------------------------- real CIFAR
def test_cifar_info(tfds_data_dir):
  info = ip.get_dataset_info('cifar10', tfds_data_dir)
  assert (info.num_classes, info.train_split, info.eval_split) == (
      10, 'train[:98%]', 'test')
  assert (info.num_train_examples, info.num_eval_examples) == (49_000, 10_000)
  assert info.label_names[:2] == ['airplane', 'automobile']
  assert (info.default_resolution, info.default_steps) == (384, 10_000)


def test_cifar_unknown_split(tfds_data_dir):
  with pytest.raises(ValueError, match=r"'trian'.*\['test', 'train'\]"):
    ip.eval_iterator('cifar10', split='trian', data_dir=tfds_data_dir,
                     global_batch_size=8, image_size=32, sharding=_sharding(8))


def _cifar_train(tfds_data_dir, **kw):
  args = dict(split='train[:200]', data_dir=tfds_data_dir, global_batch_size=16,
              image_size=32, sharding=_sharding(8), seed=0, shuffle_buffer=64)
  return ip.train_iterator('cifar10', **{**args, **kw})


def _take(it, n):
  return [{k: np.asarray(v) for k, v in next(it).items()} for _ in range(n)]


def test_cifar_train_shapes_ranges_and_labels(tfds_data_dir):
  for b in _take(_cifar_train(tfds_data_dir, image_size=(24, 40)), 3):
    assert b['image'].shape == (16, 24, 40, 3) and b['image'].dtype == np.float32
    assert -1.0 <= b['image'].min() < -0.5 and 0.5 < b['image'].max() <= 1.0
    assert b['label'].shape == (16, 10)
    np.testing.assert_array_equal(np.sort(b['label'], 1)[:, -1], 1.0)
    np.testing.assert_array_equal(b['label'].sum(1), 1.0)


def test_cifar_train_deterministic_and_resumable(tfds_data_dir):
  # 200 examples / 16 = 12.5 batches per epoch: batches 12.. cross the epoch.
  full = _take(_cifar_train(tfds_data_dir), 16)
  again = _take(_cifar_train(tfds_data_dir, num_parallel_calls=1, prefetch=1), 16)
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])
  other = _take(_cifar_train(tfds_data_dir, seed=1), 1)
  assert not np.array_equal(other[0]['image'], full[0]['image'])
  for start in (5, 12, 13):
    it = _cifar_train(tfds_data_dir, start_example=start * 16)
    assert it.examples == start * 16
    resumed = _take(it, 16 - start)
    assert it.examples == 16 * 16
    for a, b in zip(full[start:], resumed):
      np.testing.assert_array_equal(a['image'], b['image'])
      np.testing.assert_array_equal(a['label'], b['label'])
  # Positions count examples: a run resumed with batch 8 instead of 16 goes
  # on with the very next examples, across the epoch boundary too.
  for start in (5, 12):
    smaller = _take(_cifar_train(tfds_data_dir, global_batch_size=8,
                                 start_example=start * 16), 2)
    for half, batch in enumerate(smaller):
      rows = slice(8 * half, 8 * half + 8)
      np.testing.assert_array_equal(batch['image'], full[start]['image'][rows])
      np.testing.assert_array_equal(batch['label'], full[start]['label'][rows])


def test_cifar_randaugment_mixup_cutmix(tfds_data_dir):
  kw = dict(randaugment=(2, 15), mixup_alpha=0.2, cutmix_alpha=1.0,
            image_size=48)
  batches = _take(_cifar_train(tfds_data_dir, **kw), 6)
  resumed = _take(_cifar_train(tfds_data_dir, start_example=4 * 16, **kw), 2)
  np.testing.assert_array_equal(batches[4]['image'], resumed[0]['image'])
  plain = _take(_cifar_train(tfds_data_dir, image_size=48), 1)[0]
  assert not np.array_equal(plain['image'], batches[0]['image'])
  for b in batches:
    assert np.isfinite(b['image']).all()
    assert -1.0 <= b['image'].min() and b['image'].max() <= 1.0
    np.testing.assert_allclose(b['label'].sum(1), 1.0, atol=1e-5)
    assert (b['label'] >= 0).all()
  mixed = np.concatenate([b['label'] for b in batches])
  assert (mixed.max(1) < 1.0).any()  # Soft labels appear.


# --------------------------------------------------- global_order=True
def _stream(src, split, n, *, local_batch, process_index=0, process_count=1,
            start=0, **kw):
  """First n host batches of one process's train_dataset (no devices)."""
  args = dict(size=(32, 32), seed=0, randaugment=None, mixup_alpha=0.0,
              cutmix_alpha=0.0, shuffle_buffer=64,
              num_parallel_calls=tf.data.AUTOTUNE)
  per_batch = local_batch * (process_count if kw.get('global_order') else 1)
  ds = ip.train_dataset(src, split, local_batch=local_batch,
                        start_example=start * per_batch,
                        process_index=process_index,
                        process_count=process_count, **{**args, **kw})
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def _joined(parts):
  """Global batches = each process's local batch, concatenated in order."""
  return [{k: np.concatenate([p[i][k] for p in parts]) for k in parts[0][i]}
          for i in range(len(parts[0]))]


def _assert_same(batches, others):
  assert len(batches) == len(others)
  for a, b in zip(batches, others):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['label'], b['label'])


def test_global_order_batches_do_not_depend_on_process_count(tfds_data_dir):
  src = data_sources.open_source('cifar10', tfds_data_dir, None)
  split = 'train[:200]'  # 12.5 global batches of 16 per epoch; 14 cross it.
  one = _stream(src, split, 14, local_batch=16, global_order=True)
  # On 1 process global order is the default stream.
  _assert_same(one, _stream(src, split, 14, local_batch=16))
  halves = [_stream(src, split, 14, local_batch=8, process_index=p,
                    process_count=2, global_order=True) for p in range(2)]
  _assert_same(one, _joined(halves))
  quarters = [_stream(src, split, 14, local_batch=4, process_index=p,
                      process_count=4, global_order=True) for p in range(4)]
  _assert_same(one, _joined(quarters))
  # A process whose devices hold non-contiguous rows keeps those, ascending.
  odd = _stream(src, split, 2, local_batch=8, process_count=2,
                global_order=True, rows=range(1, 16, 2))
  _assert_same([{k: v[1::2] for k, v in b.items()} for b in one[:2]], odd)
  for start in (12, 13):  # Resume at and after the epoch boundary.
    _assert_same(halves[1][start:],
                 _stream(src, split, 14 - start, local_batch=8, start=start,
                         process_index=1, process_count=2, global_order=True))


def test_global_order_mixup_mixes_within_each_process(tfds_data_dir):
  src = data_sources.open_source('cifar10', tfds_data_dir, None)
  kw = dict(global_order=True, mixup_alpha=0.2, cutmix_alpha=1.0)
  one = _stream(src, 'train[:64]', 4, local_batch=16, **kw)
  two = _joined([_stream(src, 'train[:64]', 4, local_batch=8, process_index=p,
                         process_count=2, **kw) for p in range(2)])
  inner = [r for r in range(16) if r % 8]  # Rows whose partner is local.
  _assert_same([{k: v[inner] for k, v in b.items()} for b in one],
               [{k: v[inner] for k, v in b.items()} for b in two])
  # A process's first row is mixed with its own last row instead.
  assert any(not np.array_equal(a['label'][8], b['label'][8])
             for a, b in zip(one, two))


def test_global_order_reads_only_own_files(folder, monkeypatch):
  _folder_info(folder)
  src = data_sources.open_source(f'imagefolder:{folder}', None, None)
  value_of = {str(folder / 'train' / c / (f'{i}.JPEG' if c == 'zebra' else
                                          f'{i}.png')): v
              for c, vs in TRAIN_VALUES.items() for i, v in enumerate(vs)}
  reads, read_file = [], tf.io.read_file

  def spy(path, name=None):  # Logs every file the stream reads, in order.
    path = tf.py_function(lambda p: reads.append(p.numpy().decode()) or p,
                          [path], tf.string)
    return read_file(tf.ensure_shape(path, []), name=name)

  monkeypatch.setattr(tf.io, 'read_file', spy)
  kw = dict(size=(4, 4), global_order=True, num_parallel_calls=1)
  one = _stream(src, 'train', 6, local_batch=8, **kw)  # 2 epochs.
  expected = sorted(value_of.values())
  near = lambda b: [min(expected, key=lambda e: abs(e - v))
                    for v in _values(b['image'])]
  parts = []
  for p in range(2):
    reads.clear()
    parts.append(_stream(src, 'train', 6, local_batch=4, process_index=p,
                         process_count=2, **kw))
    kept = [v for b in parts[-1] for v in near(b)]
    # Files are read in stream order, and only this process's ones.
    assert [value_of[r] for r in reads][:len(kept)] == kept
  _assert_same(one, _joined(parts))


@pytest.mark.parametrize('num_devices', [1, 8])
def test_cifar_eval_exactly_once(tfds_data_dir, num_devices):
  split, batch = 'test[:203]', 16
  ev = ip.eval_iterator('cifar10', split=split, data_dir=tfds_data_dir,
                        global_batch_size=batch, image_size=32,
                        sharding=_sharding(num_devices))
  rows, masks = [], 0
  for b in ev:
    image, label, mask = (np.asarray(b[k]) for k in ('image', 'label', 'mask'))
    # 32 -> 32 resize is the identity: recover the exact uint8 pixel sums.
    sums = np.rint((image.astype(np.float64) + 1) * 127.5).reshape(batch, -1)
    rows += list(zip(label[mask].tolist(), sums[mask].sum(1).astype(int).tolist()))
    masks += mask.size
  assert masks == 13 * batch and len(rows) == 203
  ref = tfds.load('cifar10', split=split, data_dir=tfds_data_dir,
                  download=False)
  expected = [(int(ex['label']), int(ex['image'].astype(np.int64).sum()))
              for ex in tfds.as_numpy(ref)]
  assert sorted(rows) == sorted(expected)


def test_eval_resize_crop_shapes(tfds_data_dir):
  ev = ip.eval_iterator('cifar10', split='test[:8]', data_dir=tfds_data_dir,
                        global_batch_size=8, image_size=(24, 16),
                        sharding=_sharding(8), resize='resize_crop')
  (b,) = list(ev)
  assert b['image'].shape == (8, 24, 16, 3)
  assert -1 <= np.asarray(b['image']).min() and np.asarray(b['image']).max() <= 1


# ------------------------------------------------- TFDS builders by name
class VitJaxTestTiny(tfds.core.GeneratorBasedBuilder):
  """A non-preset TFDS dataset, prepared on first use (no network)."""
  VERSION = tfds.core.Version('1.0.0')
  pkg_dir_path = pathlib.Path(__file__).parent  # tests/ is not a package.

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            'picture': tfds.features.Image(shape=(None, None, 3)),
            'kind': tfds.features.ClassLabel(names=['a', 'b', 'c'])}),
        supervised_keys=('picture', 'kind'))

  def _split_generators(self, dl_manager):
    return {'train': self._generate_examples(30),
            'validation': self._generate_examples(7)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {'picture': np.full((5 + i, 6, 3), i, np.uint8), 'kind': i % 3}


def test_other_tfds_dataset_is_prepared_and_read(tmp_path):
  info = ip.get_dataset_info('vit_jax_test_tiny', str(tmp_path))
  assert (info.num_classes, info.label_names) == (3, ['a', 'b', 'c'])
  assert (info.train_split, info.eval_split) == ('train', 'validation')
  assert (info.num_train_examples, info.num_eval_examples) == (30, 7)
  ev = ip.eval_iterator('vit_jax_test_tiny', data_dir=str(tmp_path),
                        global_batch_size=8, image_size=4, sharding=_sharding(8))
  rows = [(v, l) for b in ev for v, l, m in zip(
      _values(b['image']), np.asarray(b['label']), np.asarray(b['mask'])) if m]
  assert sorted(rows) == [(i, i % 3) for i in range(7)]


class VitJaxTestUnpreparable(VitJaxTestTiny):
  """Stands for a dataset that cannot be prepared here (no network)."""

  def _split_generators(self, dl_manager):
    raise ConnectionError('no internet')


def test_unpreparable_dataset_raises_with_a_hint(tmp_path):
  # What is missing where comes first, the download's own failure after it.
  with pytest.raises(ValueError, match=(
      r"TFDS dataset 'vit_jax_test_unpreparable' is not prepared under "
      r'--config.data_dir.*no vit_jax_test_unpreparable/1.0.0/dataset_info'
      r'.json in .*ConnectionError: no internet.*Point --config.data_dir at '
      r'a prepared copy')):
    ip.get_dataset_info('vit_jax_test_unpreparable', str(tmp_path))


# -------------------------------------------------------- preprocessing ops
def test_inception_crop_on_real_imagenet_photos(imagenet_samples):
  files = sorted(imagenet_samples.glob('*.JPEG'))[:12]
  areas = []
  for i, f in enumerate(files):
    data = tf.io.read_file(str(f))
    seed = tf.constant([7, i], tf.int64)
    image = preprocess.inception_crop(data, seed, (224, 224))
    assert image.shape == (224, 224, 3) and image.dtype == tf.float32
    assert 0 <= float(tf.reduce_min(image)) and float(tf.reduce_max(image)) <= 255
    np.testing.assert_array_equal(
        image, preprocess.inception_crop(data, seed, (224, 224)))
    crop = preprocess.resize_shorter_and_crop(preprocess.decode(data), (224, 160))
    assert crop.shape == (224, 160, 3)
    areas.append(float(tf.reduce_mean(image)))
  assert len(set(areas)) == len(files)


def test_inception_crop_area_and_aspect_bounds():
  data = tf.io.encode_png(tf.zeros([200, 300, 3], tf.uint8))
  shape = tf.constant([200, 300, 3], tf.int32)
  for i in range(50):
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape, tf.zeros([0, 0, 4]), seed=[i, 0], min_object_covered=0.0,
        aspect_ratio_range=(3 / 4, 4 / 3), area_range=(0.05, 1.0),
        max_attempts=10, use_image_if_no_bounding_boxes=True)
    area = float(size[0] * size[1]) / (200 * 300)
    assert 0.04 <= area <= 1.0
  assert preprocess.inception_crop(data, tf.constant([1, 2]), (7, 9)).shape == (7, 9, 3)


def test_randaugment_range_and_determinism():
  image = tf.cast(tf.reshape(tf.range(32 * 32 * 3) % 256, [32, 32, 3]), tf.float32)
  outs = [augment.randaugment(image, tf.constant([s, 1]), 2, 10) for s in range(40)]
  for out in outs:
    assert out.shape == (32, 32, 3)
    assert 0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255
  np.testing.assert_array_equal(
      outs[3], augment.randaugment(image, tf.constant([3, 1]), 2, 10))
  distinct = {np.asarray(o).tobytes() for o in outs}
  assert len(distinct) > 20  # Different ops/signs per seed.


def test_cutmix_label_weight_is_kept_area():
  values = tf.constant([10.0, 20.0, 30.0, 40.0])
  images = tf.broadcast_to(values[:, None, None, None], [4, 16, 16, 3])
  labels = tf.one_hot(tf.range(4), 4)
  for s in range(10):
    mixed, mixed_labels = augment.mix_batch(images, labels, tf.constant([s, 0]),
                                               cutmix_alpha=1.0)
    for i in range(4):
      own = float(tf.reduce_mean(tf.cast(mixed[i] == values[i], tf.float32)))
      np.testing.assert_allclose(mixed_labels[i, i], own, atol=1e-6)
      np.testing.assert_allclose(mixed_labels[i, (i - 1) % 4], 1 - own, atol=1e-6)
    mixed, mixed_labels = augment.mix_batch(images, labels, tf.constant([s, 0]),
                                               mixup_alpha=0.4)
    lam = mixed_labels[0, 0]
    np.testing.assert_allclose(mixed[0, 0, 0, 0], lam * 10 + (1 - lam) * 40,
                               rtol=1e-5)


def test_multi_hot_for_real_labels():
  hot = preprocess.multi_hot(tf.constant([3, 7, 3], tf.int64), 10)
  np.testing.assert_array_equal(np.flatnonzero(hot), [3, 7])
  assert hot.dtype == tf.bool
  assert not preprocess.multi_hot(tf.zeros([0], tf.int64), 10).numpy().any()


# -------------------------------------------------------------- 2 processes
def test_two_processes(folder, tmp_path, request):
  """2 processes x 4 devices: folder eval/train, CIFAR eval, batch errors,
  CIFAR global-order train batches equal to those of 1 process x 8 devices.

  The CIFAR part runs where the shared data is present; the rest always.
  """
  _folder_info(folder)
  try:
    tfds_dir = request.getfixturevalue('tfds_data_dir')
  except pytest.skip.Exception:
    tfds_dir = ''
  port = runs.free_port()
  worker = pathlib.Path(__file__).with_name('input_multiprocess_worker.py')
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env['PYTHONWARNINGS'] = 'ignore'
  procs = [runs.start(
      [sys.executable, str(worker), str(i), '2', str(port), str(folder),
       tfds_dir, str(tmp_path / f'out{i}.json')], env=env) for i in range(2)]
  logs = [p.communicate(timeout=240)[0][-3000:] for p in procs]
  assert all(p.returncode == 0 for p in procs), logs
  res = [json.loads((tmp_path / f'out{i}.json').read_text()) for i in range(2)]
  for r in res:
    assert (r['process_count'], r['device_count']) == (2, 8)
    folder_rows = sorted(tuple(x) for x in r['folder_eval']['rows'])
    assert folder_rows == sorted((l, v) for v, l in _test_labels().items())
    assert r['folder_eval']['batches'] == 5  # ceil(max(19, 18) / 4).
    assert r['train_shape'] == [8, 8, 8, 3] and r['train_label_shape'] == [8, 4]
    assert r['train_examples'] == 3 * 8
    assert r['errors']['odd_processes'] and 'number of processes (2)' in \
        r['errors']['odd_processes']
    assert 'not divisible by the 8 devices' in r['errors']['odd_devices']
    assert 'equal, disjoint share' in r['errors']['replicated_rows']
  assert res[0]['train_values'] == res[1]['train_values']  # Same global batch.
  expected = sorted(v for vs in TRAIN_VALUES.values() for v in vs)
  got = res[0]['train_local_values'] + res[1]['train_local_values']
  near = sorted(min(expected, key=lambda e: abs(e - v)) for v in got)
  assert near == expected  # Disjoint halves: one epoch over both processes.
  if tfds_dir:
    ref = tfds.load('cifar10', split='test[:203]', data_dir=tfds_dir,
                    download=False)
    expected_rows = sorted((int(ex['label']), int(ex['image'].astype(np.int64).sum()))
                           for ex in tfds.as_numpy(ref))
    for r in res:
      assert sorted(tuple(x) for x in r['cifar_eval']['rows']) == expected_rows
      assert r['cifar_eval']['batches'] == 13  # ceil(102 / 8).
    # The worker's kwargs, on this one process with 8 devices.
    expected = _take(ip.train_iterator(
        'cifar10', split='train[:2%]', data_dir=tfds_dir, global_batch_size=16,
        image_size=32, sharding=_sharding(8), seed=5, global_order=True), 3)
    for i in range(2):
      got = np.load(tmp_path / f'out{i}.npz')
      _assert_same(expected, [{'image': got['image'][k],
                               'label': got['label'][k]} for k in range(3)])
      _assert_same(expected[2:], [{'image': got['resumed_image'],
                                   'label': got['resumed_label']}])


def test_crop_min_area_bounds_the_inception_crop():
  image = tf.random.stateless_uniform([32, 32, 3], [0, 0], maxval=256,
                                      dtype=tf.int32)
  image = tf.cast(image, tf.uint8)
  data = tf.io.encode_png(image)
  whole = np.asarray(preprocess.to_unit_range(image))
  candidates = (whole, whole[:, ::-1])

  def crops(min_area):
    return [np.asarray(augment.train_image(data, tf.constant([s, 0]),
                                              (32, 32), crop_min_area=min_area))
            for s in range(8)]

  for out in crops(1.0):  # the whole image, maybe mirrored
    assert any(np.array_equal(out, c) for c in candidates)
  assert not all(any(np.array_equal(out, c) for c in candidates)
                 for out in crops(0.05))


def test_crop_min_area_out_of_range_is_refused(tfds_data_dir):
  with pytest.raises(ValueError, match=r'crop_min_area must be in \(0, 1\], '
                     r'got 1.5'):
    _cifar_train(tfds_data_dir, crop_min_area=1.5)
