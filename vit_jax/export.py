"""Exports a model as one folder of files that run without this repository.

    python -m vit_jax.export --model=MODEL --output=DIR [--name=NAME]
        [--formats=npz,safetensors,stablehlo] [--bfloat16]
        [--platforms=cpu,cuda] [--image_size=H[,W]] [--labels=FILE]

MODEL is a training workdir (newest checkpoint, or --step=N), an .npz with
--model_name=ViT-B_16 (depth, widths, heads, patch size and classes are read
from the arrays; resolution from the position embedding unless
--image_size), or an earlier export. DIR becomes the export folder, complete
or absent (`vit_jax.sources.export`): `<name>.npz` (Google's original
layout, which their code and timm read), `<name>.safetensors`,
`<name>.stablehlo` (logits = f(params, pixels), `vit_jax.serving`) and
`<name>.card.json`, which lists every file with its SHA-256. An earlier
export in DIR is replaced only once the new one is complete. Default name:
the workdir's name and step, or the source file's stem. --bfloat16 stores
bfloat16 weights (computation stays float32, with the rounded weights).
TensorFlow is never imported.
"""
import json
import pathlib

from absl import flags

from vit_jax import cli

cli.define_model_flags()
cli.define_image_size_flag()
cli.define_labels_flag()
flags.adopt_module_key_flags(cli)  # the shared flags in --help
cli.define_output_flag('The export folder to write (created, or an earlier '
                       'export there replaced).')
_NAME = flags.DEFINE_string('name', None,
                            'File name stem (default: from the source).')
_FORMATS = flags.DEFINE_list(
    'formats', ['npz', 'safetensors', 'stablehlo'],  # export.DEFAULT_FORMATS
    'Formats to write, of npz, safetensors, stablehlo, timm, hf (the last '
    'two: folders that timm / transformers load).')
_BFLOAT16 = flags.DEFINE_bool('bfloat16', False, 'Store bfloat16 weights.')
_PLATFORMS = flags.DEFINE_list('platforms', ['cpu', 'cuda'],
                               'StableHLO lowering platforms.')


def _default_name(source) -> str:
  path = pathlib.Path(source.origin['path'])
  if source.origin['kind'] == 'workdir':
    return f'{path.resolve().name}_step{source.step}'
  return path.name.removesuffix('.card.json') if path.name.endswith(
      '.card.json') else path.stem


def _size(path: pathlib.Path) -> str:
  kib = path.stat().st_size / 1024
  return f'{kib / 1024:7.1f} MiB' if kib >= 1024 else f'{kib:7.1f} KiB'


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.require('model', 'output')
  from vit_jax.runs import lock  # pylint: disable=g-import-not-at-top
  from vit_jax.sources import export  # pylint: disable=g-import-not-at-top
  try:
    export.check_request(_NAME.value or 'name', tuple(_FORMATS.value),
                         tuple(_PLATFORMS.value))
  except ValueError as e:
    raise cli.UsageError(str(e)) from None
  source = cli.load_classifier_source()
  name = _NAME.value or _default_name(source)
  try:
    card_path = export.write_export(
        source, _output(), name, formats=tuple(_FORMATS.value),
        bfloat16=_BFLOAT16.value, platforms=tuple(_PLATFORMS.value))
  except (ValueError, lock.WorkdirBusyError) as e:  # the folder, the name
    raise cli.UsageError(str(e)) from None
  except OSError as e:  # a full disk, permissions: nothing was replaced
    cli.fail(f'cannot write the export {_output()}: '
             f'{e.strerror or e}; nothing was changed there.')
  card = json.loads(card_path.read_text())
  print(f'{card["model"]["name"]} ({card["num_classes"]} classes, '
        f'{"x".join(map(str, card["image_size"]))}, step {card["step"]}) '
        f'from {card["source"]["path"]}:')
  listed = [card_path.parent / e['path'] for e in card['files'].values()]
  listed.append(card_path)
  width = max(len(str(p)) for p in listed)
  for path in listed:
    print(f'  {str(path):<{width}}  {_size(path)}')
  params = card['params']
  print(f'  {params["count"]:,} params, {params["dtype"]}, sha256 '
        f'{params["sha256"]}')


def _output() -> pathlib.Path:
  return pathlib.Path(flags.FLAGS.output)


def run() -> None:
  """The `vit-export` console script."""
  cli.run(main)


if __name__ == '__main__':
  run()
