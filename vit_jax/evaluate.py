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

    python -m vit_jax.evaluate --model=MODEL --fewshot=cifar10[,NAME...]
        [--shots=1,5,10,25] [--train_split=SPLIT] [--test_split=SPLIT]

is the paper's few-shot linear evaluation instead (`vit_jax.evaluation.
fewshot`): the frozen pre-logits of SHOTS training images per class, a
closed-form regularised least-squares map, accuracy on the test split; the
same code and numbers as the trainer's `config.fewshot`. Datasets are TFDS
names or imagefolder:/root, read through the trainer's pipeline.
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
_FEWSHOT = flags.DEFINE_list(
    'fewshot', [], 'Few-shot linear evaluation on these datasets (TFDS names '
    'or imagefolder:/root) instead of classifying a folder or split.')
_SHOTS = flags.DEFINE_list('shots', ['1', '5', '10', '25'],
                           'With --fewshot: training examples per class.')
_TRAIN_SPLIT = flags.DEFINE_string(
    'train_split', None, 'With --fewshot: where the shots are drawn from '
    '(default: each dataset\'s training split).')
_TEST_SPLIT = flags.DEFINE_string(
    'test_split', None, 'With --fewshot: the split scored (default: each '
    'dataset\'s evaluation split).')
_SEED = flags.DEFINE_integer('seed', 0, 'With --fewshot: which examples are '
                             'drawn per class.', lower_bound=0)
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


def _pipeline_modules():
  """The trainer's data pipeline, or a usage error without TensorFlow."""
  try:
    from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
    from vit_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise cli.UsageError(f'TFDS datasets are read through tf.data, which needs '
                         f'TensorFlow ({e}): pip install "vit_jax[train]", or '
                         'evaluate on an image folder.') from None
  return pipeline, data_sources


def _pipeline_source(what: str, classify: bool):
  """The model (with a classifier head if `classify`), if the training
  pipeline's preprocessing is the one it wants."""
  from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
  source = (cli.load_classifier_source() if classify
            else cli.load_model_source())
  if source.preprocessing != images.Preprocessing(
      resize=source.preprocessing.resize):
    raise cli.UsageError(
        f'{what} is read by the training pipeline (TF bilinear resizing, '
        f'[-1, 1]); this model wants {source.preprocessing.describe()}: '
        'evaluate it on an image folder instead.')
  return source


def _global_batch(batch_size: int) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  return -(-batch_size // jax.device_count()) * jax.device_count()


def evaluate_tfds(spec: str, batch_size: int) -> tuple[dict, list]:
  """(totals, label names) of a TFDS split, through the trainer's pipeline."""
  import jax  # pylint: disable=g-import-not-at-top
  pipeline, data_sources = _pipeline_modules()
  from vit_jax.evaluation import classification  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  from vit_jax.training import objectives  # pylint: disable=g-import-not-at-top
  name, _, split = spec[len(TFDS_PREFIX):].partition(':')
  source = _pipeline_source(spec, classify=True)
  try:
    src = data_sources.open_source(name, _DATA_DIR.value, None)
    split = data_sources.check_split(src, name, split or src.preset.eval_split)
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  if src.num_classes != source.model.num_classes:
    raise cli.UsageError(f'{name} has {src.num_classes} classes, the model '
                         f'{source.model.num_classes}.')
  devices = mesh.create_mesh()
  batches = pipeline.eval_iterator(
      name, split=split, data_dir=_DATA_DIR.value,
      global_batch_size=_global_batch(batch_size),
      image_size=source.image_size, sharding=mesh.batch_sharding(devices),
      resize=source.preprocessing.resize)
  sys.stderr.write(f'{source.model_name} from {source.origin["path"]}: '
                   f'{name} {split}, {source.image_size[0]}x'
                   f'{source.image_size[1]} {source.preprocessing.describe()}\n')
  eval_step = jax.jit(objectives.Classification(source.model).eval_sums)
  totals = classification.run(eval_step, source.params, batches, len(batches))
  return totals, source.label_names or src.label_names


def evaluate_fewshot(datasets: list[str], batch_size: int) -> dict[str, float]:
  """{metric name: accuracy} of few-shot linear evaluation on `datasets`."""
  from vit_jax.evaluation import fewshot as linear  # pylint: disable=g-import-not-at-top
  try:
    shots = linear.parse_shots(','.join(_SHOTS.value))
  except ValueError as e:
    raise cli.UsageError(f'--shots={",".join(_SHOTS.value)} {e}') from None
  _pipeline_modules()
  from vit_jax.parallel import mesh  # pylint: disable=g-import-not-at-top
  from vit_jax.training import fewshot  # pylint: disable=g-import-not-at-top
  source = _pipeline_source(', '.join(datasets), classify=False)
  try:
    evaluator = fewshot.FewShotEvaluator(
        source.model, mesh.create_mesh(), datasets=datasets,
        batch_size=_global_batch(batch_size), image_size=source.image_size,
        shots=shots, seed=_SEED.value,
        train_split=_TRAIN_SPLIT.value, test_split=_TEST_SPLIT.value,
        data_dir=_DATA_DIR.value, resize=source.preprocessing.resize)
  except ValueError as e:  # unknown dataset or split, too few examples
    raise cli.UsageError(str(e)) from None
  sys.stderr.write(f'{source.model_name} from {source.origin["path"]}: '
                   f'{",".join(_SHOTS.value)}-shot linear evaluation on '
                   f'{", ".join(datasets)}\n')
  return evaluator(source.params)


def _main_fewshot(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError('--fewshot names the data; no folder or split '
                         f'argument ({" ".join(argv[1:])}).')
  results = evaluate_fewshot(_FEWSHOT.value, _BATCH_SIZE.value)
  for name, accuracy in results.items():
    print(f'{name.removeprefix("fewshot_")}  {100 * accuracy:.2f} %')
  if flags.FLAGS.output:
    from vit_jax.base import files  # pylint: disable=g-import-not-at-top
    os.makedirs(flags.FLAGS.output, exist_ok=True)
    files.write_json(os.path.join(flags.FLAGS.output, 'metrics.json'), {
        **results, 'model': flags.FLAGS.model, 'fewshot': _FEWSHOT.value,
        'shots': [int(s) for s in _SHOTS.value], 'seed': _SEED.value,
        'train_split': _TRAIN_SPLIT.value, 'test_split': _TEST_SPLIT.value})
    print(f'{flags.FLAGS.output}/metrics.json')


def main(argv: list[str]) -> None:
  cli.require('model')
  cli.output_folder()
  if _FEWSHOT.value:
    return _main_fewshot(argv)
  for flag in ('shots', 'train_split', 'test_split', 'seed'):
    if flags.FLAGS[flag].present:
      raise cli.UsageError(f'--{flag} applies to --fewshot only.')
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
