"""Input pipelines: TFDS datasets and image folders -> global `jax.Array`s.

Sources (TFDS names, presets, `'imagefolder:/root'`): see `data_sources`.
Determinism and resume
  By default each process reads its own part of the split
  (`tfds.split_for_jax_process`). Epoch e of that part is shuffled (encoded
  records, before decoding) with a seed derived from (seed, process, e);
  example i of the endless stream is augmented with stateless ops seeded by
  (seed, process, i). Output therefore depends only on the seed, and batch k
  can be reached by skipping k*B encoded records of the current epoch
  (`start_example`, counted in examples so that a resume with another batch
  size starts at the same example), never a full re-decode. With `global_order=True` every
  process follows the stream of a 1-process run instead and keeps its own rows
  of each global batch, so global batches do not depend on the process count
  (see `train_iterator`).
Evaluation
  Every process yields the same number of batches; the tail is padded with
  zero images whose `mask` is False, so each example is counted exactly once.
"""
import dataclasses
import math
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from vit_jax.data import augment
from vit_jax.data import presets
from vit_jax.data import preprocess
from vit_jax.data import sources as data_sources
from vit_jax.parallel import feed as device_feed
from vit_jax.serving import images
from vit_jax.data.tf import tf

Batch = device_feed.Batch


def get_dataset_info(dataset: str, data_dir: str | None = None,
                     manual_dir: str | None = None) -> presets.DatasetInfo:
  """Names, splits, sizes and defaults of a preset/TFDS/image-folder dataset."""
  src = data_sources.open_source(dataset, data_dir, manual_dir)
  p = src.preset
  return presets.DatasetInfo(
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


def _read(src, ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Image-folder records hold paths: reads the file. TFDS ones hold bytes."""
  if not src.reads_paths:
    return ex
  return {**ex, 'image': tf.io.read_file(ex['image'])}


def train_dataset(src, split: str, *, local_batch: int,
                  size: tuple[int, int], seed: int, start_example: int,
                  process_index: int, process_count: int,
                  randaugment: tuple[int, int] | None, mixup_alpha: float,
                  cutmix_alpha: float, shuffle_buffer: int,
                  num_parallel_calls: int, global_order: bool = False,
                  rows: Sequence[int] | None = None,
                  crop_min_area: float = 0.05) -> tf.data.Dataset:
  """Endless per-process tf.data stream of augmented batches (numpy side).

  With `global_order`, the example stream is the one of process 0 of 1 (whole
  split; shuffle and augmentation keyed by `seed` and the global example
  index), cut into global batches of G = local_batch * process_count, of
  which this process keeps the offsets `rows` (default: its slice
  [p * local_batch, (p + 1) * local_batch)), in ascending order.
  `start_example` counts examples of the stream read so far: the global
  stream with `global_order`, else this process's part.
  """
  if global_order:
    part, parts, stride = 0, 1, local_batch * process_count
    rows = sorted(range(process_index * local_batch,
                        (process_index + 1) * local_batch)
                  if rows is None else rows)
    if len(set(rows)) != local_batch or not set(rows) <= set(range(stride)):
      raise ValueError(f'rows must be {local_batch} distinct offsets in '
                       f'[0, {stride}), got {rows}.')
  else:
    part, parts, stride = process_index, process_count, local_batch
  n = src.num_examples(split, part, parts)
  if n == 0:
    raise ValueError(f'Split {split!r} gives process {process_index} no '
                     'examples to train on.')
  # Keyed by `part`, not the process, so that a global-order stream is the
  # same on every process (and equals the default 1-process stream).
  key = tf.constant([seed, part], tf.int64)
  shuffle_key, example_key, mix_key = [
      tf.random.experimental.stateless_fold_in(key, i) for i in range(3)]
  records = src.records(split, part, parts)
  # Path records are tiny, so folders get a full permutation each epoch.
  buffer = n if src.reads_paths else max(1, min(shuffle_buffer, n))
  first = start_example
  first_epoch, offset = divmod(first, n)

  def epoch(e):
    epoch_seed = tf.random.stateless_uniform(
        [], tf.random.experimental.stateless_fold_in(shuffle_key, e),
        minval=0, maxval=2**62, dtype=tf.int64)
    return records.shuffle(buffer, seed=epoch_seed,
                           reshuffle_each_iteration=False)

  ds = tf.data.Dataset.range(first_epoch, sys.maxsize).flat_map(epoch)
  ds = ds.skip(offset).enumerate(start=first)
  if global_order:  # Before any file is read or image decoded.
    mine = tf.constant([r in rows for r in range(stride)])
    ds = ds.filter(lambda index, ex: tf.gather(mine, index % stride))

  def example(index, ex):
    seed = tf.random.experimental.stateless_fold_in(example_key, index)
    return {'image': augment.train_image(_read(src, ex)['image'], seed,
                                         size, randaugment, crop_min_area),
            'label': preprocess.one_hot(ex['label'], src.num_classes)}

  ds = ds.map(example, num_parallel_calls=num_parallel_calls)
  ds = ds.batch(local_batch, drop_remainder=True)

  def mix(step, batch):  # Seeded by the batch index, so resumable too.
    # With global_order every process draws the same weight/box for a step,
    # but partners (a roll of the batch) wrap within each process's rows.
    seed = tf.random.experimental.stateless_fold_in(mix_key, step)
    image, label = augment.mix_batch(batch['image'], batch['label'], seed,
                                     mixup_alpha, cutmix_alpha)
    return {'image': image, 'label': label}

  if mixup_alpha > 0 or cutmix_alpha > 0:
    ds = ds.enumerate(first // stride).map(
        mix, num_parallel_calls=num_parallel_calls)
  return _options(ds)


def eval_dataset(src, split: str, *, local_batch: int, size: tuple[int, int],
                 resize: str, process_index: int, process_count: int,
                 num_parallel_calls: int, examples: Sequence[int] | None = None
                 ) -> tuple[tf.data.Dataset, int]:
  """Padded per-process eval stream and its number of batches (same on all).

  `examples`: only these indices of the split (few-shot subsets); every
  process then reads the split's records (not images), keeps the chosen
  ones and every process_count-th of them, and each batch also carries
  'index', the example's index in the split.
  """
  if examples is None:
    counts = [src.num_examples(split, i, process_count)
              for i in range(process_count)]
  else:
    examples = np.unique(np.asarray(examples, np.int64))
    total = src.num_examples(split)
    if len(examples) and not 0 <= examples[0] <= examples[-1] < total:
      raise ValueError(f'Example indices must be in [0, {total}) for split '
                       f'{split!r}, got {examples[0]}..{examples[-1]}.')
    counts = [len(examples[i::process_count]) for i in range(process_count)]
  if sum(counts) == 0:
    raise ValueError(f'Split {split!r} is empty: nothing to evaluate.')
  num_batches = math.ceil(max(counts) / local_batch)
  multi = src.preset.multi_label_key is not None

  @tf.autograph.experimental.do_not_convert  # plain Python `if` on a constant
  def prepare(ex):
    out = {'image': preprocess.eval_image(ex['image'], size, resize),
           'label': tf.cast(ex['label'], tf.int32), 'mask': tf.constant(True)}
    if multi:
      out['real_labels'] = preprocess.multi_hot(ex['real_label'],
                                                src.num_classes)
    if examples is not None:
      out['index'] = ex['index']
    return out

  pad = {'image': tf.zeros(size + (3,), tf.float32),
         'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}
  if multi:
    pad['real_labels'] = tf.zeros([src.num_classes], tf.bool)
  if examples is not None:
    pad['index'] = tf.constant(-1, tf.int32)
  padding = tf.data.Dataset.from_tensors(pad).repeat(
      num_batches * local_batch - counts[process_index])
  ds = padding
  if counts[process_index]:
    if examples is None:
      records = src.records(split, process_index, process_count)
    else:
      keep = np.zeros(total, bool)
      keep[examples] = True
      keep = tf.constant(keep)
      records = src.records(split, 0, 1).enumerate().filter(
          lambda i, ex: tf.gather(keep, i)).map(
              lambda i, ex: {**ex, 'index': tf.cast(i, tf.int32)})
      records = records.shard(process_count, process_index)
    ds = records.map(lambda ex: prepare(_read(src, ex)),
                     num_parallel_calls=num_parallel_calls)
    ds = ds.concatenate(padding)
  return _options(ds.batch(local_batch, drop_remainder=True)), num_batches


def split_labels(dataset: str, split: str | None = None,
                 data_dir: str | None = None, manual_dir: str | None = None
                 ) -> tuple[np.ndarray, int, str]:
  """(labels of every example of the split in order, num_classes, split),
  read without decoding an image (default split: the training split)."""
  src = data_sources.open_source(dataset, data_dir, manual_dir)
  split = data_sources.check_split(src, dataset, split or src.preset.train_split)
  ds = src.records(split, 0, 1).map(lambda ex: ex['label']).batch(8192)
  labels = [np.asarray(b) for b in ds.as_numpy_iterator()]
  return (np.concatenate(labels).astype(np.int64) if labels
          else np.zeros(0, np.int64)), src.num_classes, split


# ------------------------------------------------------------ to the devices
def _to_devices(ds: tf.data.Dataset, sharding: jax.sharding.NamedSharding,
                global_batch: int, prefetch: int) -> Iterator[Batch]:
  return device_feed.global_batches(
      ds.prefetch(max(prefetch, 1)).as_numpy_iterator(), sharding,
      global_batch, prefetch)


class TrainIterator:
  """Endless iterator of global batches; `examples` = global examples consumed."""

  def __init__(self, ds: tf.data.Dataset, sharding, global_batch: int,
               start_example: int, prefetch: int):
    self.examples = start_example
    self._global_batch = global_batch
    self._it = _to_devices(ds, sharding, global_batch, prefetch)

  def __iter__(self) -> 'TrainIterator':
    return self

  def __next__(self) -> Batch:
    batch = next(self._it)
    self.examples += self._global_batch
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
    return _to_devices(self.ds, self.sharding, self.global_batch,
                       self.prefetch)


def _check_args(image_size, sharding, global_batch: int
                ) -> tuple[Any, list[int]]:
  """Validates what needs no data; returns (size, this process's rows)."""
  if not isinstance(sharding, jax.sharding.NamedSharding):
    raise ValueError(f'sharding must be a jax.sharding.NamedSharding, got '
                     f'{type(sharding).__name__}.')
  size = images.as_size(image_size)
  return size, device_feed.local_rows(global_batch, sharding)


def train_iterator(
    dataset: str, *, split: str | None = None, data_dir: str | None = None,
    global_batch_size: int, image_size: int | Sequence[int],
    sharding: jax.sharding.NamedSharding, seed: int, start_example: int = 0,
    randaugment: tuple[int, int] | None = None, mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0, shuffle_buffer: int = 50_000,
    manual_dir: str | None = None, num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2, global_order: bool = False,
    crop_min_area: float = 0.05) -> TrainIterator:
  """Endless, deterministic, resumable iterator of global training batches.

  Yields {'image': f32 [B, H, W, 3] in [-1, 1], 'label': f32 [B, classes]}
  (one-hot, mixed when mixup/cutmix is on). `start_example=k*B` (B the global
  batch) yields exactly what a fresh iterator yields from its k-th batch on;
  any multiple of the number of processes is a valid start. `crop_min_area` is the
  inception crop's smallest area fraction (5 % as in the paper; short runs on
  small images learn faster with gentler crops).

  `global_order=True` makes the global batches independent of the number of
  processes: every process reads the whole split in the same order (shuffle
  seeded by `seed` and the epoch only), numbers examples globally, and keeps
  only the rows of each global batch that its devices hold (process p of a
  mesh in process order: [p*B/P, (p+1)*B/P)), dropping the others before any
  file is read or image decoded. Augmentation is keyed by the global example
  index, so batch k is bit-identical on 1 or N processes, and equal to the
  default 1-process stream. Mixup/cutmix, if on, mix within each process's
  rows (same weight everywhere, but the partner of a process's first row is
  its own last row), so mixed batches still differ across process counts.
  The cost: every process reads (not decodes) every record, and a resume
  skips P times as many; cheap for CIFAR-sized data and image folders (path
  records), costly for ImageNet on many hosts, hence off by default.
  """
  size, rows = _check_args(image_size, sharding, global_batch_size)
  processes = jax.process_count()
  if start_example < 0 or (start_example % processes and not global_order):
    raise ValueError(f'start_example must be a non-negative multiple of the '
                     f'{processes} processes, got {start_example}.')
  if randaugment is not None and (len(randaugment) != 2 or randaugment[0] < 0
                                  or randaugment[1] < 0):
    raise ValueError(f'randaugment must be (num_layers, magnitude) >= 0, got '
                     f'{randaugment!r}.')
  if mixup_alpha < 0 or cutmix_alpha < 0:
    raise ValueError(f'mixup_alpha/cutmix_alpha must be >= 0, got '
                     f'{mixup_alpha}, {cutmix_alpha}.')
  if not 0 < crop_min_area <= 1:
    raise ValueError(f'crop_min_area must be in (0, 1], got {crop_min_area}.')
  src = data_sources.open_source(dataset, data_dir, manual_dir)
  split = data_sources.check_split(src, dataset,
                                   split or src.preset.train_split)
  ds = train_dataset(
      src, split, local_batch=len(rows), size=size, seed=seed,
      start_example=(start_example if global_order
                     else start_example // processes),
      process_index=jax.process_index(),
      process_count=jax.process_count(), randaugment=randaugment,
      mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
      shuffle_buffer=shuffle_buffer, num_parallel_calls=num_parallel_calls,
      global_order=global_order, rows=rows, crop_min_area=crop_min_area)
  return TrainIterator(ds, sharding, global_batch_size, start_example,
                       prefetch)


def eval_iterator(
    dataset: str, *, split: str | None = None, data_dir: str | None = None,
    global_batch_size: int, image_size: int | Sequence[int],
    sharding: jax.sharding.NamedSharding, resize: str = 'resize',
    manual_dir: str | None = None, num_parallel_calls: int = tf.data.AUTOTUNE,
    prefetch: int = 2, examples: Sequence[int] | None = None) -> EvalIterable:
  """Finite, re-iterable eval batches covering every example exactly once.

  Yields {'image': f32 [B, H, W, 3], 'label': int32 [B], 'mask': bool [B]}
  (+ 'real_labels' bool [B, 1000] for imagenet2012_real). `resize` is
  'resize' (plain resize) or 'resize_crop' (shorter side, central crop).
  `examples`: only these indices of the split, each batch with their
  'index' int32 [B] (-1 for padding); see `eval_dataset`.
  """
  if resize not in images.RESIZE_MODES:
    raise ValueError(f'resize must be one of {images.RESIZE_MODES}, got '
                     f'{resize!r}.')
  size, rows = _check_args(image_size, sharding, global_batch_size)
  src = data_sources.open_source(dataset, data_dir, manual_dir)
  split = data_sources.check_split(src, dataset, split or src.preset.eval_split)
  ds, num_batches = eval_dataset(
      src, split, local_batch=len(rows), size=size, resize=resize,
      process_index=jax.process_index(), process_count=jax.process_count(),
      num_parallel_calls=num_parallel_calls, examples=examples)
  return EvalIterable(ds, num_batches, sharding, global_batch_size, prefetch)
