"""Input pipelines: TFDS datasets and image folders -> global `jax.Array`s.

Sources
  * Any TFDS name (presets in `PRESETS` give splits, classes, resolution and
    steps). A dataset missing from `data_dir` is prepared (with `manual_dir`
    for manual downloads); a prepared copy is read as is, without network.
  * `'imagefolder:/root'` reads `root/<split>/<class>/*.{jpg,jpeg,png}` (any
    case). Class index = position of the class directory name in the sorted
    (Python `sorted`, case-sensitive) union of class directories of all splits,
    so train and test always agree. Files that cannot be read or decoded are
    skipped with a warning that counts them.
Determinism and resume
  Each process reads its own part of the split (`tfds.split_for_jax_process`).
  Epoch e of that part is shuffled (encoded records, before decoding) with a
  seed derived from (seed, process, e); example i of the endless stream is
  augmented with stateless ops seeded by (seed, process, i). Output therefore
  depends only on the seed, and batch k can be reached by skipping k*B encoded
  records of the current epoch (`start_position`), never a full re-decode.
Evaluation
  Every process yields the same number of batches; the tail is padded with
  zero images whose `mask` is False, so each example is counted exactly once.
"""
import collections
import dataclasses
import difflib
import itertools
import logging
import math
import numbers
import os
import sys
import types
import warnings
from typing import Any, Iterator, Sequence

import jax
import tensorflow as tf
import tensorflow_datasets as tfds

from vit_jax import preprocess  # Also hides GPUs from TensorFlow.

FOLDER_PREFIX = 'imagefolder:'
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
RESIZE_MODES = ('resize', 'resize_crop')
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  train_split: str | None  # None for eval-only datasets (ImageNet ReaL, v2).
  eval_split: str | None
  num_train_examples: int
  num_eval_examples: int
  default_resolution: int
  default_steps: int
  label_names: list[str] | None = None


@dataclasses.dataclass(frozen=True)
class _Preset:
  train_split: str | None
  eval_split: str
  num_classes: int
  resolution: int
  steps: int
  label_key: str = 'label'
  multi_label_key: str | None = None  # Yielded as bool [B, C] 'real_labels'.


# Splits/steps/resolution of Google's ViT fine-tuning configs (held-out tail
# of train for validation); ReaL and v2 are evaluation-only ImageNet sets.
PRESETS = {
    'cifar10': _Preset('train[:98%]', 'test', 10, 384, 10_000),
    'cifar100': _Preset('train[:98%]', 'test', 100, 384, 10_000),
    'oxford_iiit_pet': _Preset('train[:90%]', 'test', 37, 384, 500),
    'oxford_flowers102': _Preset('train', 'test', 102, 384, 500),
    'imagenet2012': _Preset('train[:99%]', 'validation', 1000, 384, 20_000),
    'imagenet2012_real': _Preset(None, 'validation', 1000, 384, 0,
                                 label_key='original_label',
                                 multi_label_key='real_label'),
    'imagenet_v2': _Preset(None, 'test', 1000, 384, 0),
}
FOLDER_PRESET = _Preset('train', 'test', 0, 224, 500)
_OTHER_TFDS_DEFAULTS = (224, 10_000)  # resolution, steps for non-preset names.


# ------------------------------------------------------------------- sources
class _TfdsSource:
  """A TFDS dataset; records are {'image': encoded bytes, 'label', ...}."""
  reads_paths = False

  def __init__(self, name: str, data_dir: str | None, manual_dir: str | None):
    try:
      self.builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError:
      raise _unknown_dataset(name) from None
    if not self.builder.is_prepared():
      # Only reached when the data is not there: prepared copies never touch
      # the network (the offline machines rely on this).
      config = tfds.download.DownloadConfig(manual_dir=manual_dir)
      try:
        self.builder.download_and_prepare(download_config=config)
      except Exception as e:  # Network, manual files, missing extras...
        raise RuntimeError(
            f'TFDS dataset {name!r} is not prepared in {self.builder.data_dir}'
            f' and preparing it failed ({type(e).__name__}: {e}). Offline, '
            'pass data_dir= a prepared copy; manual datasets (imagenet2012) '
            'need manual_dir= with the downloaded files.') from e
    base = name.split('/')[0].split(':')[0]
    features = self.builder.info.features
    keys = self.builder.info.supervised_keys or ('image', 'label')
    self.preset = PRESETS.get(base) or _Preset(
        *_default_splits(self.builder.info.splits.keys()), 0,
        *_OTHER_TFDS_DEFAULTS,
        label_key=keys[1])
    self.image_key = keys[0] if base not in PRESETS else 'image'
    label = features[self.preset.label_key]
    if not isinstance(label, tfds.features.ClassLabel):
      raise ValueError(f'Dataset {name!r}: feature {self.preset.label_key!r} '
                       'is not a class label; only classification is '
                       'supported.')
    self.num_classes = self.preset.num_classes or label.num_classes
    self.label_names = list(label.names)

  def splits(self) -> list[str]:
    return sorted(self.builder.info.splits.keys())

  def num_examples(self, split: str, index: int = 0, count: int = 1) -> int:
    part = tfds.split_for_jax_process(split, process_index=index,
                                      process_count=count)
    return self.builder.info.splits[part].num_examples

  def records(self, split: str, index: int, count: int) -> tf.data.Dataset:
    part = tfds.split_for_jax_process(split, process_index=index,
                                      process_count=count)
    ds = self.builder.as_dataset(
        split=part, shuffle_files=False,  # Order is ours to control.
        decoders={self.image_key: tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(skip_prefetch=True))
    keys = {'image': self.image_key, 'label': self.preset.label_key}
    if self.preset.multi_label_key:
      keys['real_label'] = self.preset.multi_label_key
    return ds.map(lambda ex: {k: ex[v] for k, v in keys.items()})


def _default_splits(names) -> tuple[str | None, str | None]:
  """'train' and the first of test/validation/val that the dataset has."""
  evals = [s for s in ('test', 'validation', 'val') if s in names]
  return ('train' if 'train' in names else None), (evals[0] if evals else None)


class _FolderSource:
  """`root/<split>/<class>/<file>`; records are {'image': path, 'label'}."""
  reads_paths = True

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist; expected '
                       'root/{train,test}/<class>/*.{jpg,jpeg,png}.')
    split_dirs = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d)))
    classes = {c for d in split_dirs for c in _subdirs(os.path.join(root, d))}
    self.label_names = sorted(classes)
    self.num_classes = len(classes)
    index = {c: i for i, c in enumerate(self.label_names)}
    files = {d: _scan_split(os.path.join(root, d), index) for d in split_dirs}
    self.files = {d: f for d, f in files.items() if f[0]}
    if not self.files:
      raise ValueError(f'Image folder {root!r} holds no readable '
                       f'{"/".join(IMAGE_EXTENSIONS)} images; expected '
                       'root/{train,test}/<class>/<image files>.')
    train, test = _default_splits(self.files)
    self.preset = dataclasses.replace(FOLDER_PRESET, num_classes=len(classes),
                                      train_split=train, eval_split=test)

  def splits(self) -> list[str]:
    return sorted(self.files)

  def _abs(self, split: str, index: int, count: int) -> list[Any]:
    infos = {k: types.SimpleNamespace(num_examples=len(v[0]))
             for k, v in self.files.items()}
    part = tfds.split_for_jax_process(split, process_index=index,
                                      process_count=count)
    return part.to_absolute(infos)

  def num_examples(self, split: str, index: int = 0, count: int = 1) -> int:
    return sum(len(range(len(self.files[a.splitname][0]))[a.from_:a.to])
               for a in self._abs(split, index, count))

  def records(self, split: str, index: int, count: int) -> tf.data.Dataset:
    paths, labels = [], []
    for a in self._abs(split, index, count):
      paths += self.files[a.splitname][0][a.from_:a.to]
      labels += self.files[a.splitname][1][a.from_:a.to]
    return tf.data.Dataset.from_tensor_slices(
        {'image': tf.constant(paths, tf.string),
         'label': tf.constant(labels, tf.int64)})


def _subdirs(path: str) -> list[str]:
  return [d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))]


def _scan_split(split_dir: str, class_index: dict[str, int]
                ) -> tuple[list[str], list[int]]:
  """Lists decodable images of one split (sorted by class, then file name)."""
  paths, labels = [], []
  for name in sorted(_subdirs(split_dir)):
    class_dir = os.path.join(split_dir, name)
    for f in sorted(os.listdir(class_dir)):
      if f.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(class_dir, f))
        labels.append(class_index[name])
  # Checked up front (a full decode) so the training stream never changes
  # length mid-run because of a bad file, which would break exact resume.
  good = preprocess.decodable(paths)
  bad = [p for p, ok in zip(paths, good) if not ok]
  if bad:  # Skipped to keep a long run alive, counted to keep it honest.
    msg = (f'Skipped {len(bad)} of {len(paths)} image files under '
           f'{split_dir!r} that could not be read or decoded, e.g. '
           f'{", ".join(bad[:3])}')
    warnings.warn(msg, RuntimeWarning, stacklevel=2)
    logging.warning(msg)
  return ([p for p, ok in zip(paths, good) if ok],
          [l for l, ok in zip(labels, good) if ok])


_SOURCES: dict[tuple[Any, ...], Any] = {}


def _source(dataset: str, data_dir: str | None, manual_dir: str | None):
  """Cached source: builders and folder scans are built once per process."""
  if dataset.startswith(FOLDER_PREFIX):
    root = os.path.abspath(os.path.expanduser(dataset[len(FOLDER_PREFIX):]))
    key = (root, _mtimes(root))  # A changed folder is rescanned.
    if key not in _SOURCES:
      _SOURCES[key] = _FolderSource(root)
    return _SOURCES[key]
  key = (dataset, data_dir)
  if key not in _SOURCES:
    _SOURCES[key] = _TfdsSource(dataset, data_dir, manual_dir)
  return _SOURCES[key]


def _mtimes(root: str) -> tuple[int, ...]:
  if not os.path.isdir(root):
    return ()
  dirs = [root] + [os.path.join(root, d) for d in _subdirs(root)]
  dirs += [os.path.join(d, c) for d in dirs[1:] for c in _subdirs(d)]
  return tuple(os.stat(d).st_mtime_ns for d in dirs)


def _unknown_dataset(name: str) -> ValueError:
  names = list(PRESETS) + ['imagefolder'] + list(tfds.list_builders())
  close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
  hint = f' Did you mean: {", ".join(close)}?' if close else ''
  return ValueError(
      f'Unknown dataset {name!r}.{hint} Use a preset ({", ".join(PRESETS)}), '
      f'any TFDS name (tfds.list_builders()), or "{FOLDER_PREFIX}/path/to/root".')


def _check_split(source, dataset: str, split: str | None) -> str:
  if not split:
    raise ValueError(f'Dataset {dataset!r} has no default split for this use; '
                     f'pass split= one of {source.splits()}.')
  try:
    source.num_examples(split)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(f'Unknown or invalid split {split!r} for dataset '
                     f'{dataset!r}; available splits: {source.splits()} '
                     f'(slices like "train[:98%]" allowed). ({e})') from None
  return split


def get_dataset_info(dataset: str, data_dir: str | None = None,
                     manual_dir: str | None = None) -> DatasetInfo:
  """Names, splits, sizes and defaults of a preset/TFDS/image-folder dataset."""
  src = _source(dataset, data_dir, manual_dir)
  p = src.preset
  return DatasetInfo(
      name=dataset, num_classes=src.num_classes, train_split=p.train_split,
      eval_split=p.eval_split,
      num_train_examples=src.num_examples(p.train_split) if p.train_split else 0,
      num_eval_examples=src.num_examples(p.eval_split) if p.eval_split else 0,
      default_resolution=p.resolution, default_steps=p.steps,
      label_names=src.label_names)


# ---------------------------------------------------------- tf.data streams
def _options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True  # Parallel map, in-order results.
  return ds.with_options(options)


def _encoded(src, records: tf.data.Dataset) -> tf.data.Dataset:
  if src.reads_paths:
    return records.map(lambda ex: {**ex, 'image': tf.io.read_file(ex['image'])})
  return records


def train_dataset(src, split: str, *, local_batch: int,
                  size: tuple[int, int], seed: int, start_position: int,
                  process_index: int, process_count: int,
                  randaugment: tuple[int, int] | None, mixup_alpha: float,
                  cutmix_alpha: float, shuffle_buffer: int,
                  num_parallel_calls: int) -> tf.data.Dataset:
  """Endless per-process tf.data stream of augmented batches (numpy side)."""
  n = src.num_examples(split, process_index, process_count)
  if n == 0:
    raise ValueError(f'Split {split!r} gives process {process_index} no '
                     'examples to train on.')
  key = tf.constant([seed, process_index], tf.int64)
  shuffle_key, example_key, mix_key = [
      tf.random.experimental.stateless_fold_in(key, i) for i in range(3)]
  records = src.records(split, process_index, process_count)
  # Path records are tiny, so folders get a full permutation each epoch.
  buffer = n if src.reads_paths else max(1, min(shuffle_buffer, n))
  first = start_position * local_batch
  first_epoch, offset = divmod(first, n)

  def epoch(e):
    epoch_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(shuffle_key, e),
        minval=0, maxval=2**62, dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed,
                           reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, sys.maxsize).flat_map(epoch)
  ds = _encoded(src, ds.skip(offset)).enumerate(start=first)

  def augment(index, ex):
    seed = tf.random.experimental.stateless_fold_in(example_key, index)
    return {'image': preprocess.train_image(ex['image'], seed, size,
                                            randaugment),
            'label': preprocess.one_hot(ex['label'], src.num_classes)}

  ds = ds.map(augment, num_parallel_calls=num_parallel_calls)
  ds = ds.batch(local_batch, drop_remainder=True)

  def mix(step, batch):  # Seeded by the batch index, so resumable too.
    seed = tf.random.experimental.stateless_fold_in(mix_key, step)
    image, label = preprocess.mix_batch(batch['image'], batch['label'], seed,
                                        mixup_alpha, cutmix_alpha)
    return {'image': image, 'label': label}

  if mixup_alpha > 0 or cutmix_alpha > 0:
    ds = ds.enumerate(start_position).map(
        mix, num_parallel_calls=num_parallel_calls)
  return _options(ds)


def eval_dataset(src, split: str, *, local_batch: int, size: tuple[int, int],
                 resize: str, process_index: int, process_count: int,
                 num_parallel_calls: int) -> tuple[tf.data.Dataset, int]:
  """Padded per-process eval stream and its number of batches (same on all)."""
  counts = [src.num_examples(split, i, process_count)
            for i in range(process_count)]
  if sum(counts) == 0:
    raise ValueError(f'Split {split!r} is empty: nothing to evaluate.')
  num_batches = math.ceil(max(counts) / local_batch)
  multi = src.preset.multi_label_key is not None

  def prepare(ex):
    out = {'image': preprocess.eval_image(ex['image'], size, resize),
           'label': tf.cast(ex['label'], tf.int32), 'mask': tf.constant(True)}
    if multi:
      out['real_labels'] = preprocess.multi_hot(ex['real_label'],
                                                src.num_classes)
    return out

  pad = {'image': tf.zeros(size + (3,), tf.float32),
         'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}
  if multi:
    pad['real_labels'] = tf.zeros([src.num_classes], tf.bool)
  padding = tf.data.Dataset.from_tensors(pad).repeat(
      num_batches * local_batch - counts[process_index])
  ds = padding
  if counts[process_index]:
    ds = _encoded(src, src.records(split, process_index, process_count))
    ds = ds.map(prepare, num_parallel_calls=num_parallel_calls)
    ds = ds.concatenate(padding)
  return _options(ds.batch(local_batch, drop_remainder=True)), num_batches


# ------------------------------------------------------------ to the devices
def _batch_sharding(sharding: jax.sharding.NamedSharding
                    ) -> jax.sharding.NamedSharding:
  """Partitions only the leading (batch) axis, whatever the array's rank."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(spec))


def _local_batch(global_batch: int, sharding: jax.sharding.NamedSharding
                 ) -> int:
  """Checks that the batch splits evenly; returns this process's share."""
  processes = jax.process_count()
  if not isinstance(global_batch, numbers.Integral) or global_batch <= 0:
    raise ValueError(f'global_batch_size must be a positive int, got '
                     f'{global_batch!r}.')
  if global_batch % processes:
    raise ValueError(f'global_batch_size={global_batch} is not divisible by '
                     f'the number of processes ({processes}).')
  spec = _batch_sharding(sharding).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  shards = math.prod(sharding.mesh.shape[a] for a in axes)
  if global_batch % shards:
    raise ValueError(
        f'global_batch_size={global_batch} is not divisible by the {shards} '
        f'devices the batch is sharded over (mesh axes {axes}); use a '
        f'multiple of {shards}.')
  rows = set()
  for index in _batch_sharding(sharding).addressable_devices_indices_map(
      (global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  if len(rows) != global_batch // processes:
    raise ValueError(f'The sharding gives process {jax.process_index()} '
                     f'{len(rows)} rows of a {global_batch} batch; the input '
                     'pipeline needs each process to own an equal, disjoint '
                     'share of the batch axis.')
  return int(global_batch) // processes


def _device_batches(ds: tf.data.Dataset, sharding: jax.sharding.NamedSharding,
                    global_batch: int, prefetch: int) -> Iterator[Batch]:
  """Host batches -> global arrays, keeping `prefetch` transfers in flight.

  `make_array_from_process_local_data` starts the host->device copies
  asynchronously, so building the next arrays before yielding the current
  ones overlaps the copy with the caller's step.
  """
  sharding = _batch_sharding(sharding)
  batches = ds.prefetch(max(prefetch, 1)).as_numpy_iterator()

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (global_batch,) + v.shape[1:]) for k, v in batch.items()}

  queue = collections.deque(
      to_global(b) for b in itertools.islice(batches, max(prefetch, 1)))
  while queue:
    yield queue.popleft()
    queue.extend(to_global(b) for b in itertools.islice(batches, 1))


class TrainIterator:
  """Endless iterator of global batches; `position` = batches consumed."""

  def __init__(self, ds: tf.data.Dataset, sharding, global_batch: int,
               start_position: int, prefetch: int):
    self.position = start_position
    self._it = _device_batches(ds, sharding, global_batch, prefetch)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    self.position += 1
    return batch


@dataclasses.dataclass
class EvalIterable:
  """Re-iterable finite eval stream; `len()` is the number of batches."""
  ds: tf.data.Dataset
  num_batches: int
  sharding: jax.sharding.NamedSharding
  global_batch: int
  prefetch: int = 2

  def __len__(self) -> int:
    return self.num_batches

  def __iter__(self) -> Iterator[Batch]:
    return _device_batches(self.ds, self.sharding, self.global_batch,
                           self.prefetch)


def _check_args(image_size, sharding, global_batch: int) -> tuple[Any, int]:
  """Validates what needs no data; returns (size, per-process batch)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(f'sharding must be a jax.sharding.NamedSharding, got '
                     f'{type(sharding).__name__}.')
  size = preprocess.as_size(image_size)
  if min(size) <= 0:
    raise ValueError(f'image_size must be positive, got {image_size!r}.')
  return size, _local_batch(global_batch, sharding)


def train_iterator(
    dataset: str, *, split: str | None = None, data_dir: str | None = None,
    global_batch_size: int, image_size: int | Sequence[int],
    sharding: jax.sharding.NamedSharding, seed: int, start_position: int = 0,
    randaugment: tuple[int, int] | None = None, mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0, shuffle_buffer: int = 50_000,
    manual_dir: str | None = None, num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2) -> TrainIterator:
  """Endless, deterministic, resumable iterator of global training batches.

  Yields {'image': f32 [B, H, W, 3] in [-1, 1], 'label': f32 [B, classes]}
  (one-hot, mixed when mixup/cutmix is on). `start_position=k` yields exactly
  what a fresh iterator yields from its k-th batch on.
  """
  size, local_batch = _check_args(image_size, sharding, global_batch_size)
  if start_position < 0:
    raise ValueError(f'start_position must be >= 0, got {start_position}.')
  if randaugment is not None and (len(randaugment) != 2 or randaugment[0] < 0
                                  or randaugment[1] < 0):
    raise ValueError(f'randaugment must be (num_layers, magnitude) >= 0, got '
                     f'{randaugment!r}.')
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha/cutmix_alpha must be >= 0, got '
                     f'{mixup_alpha}, {cutmix_alpha}.')
  src = _source(dataset, data_dir, manual_dir)
  split = _check_split(src, dataset, split or src.preset.train_split)
  ds = train_dataset(
      src, split, local_batch=local_batch, size=size, seed=seed,
      start_position=start_position, process_index=jax.process_index(),
      process_count=jax.process_count(), randaugment=randaugment,
      mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      shuffle_buffer=shuffle_buffer, num_parallel_calls=num_parallel_calls)
  return TrainIterator(ds, sharding, global_batch_size, start_position,
                       prefetch)


def eval_iterator(
    dataset: str, *, split: str | None = None, data_dir: str | None = None,
    global_batch_size: int, image_size: int | Sequence[int],
    sharding: jax.sharding.NamedSharding, resize: str = 'resize',
    manual_dir: str | None = None, num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2) -> EvalIterable:
  """Finite, re-iterable eval batches covering every example exactly once.

  Yields {'image': f32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}
  (+ 'real_labels' bool [B, 1000] for imagenet2012_real). `resize` is
  'resize' (plain resize) or 'resize_crop' (shorter side, central crop).
  """
  if resize not in RESIZE_MODES:
    raise ValueError(f'resize must be one of {RESIZE_MODES}, got {resize!r}.')
  size, local_batch = _check_args(image_size, sharding, global_batch_size)
  src = _source(dataset, data_dir, manual_dir)
  split = _check_split(src, dataset, split or src.preset.eval_split)
  ds, num_batches = eval_dataset(
      src, split, local_batch=local_batch, size=size, resize=resize,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_parallel_calls=num_parallel_calls)
  return EvalIterable(ds, num_batches, sharding, global_batch_size, prefetch)
