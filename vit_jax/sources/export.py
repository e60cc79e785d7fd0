"""Exports: a Source written as one folder of files with a card, and read back.

    card_path = write_export(source, 'out/vit_b16', 'vit_b16')
    source = from_export('out/vit_b16')

The folder holds `<name>.npz` (Google's original layout, which their code and
timm read), `<name>.safetensors` (the same arrays under the same '/'-joined
names), `<name>.stablehlo` (`jax.export` of logits = f(params, pixels), the
contract in `serving.runtime`), `<name>.timm/` and `<name>.hf/` (timm's and
Hugging Face transformers' folders: config.json + model.safetensors, the
card says how each loads) and `<name>.card.json` (`serving.card`). It
is complete or absent: everything is written into a hidden sibling folder
that is renamed into place at the end, replacing an earlier export there;
a killed or failed export leaves the earlier one as it was (the next export
clears what a killed one left behind).
"""
import datetime
import json
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors.numpy

from vit_jax import checkpoint
from vit_jax.base import errors
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout
from vit_jax.interop import hf
from vit_jax.interop import timm
from vit_jax import models
from vit_jax.runs import lock
from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.sources import base

FORMATS = ('npz', 'safetensors', 'stablehlo', 'timm', 'hf')
# What JAX serving reads; the PyTorch folders are asked for by name, since
# not every model fits them (`check_expressible`).
DEFAULT_FORMATS = ('npz', 'safetensors', 'stablehlo')
PLATFORMS = ('cpu', 'cuda', 'rocm', 'tpu')
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._+-]*$')


def check_request(name: str, formats: tuple[str, ...],
                  platforms: tuple[str, ...]) -> None:
  """ValueError for an export that cannot be written as asked."""
  if not _NAME.match(name):
    raise ValueError(f'Export name {name!r} must be letters, digits, ".", '
                     '"_", "+" or "-", starting with a letter or digit.')
  if not formats:
    raise ValueError(f'No export format given; choose from {", ".join(FORMATS)}.')
  for fmt in formats:
    if fmt not in FORMATS:
      raise ValueError(errors.unknown('export format', fmt, FORMATS))
  if 'stablehlo' in formats:
    if not platforms:
      raise ValueError('No StableHLO platform given; choose from '
                       f'{", ".join(PLATFORMS)}.')
    for platform in platforms:
      if platform not in PLATFORMS:
        raise ValueError(errors.unknown('StableHLO platform', platform,
                                        PLATFORMS))


def check_expressible(source: base.Source, formats: tuple[str, ...]) -> None:
  """One line, before anything is written, for a format that cannot hold
  the model (rather than a file that would load wrongly)."""
  pytorch = [f for f in formats if f in ('timm', 'hf')]
  if pytorch and not isinstance(source.model, models.VisionTransformer):
    raise ValueError(
        f'Format {", ".join(pytorch)}: only Vision Transformers, and '
        f'{source.model_name} is a {type(source.model).__name__} ResNet. '
        "Its npz format is BiT's published layout, which timm's "
        'ResNetV2.load_pretrained reads.')
  if 'timm' in formats:
    timm.architecture_name(source.model, source.image_size)
  if 'hf' in formats:
    hf.check_expressible(source.model)


def _write_pytorch_formats(source: base.Source, name: str,
                           partial: pathlib.Path, formats: tuple[str, ...],
                           dtype) -> dict[str, str]:
  """The timm / Hugging Face folders; returns {file kind: relative path}."""
  written = {}
  def save(folder, kind, state, config, extra=None):
    (partial / folder).mkdir()
    state = {k: np.ascontiguousarray(v, dtype) for k, v in state.items()}
    safetensors.numpy.save_file(state, partial / folder / 'model.safetensors',
                                {'format': 'pt'})
    (partial / folder / 'config.json').write_text(dumps(config) + '\n')
    written[kind] = f'{folder}/model.safetensors'
    written[f'{kind}_config'] = f'{folder}/config.json'
    for file, content in (extra or {}).items():
      (partial / folder / file).write_text(dumps(content) + '\n')
      written[f'{kind}_{file.split(".")[0]}'] = f'{folder}/{file}'
  if 'timm' in formats:
    save(f'{name}.timm', 'timm', timm.to_timm(source.params, source.model),
         timm.timm_config(source.model, source.image_size,
                          source.label_names, source.preprocessing))
  if 'hf' in formats:
    save(f'{name}.hf', 'hf', hf.to_hf(source.params, source.model),
         hf.hf_config(source.model, source.image_size, source.label_names),
         {'preprocessor_config.json': hf.preprocessor_config(
             source.preprocessing, source.image_size)})
  return written


def loading_calls(name: str, formats: tuple[str, ...]) -> dict[str, str]:
  """The Python that loads each PyTorch format as `model`, run in the
  export folder."""
  calls = {}
  if 'timm' in formats:
    # The whole pretrained_cfg: with timm's default (1000 classes) it would
    # drop our head as a mismatched classifier and start a random one.
    calls['timm'] = (
        f"import json, timm; cfg = json.load(open('{name}.timm/config.json')); "
        "model = timm.create_model(cfg['architecture'], pretrained=True, "
        "pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], "
        f"file='{name}.timm/model.safetensors'), **cfg['model_args'])")
  if 'hf' in formats:
    calls['hf'] = ('from transformers import ViTForImageClassification; '
                   'model = ViTForImageClassification.from_pretrained('
                   f"'{name}.hf')")
  return calls


def _stablehlo(model: models.VisionTransformer, flat: dict[str, np.ndarray],
               image_size: tuple[int, int],
               preprocessing: images.Preprocessing,
               platforms: tuple[str, ...]) -> tuple[bytes, dict]:
  """Serialized exported_logits_fn (symbolic batch) and its card entry."""
  batch, = jax.export.symbolic_shape('batch')
  exported = jax.export.export(jax.jit(base.exported_logits_fn(
      model, preprocessing)), platforms=platforms)(
      {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in flat.items()},
      jax.ShapeDtypeStruct((batch, *image_size, 3), jnp.float32))
  h, w = image_size
  return exported.serialize(), {
      'platforms': list(exported.platforms),
      'args': '(params: {flat name: array} of the safetensors file, pixels: '
              f'float32[batch, {h}, {w}, 3] RGB in [0, 255], resized)',
      'returns': f'float32[batch, {model.num_classes}] logits',
      'calling_convention_version': exported.calling_convention_version}


def dumps(value: Any, indent: str = '') -> str:
  """JSON with objects indented but lists on one line: readable by people."""
  if isinstance(value, dict) and value:
    inner = indent + '  '
    return '{\n' + ',\n'.join(f'{inner}{json.dumps(k)}: {dumps(v, inner)}'
                               for k, v in value.items()) + f'\n{indent}}}'
  return json.dumps(value, allow_nan=False)


def make_card(source: base.Source, name: str, flat: dict[str, np.ndarray],
              files: dict[str, dict], stablehlo: dict | None
              ) -> dict[str, Any]:
  """The JSON card of an export of `source` with params `flat`."""
  return {
      'format': card_lib.CARD_FORMAT, 'name': name,
      'model': {'name': source.model_name,
                'options': models.options_to_json(source.model)},
      'num_classes': source.model.num_classes,
      'label_names': source.label_names,
      'image_size': list(source.image_size),
      'preprocessing': {
          **source.preprocessing.to_json(), 'input_range': [0, 255],
          'scaling': '(x / 255 - mean) / std, inside the StableHLO function'},
      'step': source.step, 'source': source.origin,
      'params': {'count': int(sum(v.size for v in flat.values())),
                 'dtype': next(iter(flat.values())).dtype.name,
                 'sha256': card_lib.params_checksum(flat),
                 'checksum': 'vit_jax.serving.card.params_checksum'},
      'files': files, 'stablehlo': stablehlo,
      'loading': loading_calls(name, tuple(
          k for k in ('timm', 'hf') if k in files)),
      'created': datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec='seconds'),
      'versions': {'jax': jax.__version__},
  }


def _check_output(output: pathlib.Path) -> None:
  """The folder may be new, empty, or an earlier export (then replaced)."""
  if not output.exists():
    return
  if not output.is_dir():
    raise ValueError(f'--output={output} is a file; an export is a folder.')
  entries = sorted(p.name for p in output.iterdir())
  cards = [e for e in entries if e.endswith(card_lib.CARD_SUFFIX)]
  if entries and len(cards) != 1:
    raise ValueError(
        f'--output={output} exists and is not an export folder (it holds '
        f'{", ".join(entries[:5])}{" ..." if len(entries) > 5 else ""}); '
        'choose a new or empty folder, or an earlier export to replace.')


def write_export(source: base.Source, output: str | os.PathLike, name: str, *,
                 formats: tuple[str, ...] = DEFAULT_FORMATS, bfloat16: bool = False,
                 platforms: tuple[str, ...] = ('cpu', 'cuda')
                 ) -> pathlib.Path:
  """Writes the export folder `output` (module docstring); returns its card."""
  check_request(name, formats, platforms)
  check_expressible(source, formats)
  output = pathlib.Path(output).absolute()
  _check_output(output)
  if 'stablehlo' in formats:
    formats = (*formats, 'safetensors')  # The StableHLO takes its weights.
  dtype = ml_dtypes.bfloat16 if bfloat16 else np.float32
  flat = {k: np.ascontiguousarray(v, dtype)
          for k, v in base.original_flat(source.params).items()}
  arrays.check_values(flat, f'{source.origin["path"]}')
  output.parent.mkdir(parents=True, exist_ok=True)
  # One writer per export folder: a second export into it at the same time
  # would report success for a folder that then holds the first one's model.
  with lock.WorkdirLock(output, output.parent / f'.{output.name}.lock',
                        other='--output', transient=True):
    return _write_locked(source, output, name, formats, bfloat16, platforms,
                         flat, dtype)


def _write_locked(source: base.Source, output: pathlib.Path, name: str,
                  formats: tuple[str, ...], bfloat16: bool,
                  platforms: tuple[str, ...], flat: dict[str, np.ndarray],
                  dtype) -> pathlib.Path:
  _recover(output)
  partial = pathlib.Path(tempfile.mkdtemp(
      prefix=f'.{output.name}.partial-{os.getpid()}-', dir=output.parent))
  try:
    written = {}
    if 'npz' in formats:
      written['npz'] = f'{name}.npz'
      checkpoint.save_npz(partial / written['npz'], source.params,
                          bfloat16=bfloat16)
    if 'safetensors' in formats:
      written['safetensors'] = f'{name}.safetensors'
      safetensors.numpy.save_file(flat, partial / written['safetensors'],
                                  {'card': f'{name}{card_lib.CARD_SUFFIX}'})
    stablehlo = None
    if 'stablehlo' in formats:
      written['stablehlo'] = f'{name}.stablehlo'
      blob, stablehlo = _stablehlo(source.model, flat, source.image_size,
                                   source.preprocessing, platforms)
      (partial / written['stablehlo']).write_bytes(blob)
    written.update(_write_pytorch_formats(source, name, partial, formats,
                                          dtype))
    files = {kind: {'path': path, 'bytes': (partial / path).stat().st_size,
                    'sha256': card_lib.file_sha256(partial / path)}
             for kind, path in written.items()}
    card_path = partial / f'{name}{card_lib.CARD_SUFFIX}'
    card_path.write_text(dumps(make_card(source, name, flat, files,
                                         stablehlo)) + '\n')
    for path in partial.rglob('*'):  # durable before it becomes visible
      if path.is_file():
        with open(path, 'rb') as f:
          os.fsync(f.fileno())
        os.chmod(path, 0o644)  # some writers (safetensors) leave 0600
      else:
        os.chmod(path, 0o755)
    os.chmod(partial, 0o755)
    _swap_into_place(partial, output)
  finally:
    shutil.rmtree(partial, ignore_errors=True)
  return output / card_path.name


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _recover(output: pathlib.Path) -> None:
  """Clears what a killed export left beside `output`.

  A partial folder of an export that is no longer running goes; an earlier
  export set aside just before a kill comes back if `output` is missing.
  """
  for partial in output.parent.glob(f'.{output.name}.partial-*'):
    pid = partial.name.rsplit('.partial-', 1)[1].split('-')[0]
    if pid.isdigit() and not _pid_alive(int(pid)):
      shutil.rmtree(partial, ignore_errors=True)
  for old in sorted(output.parent.glob(f'.{output.name}.old-*')):
    if not os.path.lexists(output):
      os.rename(old, output)
    else:
      _remove(old)


def _remove(path: pathlib.Path) -> None:
  """Deletes a folder we set aside, or the link that stood in its place (a
  link is removed, never followed)."""
  if path.is_symlink():
    path.unlink(missing_ok=True)
  else:
    shutil.rmtree(path, ignore_errors=True)


def _swap_into_place(partial: pathlib.Path, output: pathlib.Path) -> None:
  """Renames `partial` to `output`; an earlier export there goes only after."""
  if not os.path.lexists(output):
    os.rename(partial, output)
    return
  old = pathlib.Path(tempfile.mkdtemp(prefix=f'.{output.name}.old-',
                                      dir=output.parent))
  os.rmdir(old)
  os.rename(output, old)
  try:
    os.rename(partial, output)
  except BaseException:
    os.rename(old, output)
    raise
  _remove(old)


def from_export(path: str | os.PathLike) -> base.Source:
  """An export back as a Source (model code), from its safetensors or npz."""
  card_path, card = card_lib.read_card(path)
  if card['files'].get('safetensors'):
    flat = card_lib.read_safetensors(card_path, card)
    params = arrays.unflatten(layout.to_linen_layout(flat))
  else:
    npz = card_lib.export_file(card_path, card, 'npz')
    params = base.inference_params(checkpoint.load_npz(npz))
    flat = {k: np.asarray(v, card['params']['dtype'])
            for k, v in base.original_flat(params).items()}
    card_lib.verify_params(flat, card, npz)
  try:
    model = models.create_model(card['model']['name'], card['num_classes'],
                             **models.options_from_json(card['model']['options']))
  except (TypeError, ValueError) as e:
    raise card_lib.CardError(f'Export card {card_path}: model '
                             f'{card["model"]["name"]!r} with its options '
                             f'cannot be built: {e}') from e
  image_size = tuple(card['image_size'])
  base.check_shapes(model, params, image_size, str(card_path),
                    f'the model its card describes at '
                    f'{image_size[0]}x{image_size[1]}')
  return base.Source(model=model, model_name=card['model']['name'],
                     params=params, image_size=image_size,
                     label_names=card['label_names'],
                     preprocessing=images.Preprocessing.from_json(
                         card['preprocessing']), step=card['step'],
                     origin={'kind': 'export', 'path': str(card_path)})
