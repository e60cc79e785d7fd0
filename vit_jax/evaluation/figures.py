"""The figures: the paper's inspection pictures and a confusion matrix (matplotlib).

Each `draw_*` takes the arrays of `inspection.inspect_model` (or evaluate's
metrics) and writes one PNG into a folder, returning its name. PNGs are
256-colour, a third of the size, so that pictures can live in the repo.
"""
import io
import math
import os

import matplotlib
matplotlib.use('Agg')  # files only; no display on servers
from matplotlib import pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from vit_jax.base import files  # noqa: E402
from vit_jax.evaluation import inspection  # noqa: E402
from vit_jax.serving import images  # noqa: E402

Arrays = dict[str, np.ndarray]  # the output of inspection.inspect_model


def _save(fig, out: str, name: str) -> str:
  # 256-colour PNG: a third of the size, so pictures can live in the repo.
  buffer = io.BytesIO()
  fig.savefig(buffer, format='png', dpi=80, bbox_inches='tight')
  plt.close(fig)
  picture = Image.open(buffer).convert('RGB').quantize(256)
  files.write_atomic(os.path.join(out, name), lambda tmp: picture.save(
      tmp, format='PNG', optimize=True))
  return name


def _display(path, size) -> np.ndarray:
  """The photo as the model sees it (its resize), enlarged to >= 128 px."""
  scale = max(1, math.ceil(128 / max(size)))
  pixels = images.eval_pixels(images.load_rgb(path),
                              (size[0] * scale, size[1] * scale))
  return np.round(pixels).astype(np.uint8)


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
  uniform = inspection.patch_distances(a['grid'], a['pixels_per_token']).mean()
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


def draw_confusion(confusion: np.ndarray, label_names: list[str], out: str,
                   title: str) -> str:
  """Row-normalised confusion matrix (rows: true class), counts if few classes."""
  confusion = np.asarray(confusion, np.float64)
  n = len(confusion)
  rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
  size = min(max(4.0, 0.45 * n + 2), 16.0)
  fig, ax = plt.subplots(figsize=(size + 1, size))
  im = ax.imshow(rates, cmap='Blues', vmin=0, vmax=1, interpolation='nearest')
  if n <= 30:
    ticks = np.arange(n)
    ax.set_xticks(ticks, label_names, rotation=90, fontsize=7)
    ax.set_yticks(ticks, label_names, fontsize=7)
    for i in range(n):
      for j in range(n):
        if confusion[i, j]:
          ax.text(j, i, int(confusion[i, j]), ha='center', va='center',
                  fontsize=6, color='white' if rates[i, j] > 0.5 else 'black')
  ax.set(xlabel='Predicted class', ylabel='True class', title=title)
  fig.colorbar(im, ax=ax, fraction=0.046, label='Fraction of the true class')
  return _save(fig, out, 'confusion_matrix.png')
