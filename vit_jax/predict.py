"""Classifies image files: top-k labels with probabilities.

    python -m vit_jax.predict --model=MODEL [--top_k=5] [--format=table|jsonl]
        [--batch_size=32] IMAGE_OR_FOLDER...

MODEL is one of
  an export (`python -m vit_jax.export`): its `<name>.card.json` or the
      directory holding it. Runs the StableHLO function when the export has
      one (no model code is imported), else its safetensors / npz;
  a training workdir: its newest checkpoint, or --step=N;
  an .npz with --model_name=ViT-B_16 (depth, widths and classes are read
      from the arrays; resolution from the position embedding unless
      --image_size), label names from --labels=FILE (one per line, or TSV
      `index<TAB>id<TAB>name` such as ImageNet's index_synset_name.tsv) and
      --eval_resize.
Images: JPEG, PNG, ... of any size and mode (grayscale, palette, RGBA),
preprocessed like training's evaluation (`vit_jax.images`) with the resize
mode and resolution of the model. Folders are searched recursively for image
files. --labels also replaces the label names of an export or workdir.

Output (stdout): a table, one row per image, or JSON lines
`{"path", "top_k": [{"label", "index", "prob"}, ...]}`. A file that cannot
be read is reported on stderr as `error: PATH: reason` (and as
`{"path", "error"}` in JSON lines) and the rest go on. Exit status: 0 all
classified, 1 some files failed, 2 usage error (bad flag, model or labels).
"""
import concurrent.futures
import dataclasses
import json
import os
import pathlib
import sys
from typing import Callable

from absl import app
from absl import flags
import numpy as np

from vit_jax import cli
from vit_jax import images
from vit_jax import serving

_MODEL = flags.DEFINE_string(
    'model', None, 'Export card or directory, training workdir, or .npz.')
_MODEL_NAME = flags.DEFINE_string('model_name', None,
                                  'Architecture of an .npz, e.g. ViT-B_16.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None,
                                    'Expected classes of an .npz (checked).')
_IMAGE_SIZE = flags.DEFINE_integer('image_size', None,
                                   'Resolution of an .npz (default: from it).')
_EVAL_RESIZE = flags.DEFINE_enum('eval_resize', 'resize', images.RESIZE_MODES,
                                 'Eval preprocessing of an .npz.')
_LABELS = flags.DEFINE_string('labels', None, 'Label names file.')
_STEP = flags.DEFINE_integer('step', None, 'Workdir checkpoint step.')
_TOP_K = flags.DEFINE_integer('top_k', 5, 'Labels per image.', lower_bound=1)
_BATCH_SIZE = flags.DEFINE_integer('batch_size', 32, 'Images per model call.',
                                   lower_bound=1)
_FORMAT = flags.DEFINE_enum('format', 'table', ['table', 'jsonl'],
                            'Output format.')


@dataclasses.dataclass(frozen=True)
class Classifier:
  """What predict needs of a model, however it was loaded."""
  logits: Callable[[np.ndarray], np.ndarray]  # float32 [B, H, W, 3] 0..255
  image_size: tuple[int, int]
  resize: str
  label_names: list[str]
  description: str


def _numbered(num_classes: int) -> list[str]:
  return [f'class_{i}' for i in range(num_classes)]


def _from_source(source) -> Classifier:
  """A `model_sources.Source` run with model code.

  model_sources is imported only on the paths that need it, here and in
  `load_classifier`: it brings Flax and the model code, which a StableHLO
  export runs without.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax import model_sources  # pylint: disable=g-import-not-at-top
  fn = jax.jit(model_sources.logits_fn(source.model))
  params = jax.device_put(source.params)
  n = source.model.num_classes
  return Classifier(lambda x: np.asarray(fn(params, x)), source.image_size,
                    source.resize,
                    source.label_names or _numbered(n),
                    f'{source.model_name} from {source.origin["path"]}')


def load_classifier(model: str, *, model_name: str | None = None,
                    num_classes: int | None = None,
                    image_size: int | None = None, resize: str = 'resize',
                    labels: str | None = None, step: int | None = None
                    ) -> Classifier:
  """The model named by --model (module docstring); ValueError naming it."""
  path = pathlib.Path(model)
  if not path.exists():
    raise ValueError(f'--model={model}: no such file or directory.')
  if model.endswith(serving.CARD_SUFFIX) or (
      path.is_dir() and any(path.glob('*' + serving.CARD_SUFFIX))):
    card_path, card = serving.read_card(path)
    if card['files'].get('stablehlo'):
      served = serving.load(card_path)
      classifier = Classifier(
          served, served.image_size, served.resize,
          served.label_names or _numbered(served.num_classes),
          f'StableHLO export {card_path}')
    else:
      from vit_jax import model_sources  # pylint: disable=g-import-not-at-top
      classifier = _from_source(model_sources.source_from_card(card_path))
  elif path.is_dir() and (path / 'checkpoints').is_dir():
    from vit_jax import model_sources  # pylint: disable=g-import-not-at-top
    classifier = _from_source(model_sources.from_workdir(path, step))
  elif path.suffix == '.npz':
    if not model_name:
      raise ValueError(f'--model={model} is an .npz, which holds no '
                       'architecture: add --model_name (e.g. ViT-B_16).')
    from vit_jax import model_sources  # pylint: disable=g-import-not-at-top
    size = (image_size, image_size) if image_size else None
    classifier = _from_source(model_sources.from_npz(
        path, model_name, num_classes=num_classes, image_size=size,
        labels=labels, resize=resize))
  else:
    raise ValueError(f'--model={model} is neither an export (*'
                     f'{serving.CARD_SUFFIX} or its directory), a training '
                     'workdir (with checkpoints/) nor an .npz.')
  if labels:
    names = serving.read_labels(labels, len(classifier.label_names))
    classifier = dataclasses.replace(classifier, label_names=names)
  return classifier


def top_k(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(indices, probabilities) of the k most probable classes of each row."""
  logits = np.asarray(logits, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  order = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return order, np.take_along_axis(probs, order, -1)


def _error_text(error: Exception) -> str:
  if isinstance(error, FileNotFoundError):
    return 'no such file'
  return f'{type(error).__name__}: {error}'


def predict_files(classifier: Classifier, paths: list[str], *, k: int = 5,
                  batch_size: int = 32, output_format: str = 'table',
                  out=sys.stdout, err=sys.stderr) -> int:
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
  read = lambda p: images.read_pixels(p, classifier.image_size,
                                      classifier.resize)
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  # Threads: decoding and resizing release the GIL for most of their time.
  workers = min(4, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = [pool.submit(read, p) for p in chunks[0]]
    for n, chunk in enumerate(chunks):
      loaded = [future.result() for future in pending]
      if n + 1 < len(chunks):  # Decode the next batch while this one runs.
        pending = [pool.submit(read, p) for p in chunks[n + 1]]
      good = [x for x in loaded if isinstance(x, np.ndarray)]
      if good:
        # Padded to a fixed batch so that the model compiles once.
        batch = np.zeros((batch_size, *good[0].shape), np.float32)
        batch[:len(good)] = good
        indices, probs = top_k(classifier.logits(batch)[:len(good)], k)
      row = 0
      for path, result in zip(chunk, loaded):
        if isinstance(result, Exception):
          failed += 1
          err.write(f'error: {path}: {_error_text(result)}\n')
          if output_format == 'jsonl':
            out.write(json.dumps({'path': path,
                                  'error': _error_text(result)}) + '\n')
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
  if not _MODEL.value:
    raise app.UsageError('--model is required.', 2)
  if len(argv) < 2:
    raise app.UsageError('Name at least one image file or folder.', 2)
  try:
    classifier = load_classifier(
        _MODEL.value, model_name=_MODEL_NAME.value,
        num_classes=_NUM_CLASSES.value, image_size=_IMAGE_SIZE.value,
        resize=_EVAL_RESIZE.value, labels=_LABELS.value, step=_STEP.value)
  except (ValueError, OSError) as e:
    sys.stderr.write(f'error: {e}\n')
    sys.exit(2)
  paths = images.list_images(argv[1:])
  if not paths:
    sys.stderr.write(f'error: no image files in {" ".join(argv[1:])}\n')
    sys.exit(1)
  sys.stderr.write(f'{classifier.description}: {len(paths)} image(s), '
                   f'{classifier.image_size[0]}x{classifier.image_size[1]} '
                   f'{classifier.resize}\n')
  failed = predict_files(classifier, paths, k=_TOP_K.value,
                         batch_size=_BATCH_SIZE.value,
                         output_format=_FORMAT.value)
  if failed:
    sys.stderr.write(f'{failed} of {len(paths)} file(s) could not be read.\n')
    sys.exit(1)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
