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
the position embedding unless --image_size is given (`vit_jax.model_sources`
loads either source). TensorFlow is never imported, not even for a workdir.
"""
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
from vit_jax import cli
from vit_jax import images
from vit_jax import model_sources
from vit_jax import models
from vit_jax import serving

FORMATS = ('npz', 'safetensors', 'stablehlo')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._+-]*$')


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
  exported = jax.export.export(jax.jit(model_sources.logits_fn(model)),
                               platforms=platforms)(
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


def make_card(source: model_sources.Source, name: str,
              flat: dict[str, np.ndarray], files: dict[str, str],
              stablehlo: dict | None) -> dict[str, Any]:
  """The JSON card of an export of `source` with params `flat`."""
  crop = images.CROP_FRACTION if source.resize == 'resize_crop' else None
  return {
      'format': serving.CARD_FORMAT, 'name': name,
      'model': {'name': source.model_name,
                'options': model_sources.model_options(source.model)},
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


def export(source: model_sources.Source, output_dir: str | os.PathLike,
           name: str, *,
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
    checkpoint.save_npz(out / files['npz'], model_sources.linen_params(flat),
                        bfloat16=bfloat16)
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


def _define_flags() -> None:
  # Only when run as a program: other code imports this module, and absl
  # flags are global to a process (other programs' have the same names).
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
      source = model_sources.from_workdir(f.workdir, f.step)
      name = f'{pathlib.Path(f.workdir).resolve().name}_step{source.step}'
    else:
      source = model_sources.from_npz(
          f.npz, f.model_name, num_classes=f.num_classes,
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


if __name__ == '__main__':
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
