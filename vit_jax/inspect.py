"""The paper's inspection figures of a trained ViT.

    python -m vit_jax.inspect --model=MODEL --output=DIR [--per_layer]
        [--image_size=H[,W]] [--labels=FILE] [IMAGE_OR_FOLDER ...]

MODEL as every program takes it (`vit_jax.cli`): a training workdir
(--step), an export, or an .npz with --model_name (and --model_overrides
for what its arrays do not fix). Writes into DIR posemb_similarity.png
(Figure 7 centre), embedding_filters.png (Figure 7 left; not for hybrids,
whose embedding sees ResNet features) and, with images,
attention_rollout.png (Figure 6), attention_per_layer.png (--per_layer) and
attention_distance.png (Figure 7 right), plus arrays.npz behind them all.
Images are read and resized as evaluation reads them (`vit_jax.serving.
images`); an unreadable one is reported as `error: PATH: reason` and the
others go on (exit status 1), as in predict. This program is only ever run
(python -m vit_jax.inspect, vit-inspect); no code imports it.
"""
import math
import os
import sys

from absl import flags
from absl import logging
import numpy as np

from vit_jax import cli
from vit_jax.base import files

cli.define_model_flags()
cli.define_image_size_flag()
cli.define_labels_flag()
cli.define_output_flag('Folder for the figures and arrays.npz.')
flags.adopt_module_key_flags(cli)  # the shared flags in --help
_MAX_IMAGES = flags.DEFINE_integer('max_images', 256, 'At most this many '
                                   'images (sorted) for maps and distances.',
                                   lower_bound=1)
_NUM_SHOW = flags.DEFINE_integer('num_show', 8, 'Images drawn (spread '
                                 'evenly).', lower_bound=1)
_PER_LAYER = flags.DEFINE_bool('per_layer', False, 'Also per-layer raw maps.')
_NUM_FILTERS = flags.DEFINE_integer('num_filters', 28, 'Filter components.',
                                    lower_bound=1)
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per forward pass '
                              '(lowered to keep attention under ~0.5 GB).',
                              lower_bound=1)


def main(argv: list[str]) -> None:
  cli.require('model', 'output')
  out = cli.output_folder()
  # Imported after the flags parse: the model code and matplotlib are slow.
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import figures  # pylint: disable=g-import-not-at-top
  from vit_jax.evaluation import inspection  # pylint: disable=g-import-not-at-top
  from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
  source = cli.load_model_source()
  model, params, size = source.model, source.params, source.image_size
  if not isinstance(model, models.VisionTransformer):
    raise cli.UsageError(
        f'{source.model_name} is a {type(model).__name__}: the inspection '
        'figures (attention, position embeddings, patch filters) are of '
        'Vision Transformers.')
  logging.info('%s pooling, %dx%d images.', model.classifier, *size)
  paths = images.list_images(argv[1:])[:_MAX_IMAGES.value]
  tokens = (inspection.num_prefix_tokens(model)
            + math.prod(inspection.token_grid(model, size)))
  per_image = 4 * model.num_layers * model.num_heads * tokens**2
  batch_size = max(1, min(_BATCH.value, 2**29 // per_image, len(paths) or 1))
  good, failed = [], 0

  def batches():
    nonlocal failed
    for chunk in images.read_batches(paths, size, source.preprocessing,
                                     batch_size):
      pixels = []
      for path, result in chunk:
        if isinstance(result, Exception):
          failed += 1
          print(f'error: {path}: {images.error_text(result)}', flush=True,
                file=sys.stderr)
        else:
          good.append(path)
          pixels.append(result)
      if pixels:
        yield (images.normalize(images.stack_padded(pixels, batch_size),
                                source.preprocessing), len(pixels))

  arrays = inspection.inspect_model(model, params, size, batches(),
                                    _NUM_FILTERS.value)
  os.makedirs(out, exist_ok=True)
  written = [figures.draw_posemb(arrays, out)]
  if 'embedding_filters' in arrays:
    written.append(figures.draw_filters(arrays, out))
  if good:
    arrays['image_files'] = np.array(good)
    # Evenly spread over the (sorted) images: variety, yet deterministic.
    num = min(_NUM_SHOW.value, len(good))
    show = np.unique(np.linspace(0, len(good) - 1, num).astype(int))
    written.append(figures.draw_rollout(arrays, out, show, source.label_names))
    if _PER_LAYER.value:
      written.append(figures.draw_per_layer(arrays, out, show))
    written.append(figures.draw_distance(arrays, out))
  if not _PER_LAYER.value:
    arrays.pop('per_layer', None)
  files.write_atomic(os.path.join(out, 'arrays.npz'),
                     lambda tmp: _savez(tmp, arrays))
  for name in [*written, 'arrays.npz']:
    print(os.path.join(out, name))
  if failed:
    cli.fail(f'{failed} of {len(paths)} image file(s) could not be read.')


def _savez(path: str, arrays: dict[str, np.ndarray]) -> None:
  with open(path, 'wb') as f:  # a file object: numpy would append '.npz'
    np.savez_compressed(f, **arrays)


def run() -> None:
  """The `vit-inspect` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
