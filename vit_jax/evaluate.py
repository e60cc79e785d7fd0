"""Evaluates a model on a labelled image folder or a TFDS split.

    python -m vit_jax.evaluate --model=MODEL [--output=DIR] [--batch_size=64]
        FOLDER | tfds:NAME[:SPLIT] [--data_dir=DIR]

MODEL as every program takes it (`vit_jax.cli`). Reports top-1 and top-5
accuracy, the mean loss and per-class accuracy, every example counted once,
and with --output writes metrics.json (also the confusion matrix, rows: true
class) and confusion_matrix.png there.

FOLDER holds one folder of images per class (`FOLDER/<class>/<files>`), read
with `vit_jax.serving.images` (no TensorFlow; an export runs through its
StableHLO function). Classes are matched to the model's label names by
name, or, for a model without names, by sorted position. An unreadable file
is reported and left out (exit status 1).

tfds:NAME[:SPLIT] (default split: the dataset's evaluation split) reads the
split through the trainer's own evaluation pipeline and step, so the numbers
equal the trainer's on the same split and parameters; it needs TensorFlow
(`pip install vit_jax[train]`).
"""
import os
import sys

from absl import flags
import numpy as np

from vit_jax import cli

cli.define_model_flags()
cli.define_image_size_flag()
cli.define_labels_flag()
cli.define_output_flag('Folder for metrics.json and confusion_matrix.png.')
flags.adopt_module_key_flags(cli)  # the shared flags in --help
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 64, 'Images per model call.',
                                   lower_bound=1)
_DATA_DIR = flags.DEFINE_string('data_dir', None, 'With tfds:...: the TFDS '
                                'data directory (default $TFDS_DATA_DIR).')
TFDS_PREFIX = 'tfds:'


def _folder_batches(classifier, root: str, batch_size: int):
  """(pixels, labels, mask) batches of a class folder; the read errors."""
  from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
  if not os.path.isdir(root):
    raise cli.UsageError(f'{root} is not a folder (nor tfds:NAME[:SPLIT]).')
  folder = images.class_folder(root)
  if not any(folder.values()):
    raise cli.UsageError(f'{root} holds no <class>/<image files> folders.')
  names = classifier.label_names
  if set(folder) <= set(names):
    index = {name: names.index(name) for name in folder}
  elif len(folder) == len(names):
    index = {name: i for i, name in enumerate(folder)}
  else:
    unknown = sorted(set(folder) - set(names))
    raise cli.UsageError(
        f'{root} has {len(unknown)} of {len(folder)} class folders that are '
        f'not among the model\'s {len(names)} label names ('
        f'{", ".join(unknown[:5])}{" ..." if len(unknown) > 5 else ""}); name '
        'the folders like the labels (or pass --labels).')
  paths = [p for files in folder.values() for p in files]
  labels = {p: index[name] for name, files in folder.items() for p in files}
  errors = []

  def batches():
    for chunk in images.read_batches(paths, classifier.image_size,
                                     classifier.preprocessing, batch_size):
      good = [(p, x) for p, x in chunk if isinstance(x, np.ndarray)]
      errors.extend((p, x) for p, x in chunk if isinstance(x, Exception))
      if good:
        mask = np.zeros(batch_size, bool)
        mask[:len(good)] = True
        label = np.zeros(batch_size, np.int32)
        label[:len(good)] = [labels[p] for p, _ in good]
        yield images.stack_padded([x for _, x in good], batch_size), label, mask

  return batches(), errors, len(paths)


def evaluate_folder(root: str, batch_size: int) -> tuple[dict, list, list]:
  """(totals, label names, read errors) of a class folder."""
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import classification  # pylint: disable=g-import-not-at-top
  classifier = cli.load_classifier()
  batches, errors, count = _folder_batches(classifier, root, batch_size)
  sys.stderr.write(f'{classifier.description}: {count} image(s) in {root}, '
                   f'{classifier.image_size[0]}x{classifier.image_size[1]} '
                   f'{classifier.preprocessing.describe()}\n')
  sums = jax.jit(classification.batch_sums)
  step = lambda _, batch: sums(classifier.logits(batch[0]), *batch[1:])
  totals = classification.run(step, None, batches,
                              -(-count // batch_size))
  for path, error in errors:
    from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
    sys.stderr.write(f'error: {path}: {images.error_text(error)}\n')
  return totals, classifier.label_names, errors


def evaluate_tfds(spec: str, batch_size: int) -> tuple[dict, list]:
  """(totals, label names) of a TFDS split, through the trainer's pipeline."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from vit_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise cli.UsageError(f'{spec} reads TFDS through tf.data, which needs '
                         f'TensorFlow ({e}): pip install "vit_jax[train]", or '
                         'evaluate on an image folder.') from None
  from vit_jax.evaluation import classification  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  from vit_jax.training import steps  # pylint: disable=g-import-not-at-top
  from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
  name, _, split = spec[len(TFDS_PREFIX):].partition(':')
  source = cli.load_model_source()
  if source.preprocessing != images.Preprocessing(
      resize=source.preprocessing.resize):
    raise cli.UsageError(
        f'{spec} is read by the training pipeline (TF bilinear resizing, '
        f'[-1, 1]); this model wants {source.preprocessing.describe()}: '
        'evaluate it on an image folder instead.')
  try:
    src = data_sources.open_source(name, _DATA_DIR.value, None)
    split = data_sources.check_split(src, name, split or src.preset.eval_split)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  if src.num_classes != source.model.num_classes:
    raise cli.UsageError(f'{name} has {src.num_classes} classes, the model '
                         f'{source.model.num_classes}.')
  devices = mesh.create_mesh()
  batch_size = -(-batch_size // jax.device_count()) * jax.device_count()
  batches = pipeline.eval_iterator(
      name, split=split, data_dir=_DATA_DIR.value,
      global_batch_size=batch_size, image_size=source.image_size,
      sharding=mesh.batch_sharding(devices),
      resize=source.preprocessing.resize)
  sys.stderr.write(f'{source.model_name} from {source.origin["path"]}: '
                   f'{name} {split}, {source.image_size[0]}x'
                   f'{source.image_size[1]} {source.preprocessing.describe()}\n')
  totals = classification.run(jax.jit(steps.make_eval_step(source.model)),
                              source.params, batches, len(batches))
  return totals, source.label_names or src.label_names


def main(argv: list[str]) -> None:
  cli.require('model')
  if len(argv) != 2:
    raise cli.UsageError('name one image folder or tfds:NAME[:SPLIT].')
  spec = argv[1]
  if spec.startswith(TFDS_PREFIX):
    totals, names = evaluate_tfds(spec, _BATCH_SIZE.value)
    errors = []
  else:
    if _DATA_DIR.value:
      raise cli.UsageError('--data_dir applies to tfds:... only.')
    totals, names, errors = evaluate_folder(spec, _BATCH_SIZE.value)
  from vit_jax.base import files  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import classification  # pylint: disable=g-import-not-at-top
  metrics = classification.summarize(totals, names)
  metrics.update(model=flags.FLAGS.model, data=spec,
                 unreadable_files=[p for p, _ in errors])
  print(f'top-1 {100 * metrics["accuracy"]:.2f} %  top-5 '
        f'{100 * metrics["top5_accuracy"]:.2f} %  loss {metrics["loss"]:.4f}  '
        f'({metrics["num_examples"]:,} examples)')
  worst = sorted((a, n) for n, a in metrics['per_class_accuracy'].items()
                 if a is not None)[:5]
  print('lowest per-class accuracy: ' + ', '.join(
      f'{n} {100 * a:.1f} %' for a, n in worst))
  if flags.FLAGS.output:
    from vit_jax.evaluation import figures  # pylint: disable=g-import-not-at-top
    os.makedirs(flags.FLAGS.output, exist_ok=True)
    files.write_json(os.path.join(flags.FLAGS.output, 'metrics.json'), metrics)
    figures.draw_confusion(
        np.asarray(metrics['confusion_matrix']), list(
            metrics['per_class_accuracy']), flags.FLAGS.output,
        f'{spec}: top-1 {100 * metrics["accuracy"]:.1f} %')
    print(f'{flags.FLAGS.output}/metrics.json, '
          f'{flags.FLAGS.output}/confusion_matrix.png')
  if errors:
    cli.fail(f'{len(errors)} file(s) could not be read and were left out.')


def run() -> None:
  """The `vit-evaluate` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
