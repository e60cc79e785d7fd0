"""Where a model comes from: a training workdir, an .npz, or an export.

Each loader gives a `Source`: the architecture (rebuilt for inference, with
INFERENCE_OPTIONS), its params flat under Google's original names (those of
the exported files), resolution, label names, eval resize mode, and what it
was loaded from. `vit_jax.export` writes a Source to files; `vit_jax.predict`
runs one through `logits_fn`, the function that export also serializes.

An .npz holds no architecture: `from_npz` takes the model name (ViT-B_16,
...) and reads widths, depth, heads, patch size, class token, pre-logits and
classes from the array shapes (overrides win over them), the resolution from
the position embedding unless it is given. `at_image_size` moves any Source
to another resolution, resizing the position embedding as fine-tuning does.
Nothing here imports TensorFlow, a workdir included (`vit_jax.workdir`
restores its checkpoints without the trainer).
"""
import ast
from collections.abc import Mapping, Sequence
import dataclasses
import math
import os
import pathlib
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax import checkpoint
from vit_jax import images
from vit_jax import model_registry
from vit_jax import models
from vit_jax import npz_layout
from vit_jax import posemb
from vit_jax import serving

# Overrides for the exported/served model: params come unrolled, and remat,
# scan and cuDNN attention only matter for training or on one platform.
INFERENCE_OPTIONS = dict(scan_layers=False, remat_policy='none',
                         attention_impl='xla')
_DTYPE_FIELDS = ('dtype', 'param_dtype')


@dataclasses.dataclass(frozen=True)
class Source:
  """A model to export or run: architecture, flat params and eval protocol."""
  model: models.VisionTransformer  # with INFERENCE_OPTIONS
  model_name: str
  params: dict[str, np.ndarray]  # flat, Google's original names (the files')
  image_size: tuple[int, int]
  label_names: list[str] | None
  resize: str  # eval preprocessing: images.RESIZE_MODES
  step: int | None
  origin: dict[str, Any]  # what the card records as its source


def _flat_original(params: Any) -> dict[str, np.ndarray]:
  """Any params tree (linen, scanned or not) -> flat original numpy arrays."""
  flat = npz_layout.flatten(jax.device_get(params))
  flat = npz_layout.to_original_layout(npz_layout.to_linen_layout(flat))
  return {k: np.asarray(v) for k, v in flat.items()}


def linen_params(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Flat original params (a Source's) -> our model's linen tree."""
  return npz_layout.unflatten(npz_layout.to_linen_layout(flat))


def from_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> Source:
  """The model of a training workdir (newest checkpoint, or `step`)."""
  # Imported here: only a workdir needs the checkpoint restore (orbax,
  # tensorstore) and optimizer (optax) code; an npz or a card does not.
  from vit_jax import workdir as vit_workdir  # pylint: disable=g-import-not-at-top
  trained = vit_workdir.load_workdir(workdir, step)
  return Source(
      model=trained.model.clone(**INFERENCE_OPTIONS),
      model_name=trained.config.model_name,
      params=_flat_original(trained.params), image_size=trained.image_size,
      label_names=trained.label_names,
      resize=trained.config.get('eval_resize', 'resize'), step=trained.step,
      origin={'kind': 'workdir', 'path': os.path.abspath(workdir),
              'checkpoint': os.path.join(os.path.abspath(workdir),
                                         'checkpoints', str(trained.step))})


def _infer_options(flat: dict[str, np.ndarray], model_name: str
                   ) -> dict[str, Any]:
  """Architecture fields that the (linen-named) arrays' shapes give."""
  def shape(suffix):
    return next((v.shape for k, v in flat.items() if k.endswith(suffix)), None)
  blocks = {k.split('/')[1] for k in flat
            if k.startswith('Transformer/encoderblock_')}
  options = {'num_layers': len(blocks), 'num_heads': shape('query/kernel')[1],
             'mlp_dim': shape('MlpBlock_0/Dense_0/kernel')[-1],
             'patch_size': tuple(flat['embedding/kernel'].shape[:2]),
             'hidden_size': flat['embedding/kernel'].shape[-1],
             'representation_size': (shape('pre_logits/kernel') or [None])[-1]}
  if 'cls' not in flat and model_registry.get_model_config(model_name).get(
      'classifier', 'token') == 'token':
    options['classifier'] = 'gap'
  return options


def _check_shapes(model: models.VisionTransformer, flat: dict[str, Any],
                  image_size: tuple[int, int], source: str, what: str) -> None:
  """One ValueError listing every param the model lacks, wants or reshapes."""
  init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_size, 3))))['params']
  want = {k: v.shape for k, v in npz_layout.flatten(init).items()}
  have = {k: np.shape(v) for k, v in flat.items()}
  problems = [f'{k}: file {have.get(k, "-")}, model {want.get(k, "-")}'
              for k in sorted(set(want) | set(have))
              if want.get(k) != have.get(k)]
  if problems:
    more = f'\n  ... and {len(problems) - 20} more' if len(problems) > 20 else ''
    raise ValueError(f'{source} does not fit {what}, {len(problems)} params '
                     'differ:\n  ' + '\n  '.join(problems[:20]) + more)


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
  """['num_heads=3', 'classifier=gap', ...] -> model fields for `from_npz`.

  Values are Python literals (3, (16, 16), None), else bare strings.
  """
  overrides = {}
  for item in items:
    key, eq, value = item.partition('=')
    if not eq:
      raise ValueError(f'{item!r} is not key=value.')
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value  # a bare string, e.g. classifier=gap
  return overrides


def from_npz(path: str | os.PathLike, model_name: str, *,
             num_classes: int | None = None,
             image_size: tuple[int, int] | None = None,
             labels: str | os.PathLike | None = None,
             resize: str = 'resize',
             overrides: Mapping[str, Any] | None = None,
             resize_posemb: bool = False) -> Source:
  """An `.npz` (any layout `load_npz` reads) as the named architecture.

  Args:
    path: the .npz, or a directory holding `params.npz`.
    model_name: registry name; it gives what the arrays do not (a hybrid's
      stem, dtypes).
    num_classes: expected classes; ValueError unless the head has as many.
    image_size: the resolution; None: the square grid of the position
      embedding.
    labels: label names file (`serving.read_labels`).
    resize: eval preprocessing, one of images.RESIZE_MODES.
    overrides: model fields that win over those the arrays give (not over
      INFERENCE_OPTIONS).
    resize_posemb: whether an `image_size` whose patch count differs from the
      position embedding's takes it resized (`at_image_size`) from its square
      grid; else such an `image_size` is a ValueError.
  """
  if resize not in images.RESIZE_MODES:
    raise ValueError(f'eval_resize={resize!r}; allowed: '
                     f'{", ".join(images.RESIZE_MODES)}.')
  if pathlib.Path(path).is_dir():
    path = pathlib.Path(path) / 'params.npz'
  flat = npz_layout.flatten(checkpoint.load_npz(path))
  flat = npz_layout.unstack_blocks(flat)  # The inference model is unrolled.
  found = flat['head/kernel'].shape[-1] if 'head/kernel' in flat else 0
  if num_classes is not None and num_classes != found:
    raise ValueError(f'--num_classes={num_classes} but the head of {path} '
                     f'has {found} classes.')
  model = models.create_model(model_name, found, **{
      **_infer_options(flat, model_name), **(overrides or {}),
      **INFERENCE_OPTIONS})
  stored = image_size
  if image_size is not None:
    model.check_input_shape((1, *image_size, 3))
  tokens = flat[npz_layout.POSEMB].shape[1] - int('cls' in flat)
  if image_size is None or resize_posemb and tokens != math.prod(
      model.token_grid(image_size)):
    grid = posemb.infer_grid(tokens, f'position embedding of {path}')
    stored = (grid[0] * model.input_stride[0],
              grid[1] * model.input_stride[1])
  _check_shapes(model, flat, stored, os.fspath(path),
                f'{model_name} at {stored[0]}x{stored[1]}')
  source = Source(
      model=model, model_name=model_name, params=_flat_original(flat),
      image_size=tuple(stored),
      label_names=serving.read_labels(labels, found) if labels else None,
      resize=resize, step=None,
      origin={'kind': 'npz', 'path': os.path.abspath(path)})
  return at_image_size(source, image_size) if image_size else source


def at_image_size(source: Source, image_size: Sequence[int]) -> Source:
  """`source` at another resolution: its position embedding resized.

  The patch grid part is interpolated bilinearly (`posemb`), as fine-tuning
  at a new resolution does; the class-token slot is kept.
  """
  image_size = tuple(image_size)
  source.model.check_input_shape((1, *image_size, 3))
  old_grid = source.model.token_grid(source.image_size)
  grid = source.model.token_grid(image_size)
  params = source.params
  if grid != old_grid:
    logging.info('Position embedding resized from %s to %s.', old_grid, grid)
    params = {**params, npz_layout.POSEMB: posemb.interpolate_posemb(
        params[npz_layout.POSEMB], grid, old_grid=old_grid,
        num_prefix_tokens=int('cls' in params))}
  return dataclasses.replace(source, params=params, image_size=image_size)


def model_options(model: models.VisionTransformer) -> dict[str, Any]:
  """The model's fields as JSON values (dtypes by name, tuples as lists)."""
  options = {}
  for field in dataclasses.fields(model):
    if field.name in ('parent', 'name', 'num_classes'):
      continue
    value = getattr(model, field.name)
    if field.name in _DTYPE_FIELDS:
      value = np.dtype(value).name
    options[field.name] = list(value) if isinstance(value, tuple) else value
  return options


def model_from_card(card: dict[str, Any]) -> models.VisionTransformer:
  """Rebuilds the card's model (inverse of `model_options`)."""
  options = {k: (jnp.dtype(v) if k in _DTYPE_FIELDS else
                 tuple(v) if isinstance(v, list) else v)
             for k, v in card['model']['options'].items()}
  return models.create_model(card['model']['name'], card['num_classes'],
                             **options)


def logits_fn(model: models.VisionTransformer
              ) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
  """(flat original params, float32 pixels in [0, 255]) -> logits.

  The function that is exported, and that predict runs with model code.
  """
  def fn(flat_params, pixels):
    # Cast up first: bfloat16 weights then compute like float32 ones rounded.
    flat = {k: v.astype(model.param_dtype) for k, v in flat_params.items()}
    params = linen_params(flat)
    x = pixels.astype(jnp.float32) / 127.5 - 1.0  # preprocess.to_unit_range
    return model.apply({'params': params}, x, train=False)
  return fn


def source_from_card(path: str | os.PathLike) -> Source:
  """An export back as a Source (model code), from safetensors or npz."""
  card_path, card = serving.read_card(path)
  if card['files'].get('safetensors'):
    flat = serving.read_safetensors(card_path, card)
  else:
    npz = serving.export_file(card_path, card, 'npz')
    flat = _flat_original(checkpoint.load_npz(npz))
    flat = {k: np.asarray(v, card['params']['dtype']) for k, v in flat.items()}
    serving.verify_checksum(flat, card, npz)
  return Source(model=model_from_card(card), model_name=card['model']['name'],
                params=flat, image_size=tuple(card['image_size']),
                label_names=card['label_names'],
                resize=card['preprocessing']['resize'], step=card['step'],
                origin={'kind': 'export', 'path': str(card_path)})
