"""Classifies image files: top-k labels with probabilities.

    python -m vit_jax.predict --model=MODEL [--top_k=5] [--format=table|jsonl]
        [--batch_size=32] [--labels=FILE] IMAGE_OR_FOLDER...

MODEL (the shared vocabulary of `vit_jax.cli`): an export folder or card,
run through its StableHLO function when it has one (no model code is
imported), else its weights; a training workdir (newest readable checkpoint,
or --step=N); an .npz with --model_name=ViT-B_16 (depth, widths and classes
are read from the arrays, resolution from the position embedding unless
--image_size), --eval_resize and --num_classes. --labels replaces the label
names. Images: JPEG, PNG, ... of any size and mode (`vit_jax.serving.images`),
preprocessed like training's evaluation with the model's resolution and
resize mode; folders are searched recursively.

Output (stdout): a table, one row per image, or JSON lines
`{"path", "top_k": [{"label", "index", "prob"}, ...]}`. A file that cannot
be read is reported on stderr as `error: PATH: reason` (and as
`{"path", "error"}` in JSON lines) and the rest go on. Exit status: 0 all
classified, 1 some files failed, 2 usage error (bad flag, model or labels).
"""
import json
import sys
from typing import TextIO

from absl import flags
import numpy as np

from vit_jax import cli
from vit_jax.serving import classifier as classifier_lib
from vit_jax.serving import images

cli.define_model_flags()
cli.define_image_size_flag()
cli.define_labels_flag()
flags.adopt_module_key_flags(cli)  # the shared flags in --help
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Labels per image.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per model call.',
                                   lower_bound=1)
_FORMAT = flags.DEFINE_enum('format', 'table', ['table', 'jsonl'],
                            'Output format.')


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the k most probable classes of each row."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(probs, order, -1)


def predict_files(classifier: classifier_lib.Classifier, paths: list[str], *,
                  k: int = 5, batch_size: int = 32,
                  output_format: str = 'table', out: TextIO = sys.stdout,
                  err: TextIO = sys.stderr) -> int:
  """Classifies `paths` (at least one), writing rows as batches finish.

  Returns the number of files that could not be read.
  """
  k = min(k, len(classifier.label_names))
  path_width = max(len(p) for p in paths)
  label_width = max(len(n) for n in classifier.label_names) + 8
  if output_format == 'table':
    header = ''.join(f'{f"top-{i + 1}":<{label_width}}' for i in range(k))
    out.write(f'{"image":<{path_width}}  {header.rstrip()}\n')
  failed = 0
  batch_size = min(batch_size, len(paths))
  for chunk in images.read_batches(paths, classifier.image_size,
                                   classifier.preprocessing, batch_size):
    good = [x for _, x in chunk if isinstance(x, np.ndarray)]
    if good:
      logits = classifier.logits(images.stack_padded(good, batch_size))
      indices, probs = top_k(logits[:len(good)], k)
    row = 0
    for path, result in chunk:
      if isinstance(result, Exception):
        failed += 1
        err.write(f'error: {path}: {images.error_text(result)}\n')
        if output_format == 'jsonl':
          out.write(json.dumps({'path': path,
                                'error': images.error_text(result)}) + '\n')
        continue
      labels = [classifier.label_names[i] for i in indices[row]]
      if output_format == 'jsonl':
        top = [{'label': label, 'index': int(i), 'prob': round(float(p), 6)}
               for label, i, p in zip(labels, indices[row], probs[row])]
        out.write(json.dumps({'path': path, 'top_k': top}) + '\n')
      else:
        cells = ''.join(f'{f"{label} {p:.3f}":<{label_width}}'
                        for label, p in zip(labels, probs[row]))
        out.write(f'{path:<{path_width}}  {cells.rstrip()}\n')
      row += 1
    out.flush()
  return failed


def main(argv: list[str]) -> None:
  cli.require('model')
  if len(argv) < 2:
    raise cli.UsageError('name at least one image file or folder.')
  classifier = cli.load_classifier()
  paths = images.list_images(argv[1:])
  if not paths:
    cli.fail(f'no image files in {" ".join(argv[1:])}')
  sys.stderr.write(f'{classifier.description}: {len(paths)} image(s), '
                   f'{classifier.image_size[0]}x{classifier.image_size[1]} '
                   f'{classifier.preprocessing.describe()}\n')
  failed = predict_files(classifier, paths, k=_TOP_K.value,
                         batch_size=_BATCH_SIZE.value,
                         output_format=_FORMAT.value)
  if failed:
    cli.fail(f'{failed} of {len(paths)} file(s) could not be read.')


def run() -> None:
  """The `vit-predict` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
