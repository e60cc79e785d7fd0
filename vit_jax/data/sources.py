"""Where examples come from: TFDS datasets and image folders, as record streams.

  * Any TFDS name (presets in `presets.PRESETS` give splits, classes, resolution and
    steps). A dataset missing from `data_dir` is prepared (with `manual_dir`
    for manual downloads); a prepared copy is read as is, without network.
  * `'imagefolder:/root'` reads `root/<split>/<class>/<image files>` (the
    extensions of `serving.images.IMAGE_EXTENSIONS`, any case). Class index = position of the class directory name in the sorted
    (Python `sorted`, case-sensitive) union of class directories of all splits,
    so train and test always agree. Files that cannot be read or decoded are
    skipped with a warning that counts them.

A source's `records(split, index, count)` is the `index`-th of `count` parts of
a split (`tfds.split_for_jax_process`), in a fixed order, still encoded: TFDS
records hold the image bytes, folder records the file path (`reads_paths`).
Decoding and augmentation are the input pipeline's business.
"""
import dataclasses
import logging
import os
import types
import warnings
from typing import Any

import tensorflow_datasets as tfds

from vit_jax.base import errors
from vit_jax.data import presets
from vit_jax.data import preprocess
from vit_jax.data.tf import tf
from vit_jax.serving import images

FOLDER_PREFIX = 'imagefolder:'




class TfdsSource:
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
        raise ValueError(_not_prepared(name, self.builder, e)) from e
    base = name.split('/')[0].split(':')[0]
    features = self.builder.info.features
    keys = self.builder.info.supervised_keys or ('image', 'label')
    self.preset = presets.PRESETS.get(base) or presets.Preset(
        *_default_splits(self.builder.info.splits.keys()), 0,
        *presets.OTHER_TFDS_DEFAULTS,
        label_key=keys[1])
    self.image_key = keys[0] if base not in presets.PRESETS else 'image'
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


def _not_prepared(name: str, builder, error: Exception) -> str:
  """What is missing where, then why preparing it failed (one line)."""
  root = os.path.dirname(os.path.dirname(os.fspath(builder.data_dir)))
  base = os.path.basename(os.path.dirname(os.fspath(builder.data_dir)))
  present = sorted(os.listdir(root)) if os.path.isdir(root) else []
  here = (f'{root} holds {", ".join(present)}' if present else
          f'{root} is empty or missing')
  reason = (str(error).strip().splitlines() or [''])[0][:200]
  return (f'TFDS dataset {name!r} is not prepared under --config.data_dir / '
          f'$TFDS_DATA_DIR (no {base}/{os.path.basename(builder.data_dir)}/'
          f'dataset_info.json in {root}; {here}), and preparing it here failed '
          f'({type(error).__name__}: {reason}). Point --config.data_dir at a '
          'prepared copy, or prepare it where there is internet (`tfds build '
          f'{name} --data_dir=DIR`); manual datasets such as imagenet2012 need '
          '--config.manual_dir with the downloaded files.')


def _default_splits(names) -> tuple[str | None, str | None]:
  """'train' and the first of test/validation/val that the dataset has."""
  evals = [s for s in ('test', 'validation', 'val') if s in names]
  return ('train' if 'train' in names else None), (evals[0] if evals else None)


class FolderSource:
  """`root/<split>/<class>/<file>`; records are {'image': path, 'label'}."""
  reads_paths = True

  def __init__(self, root: str):
    if not os.path.isdir(root):
      raise ValueError(f'Image folder {root!r} does not exist; expected '
                       'root/{train,test}/<class>/<image files>.')
    split_dirs = sorted(d for d in os.listdir(root)
                        if os.path.isdir(os.path.join(root, d)))
    classes = {c for d in split_dirs for c in _subdirs(os.path.join(root, d))}
    self.label_names = sorted(classes)
    self.num_classes = len(classes)
    index = {c: i for i, c in enumerate(self.label_names)}
    files = {d: _scan_split(os.path.join(root, d), index) for d in split_dirs}
    self.files = {d: f for d, f in files.items() if f[0]}
    if not self.files:
      raise ValueError(f'Image folder {root!r} holds no readable images '
                       f'({"/".join(sorted(images.IMAGE_EXTENSIONS))}); '
                       'expected root/{train,test}/<class>/<image files>.')
    train, test = _default_splits(self.files)
    self.preset = dataclasses.replace(presets.FOLDER_PRESET, num_classes=len(classes),
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
  for name, files in images.class_folder(split_dir).items():
    paths += files
    labels += [class_index[name]] * len(files)
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


def open_source(dataset: str, data_dir: str | None,
                manual_dir: str | None) -> TfdsSource | FolderSource:
  """Cached source: builders and folder scans are built once per process."""
  if dataset.startswith(FOLDER_PREFIX):
    root = os.path.abspath(os.path.expanduser(dataset[len(FOLDER_PREFIX):]))
    key = (root, _mtimes(root))  # A changed folder is rescanned.
    if key not in _SOURCES:
      _SOURCES[key] = FolderSource(root)
    return _SOURCES[key]
  key = (dataset, data_dir)
  if key not in _SOURCES:
    _SOURCES[key] = TfdsSource(dataset, data_dir, manual_dir)
  return _SOURCES[key]


def _mtimes(root: str) -> tuple[int, ...]:
  if not os.path.isdir(root):
    return ()
  dirs = [root] + [os.path.join(root, d) for d in _subdirs(root)]
  dirs += [os.path.join(d, c) for d in dirs[1:] for c in _subdirs(d)]
  return tuple(os.stat(d).st_mtime_ns for d in dirs)


def _unknown_dataset(name: str) -> ValueError:
  names = list(presets.PRESETS) + ['imagefolder'] + list(tfds.list_builders())
  return ValueError(
      f'Unknown dataset {name!r}.{errors.did_you_mean(name, names, n=5)} Use a '
      f'preset ({", ".join(presets.PRESETS)}), any TFDS name (tfds.list_builders()), '
      f'or "{FOLDER_PREFIX}/path/to/root".')


def check_split(source, dataset: str, split: str | None) -> str:
  """Returns `split` if `source` can read it, else raises listing the splits."""
  if not split:
    raise ValueError(f'Dataset {dataset!r} has no default split for this use; '
                     f'pass split= one of {source.splits()}.')
  try:
    count = source.num_examples(split)
  except (ValueError, KeyError, AssertionError) as e:
    raise ValueError(f'Unknown or invalid split {split!r} for dataset '
                     f'{dataset!r}; available splits: {source.splits()} '
                     f'(slices like "train[:98%]" allowed). ({e})') from None
  if not count:
    raise ValueError(f'Split {split!r} of dataset {dataset!r} holds no '
                     'examples; name a split (or slice) with some, e.g. '
                     f'{source.splits()[0]!r}.')
  return split
