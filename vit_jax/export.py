"""Exports a trained ViT as npz, safetensors and StableHLO, with a JSON card.

    python -m vit_jax.export --workdir=DIR [--step=N] --output=OUT
    python -m vit_jax.export --npz=ViT-B_16.npz --model_name=ViT-B_16 \\
        [--image_size=224] [--labels=FILE] [--eval_resize=resize] --output=OUT
    options: --name=NAME --formats=npz,safetensors,stablehlo --bfloat16
             --platforms=cpu,cuda

Writes into OUT, every file named `<name>.*` (default name: the workdir's
name and step, or the npz's stem):
  .npz          Google's original layout (`checkpoint.save_npz`): Google's
                vision_transformer code and timm read it (float32 only).
  .safetensors  the same arrays under the same flat names: '/'-joined
                Google names, e.g. `Transformer/encoderblock_0/
                MultiHeadDotProductAttention_1/query/kernel`, `cls`,
                `embedding/kernel`, `head/bias` (`npz_layout` lists them).
  .stablehlo    `jax.export` of logits = f(params, pixels) with a symbolic
                batch dimension, contract in `vit_jax.serving`; it takes its
                weights from the .safetensors, always written with it.
  .card.json    always, written last (its presence means the export is
                complete): model name and options, classes and label names,
                resolution, preprocessing, training step, source checkpoint
                and the params' sha256 (`serving.params_checksum`).
--bfloat16 stores bfloat16 weights in all three (the card's checksum is of
the stored arrays); computation stays float32, with the rounded weights.
For an npz, the architecture comes from --model_name with widths, depth,
heads, patch size and classes read from the array shapes, the resolution from
the position embedding unless --image_size is given. TensorFlow is imported
only to read a workdir (through the trainer's checkpoint layout).
"""
import dataclasses
import datetime
import json
import os
import pathlib
import re
import sys
import tempfile
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from vit_jax import checkpoint
from vit_jax import images
from vit_jax import model_registry
from vit_jax import models
from vit_jax import npz_layout
from vit_jax import posemb
from vit_jax import serving

FORMATS = ('npz', 'safetensors', 'stablehlo')
# Overrides for the exported/served model: params come unrolled, and remat,
# scan and cuDNN attention only matter for training or on one platform.
INFERENCE_OPTIONS = dict(scan_layers=False, remat_policy='none',
                         attention_impl='xla')
_DTYPE_FIELDS = ('dtype', 'param_dtype')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._+-]*$')


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


def from_workdir(workdir: str | os.PathLike, step: int | None = None
                 ) -> Source:
  """The model of a training workdir (newest checkpoint, or `step`)."""
  # Imported here: reading a workdir goes through the trainer, hence TF.
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


def from_npz(path: str | os.PathLike, model_name: str, *,
             num_classes: int | None = None,
             image_size: tuple[int, int] | None = None,
             labels: str | os.PathLike | None = None,
             resize: str = 'resize') -> Source:
  """An `.npz` (any layout `load_npz` reads) as the named architecture."""
  if resize not in images.RESIZE_MODES:
    raise ValueError(f'eval_resize={resize!r}; allowed: '
                     f'{", ".join(images.RESIZE_MODES)}.')
  flat = npz_layout.flatten(checkpoint.load_npz(path))
  flat = npz_layout.unstack_blocks(flat)  # The inference model is unrolled.
  found = flat['head/kernel'].shape[-1] if 'head/kernel' in flat else 0
  if num_classes is not None and num_classes != found:
    raise ValueError(f'--num_classes={num_classes} but the head of {path} '
                     f'has {found} classes.')
  model = models.create_model(model_name, found,
                              **_infer_options(flat, model_name),
                              **INFERENCE_OPTIONS)
  if image_size is None:
    tokens = flat[npz_layout.POSEMB].shape[1] - int('cls' in flat)
    grid = posemb.infer_grid(tokens, f'position embedding of {path}')
    image_size = (grid[0] * model.input_stride[0],
                  grid[1] * model.input_stride[1])
  model.check_input_shape((1, *image_size, 3))
  _check_shapes(model, flat, image_size, os.fspath(path),
                f'{model_name} at {image_size[0]}x{image_size[1]}')
  return Source(
      model=model, model_name=model_name, params=_flat_original(flat),
      image_size=tuple(image_size),
      label_names=serving.read_labels(labels, found) if labels else None,
      resize=resize, step=None,
      origin={'kind': 'npz', 'path': os.path.abspath(path)})


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
    params = npz_layout.unflatten(npz_layout.to_linen_layout(flat))
    x = pixels.astype(jnp.float32) / 127.5 - 1.0  # preprocess.to_unit_range
    return model.apply({'params': params}, x, train=False)
  return fn


def _write_atomic(path: pathlib.Path, write: Callable[[str], None]) -> None:
  """`write(tmp)` then rename: readers never see a half-written file."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, suffix='.tmp')
  os.close(fd)
  try:
    write(tmp)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def _export_stablehlo(model: models.VisionTransformer,
                      flat: dict[str, np.ndarray], image_size: tuple[int, int],
                      platforms: tuple[str, ...]) -> tuple[bytes, dict]:
  """Serialized logits_fn (symbolic batch) and its description for the card."""
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(logits_fn(model)), platforms=platforms)(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
      jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32))
  h, w = image_size
  return exported.serialize(), {
      'platforms': list(exported.platforms),
      'args': '(params: {flat name: array} of the safetensors file, pixels: '
              f'float32[batch, {h}, {w}, 3] RGB in [0, 255], resized)',
      'returns': f'float32[batch, {model.num_classes}] logits',
      'calling_convention_version': exported.calling_convention_version}


def _dumps(value: Any, indent: str = '') -> str:
  """JSON with objects indented but lists on one line: readable by people."""
  if isinstance(value, dict) and value:
    inner = indent + '  '
    return '{\n' + ',\n'.join(f'{inner}{json.dumps(k)}: {_dumps(v, inner)}'
                               for k, v in value.items()) + f'\n{indent}}}'
  return json.dumps(value)


def make_card(source: Source, name: str, flat: dict[str, np.ndarray],
              files: dict[str, str], stablehlo: dict | None) -> dict[str, Any]:
  """The JSON card of an export of `source` with params `flat`."""
  crop = images.CROP_FRACTION if source.resize == 'resize_crop' else None
  return {
      'format': serving.CARD_FORMAT, 'name': name,
      'model': {'name': source.model_name,
                'options': model_options(source.model)},
      'num_classes': source.model.num_classes,
      'label_names': source.label_names,
      'image_size': list(source.image_size),
      'preprocessing': {
          'resize': source.resize, 'crop_fraction': crop,
          'interpolation': 'bilinear, half-pixel centres, no antialiasing '
                           '(tf.image.resize)',
          'input_range': [0, 255], 'value_range': [-1.0, 1.0],
          'scaling': 'x / 127.5 - 1'},
      'step': source.step, 'source': source.origin,
      'params': {'count': int(sum(v.size for v in flat.values())),
                 'dtype': next(iter(flat.values())).dtype.name,
                 'sha256': serving.params_checksum(flat),
                 'checksum': 'vit_jax.serving.params_checksum'},
      'files': files, 'stablehlo': stablehlo,
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'versions': {'jax': jax.__version__},
  }


def export(source: Source, output_dir: str | os.PathLike, name: str, *,
           formats: tuple[str, ...] = FORMATS, bfloat16: bool = False,
           platforms: tuple[str, ...] = ('cpu', 'cuda')) -> pathlib.Path:
  """Writes `<output_dir>/<name>.*` (module docstring); returns the card."""
  if not _NAME.match(name):
    raise ValueError(f'Export name {name!r} must be letters, digits, ".", '
                     '"_", "+" or "-".')
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f'Unknown export format(s) {unknown}; choose from '
                     f'{", ".join(FORMATS)}.')
  if 'stablehlo' in formats:
    formats = (*formats, 'safetensors')  # The StableHLO takes its weights.
  out = pathlib.Path(output_dir)
  out.mkdir(parents=True, exist_ok=True)
  dtype = ml_dtypes.bfloat16 if bfloat16 else np.float32
  flat = {k: np.ascontiguousarray(v, dtype) for k, v in source.params.items()}
  files = {kind: f'{name}.{kind}' for kind in FORMATS if kind in formats}
  if 'npz' in files:
    checkpoint.save_npz(out / files['npz'], npz_layout.unflatten(
        npz_layout.to_linen_layout(flat)), bfloat16=bfloat16)
  if 'safetensors' in files:
    _write_atomic(out / files['safetensors'], lambda tmp: (
        safetensors.numpy.save_file(flat, tmp, {'card': f'{name}.card.json'})))
  stablehlo = None
  if 'stablehlo' in files:
    blob, stablehlo = _export_stablehlo(source.model, flat, source.image_size,
                                        platforms)
    _write_atomic(out / files['stablehlo'],
                  lambda tmp: pathlib.Path(tmp).write_bytes(blob))
  card = make_card(source, name, flat, files, stablehlo)
  card_path = out / f'{name}{serving.CARD_SUFFIX}'
  _write_atomic(card_path, lambda tmp: pathlib.Path(tmp).write_text(
      _dumps(card) + '\n'))
  return card_path


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


def _define_flags() -> None:
  # Only when run as a program: predict imports this module's functions, and
  # absl flags are global to a process (predict has flags of the same names).
  d = flags
  d.DEFINE_string('workdir', None, 'Training workdir to export.')
  d.DEFINE_integer('step', None, 'Workdir checkpoint step (default: newest).')
  d.DEFINE_string('npz', None, '.npz to export (instead of --workdir).')
  d.DEFINE_string('model_name', None, 'With --npz: e.g. ViT-B_16.')
  d.DEFINE_integer('num_classes', None, 'With --npz: expected classes.')
  d.DEFINE_integer('image_size', None, 'With --npz: resolution (default: '
                   'from the position embedding).')
  d.DEFINE_string('labels', None, 'With --npz: label names file.')
  d.DEFINE_enum('eval_resize', 'resize', images.RESIZE_MODES,
                'With --npz: eval preprocessing.')
  d.DEFINE_string('output', None, 'Output directory.')
  d.DEFINE_string('name', None, 'File name stem (default: from the source).')
  d.DEFINE_list('formats', list(FORMATS), 'Formats to write.')
  d.DEFINE_bool('bfloat16', False, 'Store bfloat16 weights.')
  d.DEFINE_list('platforms', ['cpu', 'cuda'], 'StableHLO lowering platforms.')


def main(argv: list[str]) -> None:
  f = flags.FLAGS
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {" ".join(argv[1:])}', 2)
  if bool(f.workdir) == bool(f.npz) or not f.output:
    raise app.UsageError('Pass --output and one of --workdir or --npz.', 2)
  if set(f.formats) - set(FORMATS):
    raise app.UsageError(f'--formats={",".join(f.formats)}: choose from '
                         f'{",".join(FORMATS)}.', 2)
  if f.npz and not f.model_name:
    raise app.UsageError(f'--npz={f.npz} needs --model_name (e.g. ViT-B_16): '
                         'an npz holds no architecture.', 2)
  try:
    if f.workdir:
      source = from_workdir(f.workdir, f.step)
      name = f'{pathlib.Path(f.workdir).resolve().name}_step{source.step}'
    else:
      source = from_npz(f.npz, f.model_name, num_classes=f.num_classes,
                        image_size=(f.image_size,) * 2 if f.image_size else None,
                        labels=f.labels, resize=f.eval_resize)
      name = pathlib.Path(f.npz).stem
    card_path = export(source, f.output, f.name or name,
                       formats=tuple(f.formats), bfloat16=f.bfloat16,
                       platforms=tuple(f.platforms))
  except (ValueError, OSError) as e:
    sys.exit(f'error: {e}')
  card = json.loads(card_path.read_text())
  print(f'{card["model"]["name"]} ({card["num_classes"]} classes, '
        f'{"x".join(map(str, card["image_size"]))}, step {card["step"]}) '
        f'from {card["source"]["path"]}:')
  paths = [card_path.parent / file
           for file in [*card['files'].values(), card_path.name]]
  for path in paths:
    kib = path.stat().st_size / 1024
    print(f'  {str(path):<{max(len(str(p)) for p in paths)}}  '
          + (f'{kib / 1024:7.1f} MiB' if kib >= 1024 else f'{kib:7.1f} KiB'))
  params = card['params']
  print(f'  {params["count"]:,} params, {params["dtype"]}, sha256 '
        f'{params["sha256"]}')


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is a usage error: exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'error: {e}\nPass --help for usage.\n')
    sys.exit(2)


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=parse_flags)
