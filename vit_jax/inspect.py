"""`python -m vit_jax.inspect`: the paper's inspection figures of a trained ViT.

  python -m vit_jax.inspect --workdir=/tmp/vit_cifar10 \
      --images=../shared/data/imagenet_samples --out=/tmp/inspect
  python -m vit_jax.inspect --npz=ViT-B_16.npz --model_name=ViT-B_16 \
      --images=photo.jpg,more_photos/ --out=/tmp/inspect --per_layer
  python -m vit_jax.inspect --export=EXPORT_DIR --images=... --out=...

Writes into --out attention_rollout.png (Figure 6), attention_per_layer.png
(--per_layer), posemb_similarity.png (Figure 7 centre), embedding_filters.png
(Figure 7 left; not for hybrids, whose embedding sees ResNet features),
attention_distance.png (Figure 7 right) and arrays.npz behind them all.
With --npz, what the arrays fix (width, depth, heads, MLP, patch size, class
token, pre-logits, classes) is read from them, scanned or not, --model_name
gives the rest (a hybrid's stem) and --model_overrides wins over both: all
three sources load through `vit_jax.model_sources`.
Photos: Pillow, RGB, resized to the model's resolution, scaled to [-1, 1].
"""
from collections.abc import Iterator
import io
import math
import os
import pathlib

from absl import app
from absl import flags
from absl import logging
import matplotlib
matplotlib.use('Agg')  # files only; no display on servers
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vit_jax import inspection as ins  # noqa: E402
from vit_jax import model_sources  # noqa: E402
from vit_jax import models  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'Training workdir to load.')
_STEP = flags.DEFINE_integer('step', None, 'Checkpoint step (default newest).')
_EXPORT = flags.DEFINE_string('export', None, 'A vit_jax.export card (or its '
                              'directory) instead of --workdir.')
_NPZ = flags.DEFINE_string('npz', None, 'Params .npz, or a directory holding '
                           'params.npz (instead of --workdir).')
_MODEL_NAME = flags.DEFINE_string('model_name', None, 'With --npz: registry '
                                  'name, e.g. ViT-B_16.')
_NUM_CLASSES = flags.DEFINE_integer('num_classes', None, 'With --npz: expected '
                                    'classes (checked against the head).')
_OVERRIDES = flags.DEFINE_list('model_overrides', [], 'With --npz: model '
                               'fields as key=value, e.g. num_heads=3.')
_IMAGE_SIZE = flags.DEFINE_list('image_size', None, 'H or H,W (default: the '
                                'training resolution / posemb grid); another '
                                'size resizes the position embedding.')
_IMAGES = flags.DEFINE_list('images', [], 'Image files and/or folders.')
_MAX_IMAGES = flags.DEFINE_integer('max_images', 256, 'At most this many '
                                   'images (sorted) for maps and distances.')
_NUM_SHOW = flags.DEFINE_integer('num_show', 8, 'Images drawn (spread evenly).')
_OUT = flags.DEFINE_string('out', None, 'Output directory.')
_PER_LAYER = flags.DEFINE_bool('per_layer', False, 'Also per-layer raw maps.')
_NUM_FILTERS = flags.DEFINE_integer('num_filters', 28, 'Filter components.')
_LABELS = flags.DEFINE_list('label_names', None, 'Class names for captions.')
_BATCH = flags.DEFINE_integer('batch_size', 32, 'Images per forward pass '
                              '(lowered to keep attention under ~0.5 GB).')
Arrays = dict[str, np.ndarray]  # the output of inspection.inspect_model
IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp')


def load_model(image_size: tuple[int, int] | None) -> tuple[
    models.VisionTransformer, dict, tuple[int, int], list[str] | None]:
  """(model, params, image_size, label_names) from the flags.

  Another --image_size than the source's resizes the position embedding as
  fine-tuning would (`model_sources.at_image_size`).
  """
  if sum(map(bool, (_WORKDIR.value, _EXPORT.value, _NPZ.value))) != 1:
    raise app.UsageError('Pass exactly one of --workdir, --export or --npz.')
  if _WORKDIR.value:
    source = model_sources.from_workdir(_WORKDIR.value, _STEP.value)
  elif _EXPORT.value:
    source = model_sources.source_from_card(_EXPORT.value)
  else:
    if not _MODEL_NAME.value:
      raise app.UsageError('--npz needs --model_name (e.g. ViT-B_16).')
    try:
      overrides = model_sources.parse_overrides(_OVERRIDES.value)
    except ValueError as e:
      raise app.UsageError(f'--model_overrides: {e}') from e
    source = model_sources.from_npz(
        _NPZ.value, _MODEL_NAME.value, num_classes=_NUM_CLASSES.value,
        image_size=image_size, overrides=overrides, resize_posemb=True)
  if image_size:
    source = model_sources.at_image_size(source, image_size)
  return (source.model, model_sources.linen_params(source.params),
          source.image_size, _LABELS.value or source.label_names)


def find_images(paths: list[str], limit: int) -> list[pathlib.Path]:
  """Files as given, folders searched recursively in sorted order."""
  found = []
  for p in map(pathlib.Path, paths):
    if not p.exists():
      raise FileNotFoundError(f'--images: {p} does not exist.')
    found += sorted(f for f in p.rglob('*') if f.suffix.lower() in
                    IMAGE_SUFFIXES) if p.is_dir() else [p]
  return found[:limit]


def read_image(path: pathlib.Path, size: tuple[int, int]) -> np.ndarray:
  """uint8 (H, W, 3) RGB (grayscale, palette, CMYK converted), resized."""
  with Image.open(path) as im:
    return np.asarray(im.convert('RGB').resize((size[1], size[0]),
                                               Image.BILINEAR))


def batches(files: list[pathlib.Path], image_size: tuple[int, int],
            batch_size: int) -> Iterator[tuple[np.ndarray, int]]:
  """[-1, 1] float32 batches; the last padded so one compilation serves all."""
  for start in range(0, len(files), batch_size):
    chunk = files[start:start + batch_size]
    x = np.stack([read_image(f, image_size) for f in chunk])
    x = x.astype(np.float32) / 127.5 - 1.0
    if start:
      x = np.concatenate([x, np.repeat(x[-1:], batch_size - len(chunk), 0)])
    yield x, len(chunk)


# ---- drawing ---------------------------------------------------------------

def _save(fig, out: str, name: str) -> str:
  # 256-colour PNG: a third of the size, so pictures can live in the repo.
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=80, bbox_inches='tight')
  plt.close(fig)
  Image.open(buffer).convert('RGB').quantize(256).save(
      os.path.join(out, name), optimize=True)
  return name


def _display(path, size) -> np.ndarray:
  """The photo at the model's aspect, enlarged to >= 128 px for the eye."""
  scale = max(1, math.ceil(128 / max(size)))
  return read_image(path, (size[0] * scale, size[1] * scale))


def _caption(logits: np.ndarray, labels) -> str:
  top, p = int(np.argmax(logits)), np.exp(logits - logits.max())
  name = labels[top] if labels and top < len(labels) else f'class {top}'
  return f'{name} {p[top] / p.sum():.0%}'


def draw_posemb(a: Arrays, out: str) -> str:
  # One mosaic (tiles separated by blank rows/columns) instead of gh*gw axes:
  # fast even for a 24x24 grid.
  (gh, gw), sim = a['grid'], a['posemb_similarity']
  mosaic = np.full((gh * (gh + 1), gw * (gw + 1)), np.nan)
  for i in range(gh):
    for j in range(gw):
      mosaic[i * (gh + 1):i * (gh + 1) + gh,
             j * (gw + 1):j * (gw + 1) + gw] = sim[i, j]
  fig, ax = plt.subplots(figsize=(6, 6 * gh / gw))
  im = ax.imshow(mosaic, cmap=plt.get_cmap('viridis').with_extremes(
      bad='white'), vmin=-1, vmax=1, interpolation='nearest')
  ax.set_xticks(np.arange(gw) * (gw + 1) + gw / 2 - 0.5, range(1, gw + 1))
  ax.set_yticks(np.arange(gh) * (gh + 1) + gh / 2 - 0.5, range(1, gh + 1))
  ax.set(xlabel='Input patch column', ylabel='Input patch row',
         title='Position embedding similarity')
  fig.colorbar(im, ax=ax, fraction=0.046, label='Cosine similarity')
  return _save(fig, out, 'posemb_similarity.png')


def draw_filters(a: Arrays, out: str) -> str:
  comps, var = a['embedding_filters'], a['filter_variance']
  cols = min(7, len(comps))
  rows = math.ceil(len(comps) / cols)
  fig, axes = plt.subplots(rows, cols, figsize=(cols, rows + 0.4),
                           squeeze=False, layout='constrained')
  for k, ax in enumerate(axes.flat):
    ax.axis('off')
    if k < len(comps):  # each component stretched to the full colour range
      c = comps[k]
      ax.imshow((c - c.min()) / max(c.max() - c.min(), 1e-12),
                interpolation='nearest')
      ax.set_title(f'{var[k]:.1%}', fontsize=7)
  fig.suptitle('RGB embedding filters (principal components, % variance)')
  return _save(fig, out, 'embedding_filters.png')


def draw_rollout(a: Arrays, out: str, show: np.ndarray,
                 labels: list[str] | None) -> str:
  size, cols = tuple(a['image_size']), min(4, len(show))
  rows = math.ceil(len(show) / cols)
  fig, axes = plt.subplots(rows, 2 * cols, figsize=(4 * cols, 2.1 * rows),
                           squeeze=False, layout='constrained')
  for ax in axes.flat:
    ax.axis('off')
  for k, i in enumerate(show):
    photo = _display(a['image_files'][i], size)
    # As the paper's figure: the photo times the map scaled to max 1.
    mask = Image.fromarray((a['rollout'][i] / a['rollout'][i].max()).astype(
        np.float32)).resize(photo.shape[1::-1], Image.BILINEAR)
    row, col = divmod(k, cols)
    axes[row, 2 * col].imshow(photo)
    axes[row, 2 * col + 1].imshow(
        (photo * np.asarray(mask)[..., None]).astype(np.uint8))
    axes[row, 2 * col + 1].set_title(_caption(a['logits'][i], labels),
                                     fontsize=8)
  fig.suptitle('Attention rollout, output -> input (pairs: image, attention)')
  return _save(fig, out, 'attention_rollout.png')


def draw_per_layer(a: Arrays, out: str, show: np.ndarray) -> str:
  maps, size = a['per_layer'], tuple(a['image_size'])
  fig, axes = plt.subplots(len(show), 1 + len(maps), squeeze=False,
                           layout='constrained',
                           figsize=(1.3 * (1 + len(maps)), 1.3 * len(show)))
  for r, i in enumerate(show):
    axes[r, 0].imshow(_display(a['image_files'][i], size))
    for layer, m in enumerate(maps[:, i]):
      axes[r, layer + 1].imshow(m, cmap='inferno', interpolation='nearest')
      axes[0, layer + 1].set_title(f'layer {layer + 1}', fontsize=8)
  for ax in axes.flat:
    ax.axis('off')
  fig.suptitle('Raw attention of the output, heads averaged')
  return _save(fig, out, 'attention_per_layer.png')


def draw_distance(a: Arrays, out: str) -> str:
  dist, size = a['attention_distance'], tuple(a['image_size'])  # [L, heads]
  uniform = ins.patch_distances(a['grid'], a['pixels_per_token']).mean()
  fig, ax = plt.subplots(figsize=(5, 4))
  for h in range(dist.shape[1]):
    ax.scatter(np.arange(1, len(dist) + 1), dist[:, h], s=14,
               label=f'head {h + 1}' if dist.shape[1] <= 16 else None)
  ax.axhline(uniform, color='gray', ls='--', lw=1, label='uniform attention')
  ax.set(xlabel='Network depth (layer)', xticks=range(1, len(dist) + 1),
         ylim=(0, 1.1 * max(dist.max(), uniform)),
         ylabel='Mean attention distance (pixels)',
         title=f'{len(a["image_files"])} images at {size[0]}x{size[1]}')
  ax.legend(fontsize=7, ncol=2, loc='lower right')
  return _save(fig, out, 'attention_distance.png')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  if not _OUT.value:
    raise app.UsageError('--out is required.')
  size = [int(s) for s in _IMAGE_SIZE.value or []]
  if len(size) > 2:
    raise app.UsageError('--image_size: give H or H,W.')
  model, params, size, labels = load_model(
      (size * 2)[:2] if size else None)  # H -> (H, H)
  logging.info('%s pooling, %dx%d images.', model.classifier, *size)
  files = find_images(_IMAGES.value, _MAX_IMAGES.value)
  tokens = ins.num_prefix_tokens(model) + math.prod(ins.token_grid(model, size))
  per_image = 4 * model.num_layers * model.num_heads * tokens**2
  batch_size = max(1, min(_BATCH.value, 2**29 // per_image))
  a = ins.inspect_model(model, params, size, batches(files, size, batch_size),
                        _NUM_FILTERS.value)
  if files:
    a['image_files'] = np.array([str(f) for f in files])
  out = _OUT.value
  os.makedirs(out, exist_ok=True)
  written = [draw_posemb(a, out)]
  if 'embedding_filters' in a:
    written.append(draw_filters(a, out))
  if files:
    # Evenly spread over the (sorted) images: variety, yet deterministic.
    num = min(max(_NUM_SHOW.value, 1), len(files))
    show = np.unique(np.linspace(0, len(files) - 1, num).astype(int))
    written.append(draw_rollout(a, out, show, labels))
    if _PER_LAYER.value:
      written.append(draw_per_layer(a, out, show))
    written.append(draw_distance(a, out))
  if not _PER_LAYER.value:
    a.pop('per_layer', None)
  np.savez_compressed(os.path.join(out, 'arrays.npz'), **a)
  for name in [*written, 'arrays.npz']:
    print(os.path.join(out, name))


if __name__ == '__main__':
  app.run(main)
