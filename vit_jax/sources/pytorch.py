"""Models from the PyTorch ecosystem: timm and Hugging Face checkpoints.

    sources.load('vit_base_patch16_224.augreg_in21k/')      # timm folder
    sources.load('model.safetensors', model_name='vit_base_patch16_224')
    sources.load('google-vit-base-patch16-224/')            # transformers
    sources.load('hf-hub:timm/vit_base_patch16_224.augreg2_in21k_ft_in1k')

A folder holds `config.json` and `model.safetensors`: timm's config names an
`architecture`, transformers' a `model_type`. The architecture, resolution,
label names and eval preprocessing come from the config; weights are read
with safetensors (never unpickled: `.bin` / `.pth` files are refused with the
command that converts them). Hub ids resolve through huggingface_hub's cache,
so a populated cache works offline (HF_HUB_OFFLINE=1).
"""
import contextlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax.base import files
from vit_jax.base import limits
from vit_jax.checkpoint import weight_files
from vit_jax.interop import hf
from vit_jax.interop import timm
from vit_jax import models
from vit_jax.models import registry
from vit_jax.sources import base

HUB_PREFIX = 'hf-hub:'
PICKLE_SUFFIXES = ('.bin', '.pth', '.pt', '.ckpt', '.pkl')
WEIGHTS = 'model.safetensors'


def refuse_pickle(path: pathlib.Path) -> None:
  """One line: why a pickle is not read, and how to convert it."""
  raise ValueError(
      f'{path} is a pickle-based PyTorch file, which vit_jax does not load '
      '(unpickling can run code). Convert it once to safetensors: python -c '
      '"import torch, safetensors.torch as st; '
      f"st.save_file(torch.load('{path}', map_location='cpu', "
      f"weights_only=True), 'model.safetensors')\"")


def format_of(path: pathlib.Path) -> str | None:
  """'timm' or 'hf' for a folder (or its config.json) or .safetensors file
  in those formats; None for anything else."""
  if path.is_file() and path.suffix in PICKLE_SUFFIXES:
    refuse_pickle(path)
  folder = path if path.is_dir() else path.parent
  config = folder / 'config.json'
  if path.is_dir() and not (path / WEIGHTS).is_file():
    pickles = [p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if config.is_file() and pickles:
      refuse_pickle(pickles[0])
    return None
  if path.is_file() and path.suffix != '.safetensors':
    return None
  if config.is_file():
    content = _read_config(config)
    if 'architecture' in content:
      return 'timm'
    if 'model_type' in content:
      return 'hf'
  if path.is_file():
    keys = weight_files.keys(path)
    if any(k.startswith('blocks.') for k in keys):
      return 'timm'
    if any(k.startswith(('vit.', 'embeddings.')) for k in keys):
      return 'hf'
  return None


def _read_config(path: pathlib.Path) -> dict[str, Any]:
  try:
    config = files.read_json(path, 'config')
  except limits.LimitError:
    raise
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is not readable JSON: {e}') from None
  if not isinstance(config, dict):
    raise ValueError(f'{path} holds {type(config).__name__}, not a JSON '
                     'object.')
  return config


@contextlib.contextmanager
def _naming(path: pathlib.Path):
  """A config value's ValueError (or a wrong type inside the reader) as one
  line naming the file."""
  try:
    yield
  except limits.LimitError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise ValueError(f'{path}: {e}') from None


def _label_names(names: Any, num_classes: int, path: pathlib.Path
                 ) -> list[str] | None:
  """A config's label names, which must name every class if given."""
  if not names:
    return None
  if not isinstance(names, (list, tuple)) or len(names) != num_classes:
    count = len(names) if isinstance(names, (list, tuple, dict)) else names
    raise ValueError(f'{path} names {count!r} labels for a {num_classes}-'
                     'class head; give one name per class (or none).')
  return [str(n) for n in names]


def _registry_name(options: dict[str, Any]) -> str:
  """Our name closest to `options` (a card's name; its options win)."""
  same = [n for n, c in registry.MODELS.items()
          if c.get('hidden_size') == options['hidden_size']
          and (c.get('resnet_layers') is None) == (
              options.get('resnet_layers') is None)]
  exact = [n for n in same
           if registry.MODELS[n]['patch_size'] == options['patch_size']]
  return (exact or same or ['ViT-B_16'])[0]


def _build(options: dict[str, Any], image_size, state, convert, source: str
           ) -> tuple[Any, str, dict, tuple[int, int]]:
  options = dict(options)
  num_classes = options.pop('num_classes')
  name = _registry_name(options)
  model = models.create_model(name, num_classes,
                              **{**options, **base.INFERENCE_OPTIONS})
  if image_size is None:  # a square grid from the position embedding
    posemb = next(v for k, v in state.items()
                  if k.endswith(('pos_embed', 'position_embeddings')))
    side = int(round((posemb.shape[1] - model.posemb_prefix_tokens) ** 0.5))
    image_size = (side * model.input_stride[0], side * model.input_stride[1])
  image_size = tuple(int(s) for s in image_size)
  init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_size, 3))))['params']
  return model, name, convert(init, model), image_size


def from_timm(path: str | os.PathLike, architecture: str | None = None, *,
              origin: dict[str, Any] | None = None) -> base.Source:
  """A timm checkpoint: a folder with config.json and model.safetensors, or
  a bare .safetensors with `architecture` (timm's name, e.g.
  vit_base_patch16_224)."""
  path = pathlib.Path(path)
  weights = path / WEIGHTS if path.is_dir() else path
  config_path = weights.parent / 'config.json'
  config = _read_config(config_path) if config_path.is_file() else {}
  if architecture:
    config = {**config, 'architecture': architecture}
  if not config.get('architecture'):
    raise ValueError(f'{weights} has no config.json beside it: name its timm '
                     'architecture with --model_name (e.g. '
                     'vit_base_patch16_224).')
  state = weight_files.read(weights)
  with _naming(config_path):
    options, image_size = timm.model_options(state, config, str(weights))
    preprocessing = timm.preprocessing_from(config)
  model, name, params, image_size = _build(
      options, image_size, state,
      lambda init, model: timm.from_timm(state, init, model, str(weights)),
      str(weights))
  return base.Source(
      model=model, model_name=name, params=params, image_size=image_size,
      label_names=_label_names(config.get('label_names'), model.num_classes,
                               config_path),
      preprocessing=preprocessing, step=None,
      origin={'kind': 'timm', 'path': os.path.abspath(weights),
              'architecture': config['architecture'], **(origin or {})})


def from_hf(path: str | os.PathLike, *,
            origin: dict[str, Any] | None = None) -> base.Source:
  """A Hugging Face transformers ViT folder: config.json, model.safetensors
  and, if present, preprocessor_config.json."""
  path = pathlib.Path(path)
  folder = path if path.is_dir() else path.parent
  config_path = folder / 'config.json'
  config = _read_config(config_path)
  with _naming(config_path):
    options, image_size = hf.model_options(config)
    labels = hf.label_names(config)
  weights = folder / WEIGHTS
  state = weight_files.read(weights)
  preprocessor = folder / 'preprocessor_config.json'
  with _naming(preprocessor):
    preprocessing = hf.preprocessing_from(
        _read_config(preprocessor) if preprocessor.is_file() else None,
        image_size)
  model, name, params, image_size = _build(
      options, image_size, state,
      lambda init, model: hf.from_hf(state, model), str(weights))
  base.check_shapes(model, params, image_size, str(weights), name)
  return base.Source(
      model=model, model_name=name, params=params, image_size=image_size,
      label_names=_label_names(labels, model.num_classes, config_path),
      preprocessing=preprocessing, step=None,
      origin={'kind': 'hf', 'path': os.path.abspath(weights),
              'architecture': (config.get('architectures') or ['ViTModel'])[0],
              **(origin or {})})


def resolve_hub(model_id: str) -> pathlib.Path:
  """The local snapshot folder of `hf-hub:<org>/<name>[@revision]`, through
  huggingface_hub's cache (downloading unless HF_HUB_OFFLINE=1)."""
  repo_id, _, revision = model_id.removeprefix(HUB_PREFIX).partition('@')
  try:
    import huggingface_hub  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f'{model_id} needs huggingface_hub: pip install '
                     '"vit_jax[hub]" (or huggingface_hub).') from e
  try:
    return pathlib.Path(huggingface_hub.snapshot_download(
        repo_id, revision=revision or None,
        allow_patterns=['config.json', WEIGHTS, 'preprocessor_config.json']))
  except Exception as e:  # the library's errors have no common base
    offline = os.environ.get('HF_HUB_OFFLINE', '') not in ('', '0')
    raise ValueError(
        f'{model_id}: not found{" in the local cache (HF_HUB_OFFLINE=1)" if offline else ""}'
        f' ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}).'
        ' Check the id, or download it once with network access.') from e


def from_hub(model_id: str) -> base.Source:
  """A timm or transformers model by Hub id (`hf-hub:org/name`)."""
  folder = resolve_hub(model_id)
  origin = {'hub_id': model_id.removeprefix(HUB_PREFIX),
            'revision': folder.name}
  kind = format_of(folder)
  if kind == 'timm':
    return from_timm(folder, origin=origin)
  if kind == 'hf':
    return from_hf(folder, origin=origin)
  raise ValueError(f'{model_id} ({folder}) holds no {WEIGHTS} with a timm '
                   'or transformers config.json.')

