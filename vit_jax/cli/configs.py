"""Flags of the programs that take an ml_collections config (train, plan).

`parse_flags` is their flags parser: a missing config file, a config file
that fails, a misspelt or mistyped `--config.<field>` is one `error:` line
with exit status 2 (a close match offered), and config files may import
their siblings (`from configs import common`) from any working directory.
"""
import os
import re
import sys
import traceback

from absl import flags
import ml_collections

from vit_jax import cli
from vit_jax.base import errors


def _config_file_error(text: str) -> str:
  """The config file's own exception and line, without the traceback."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  frames = [line.split(', in ')[0] for line in lines
            if line.startswith('File "') and 'site-packages' not in line
            and '/vit_jax/' not in line]
  return lines[-1] + (f' ({frames[-1]})' if frames else '')


def _override_error(argv: list[str], error: Exception) -> str:
  """One line for a bad `--config.<field>=<value>`: unknown field, wrong type."""
  bad_value = re.match(r'flag --config\.([\w.]+)=(.*?): ', str(error))
  files = [a.split('=', 1)[1] for a in argv if a.startswith('--config=')]
  try:  # the config file without overrides (parsing failed on those)
    config = flags.FLAGS['config'].parser.parse(files[-1])
  except Exception:  # pylint: disable=broad-except
    return _config_file_error(str(error))
  for arg in argv[1:]:
    if not arg.startswith('--config.'):
      continue
    path, _, value = arg[len('--config.'):].partition('=')
    node, parts = config, path.split('.')
    for depth, part in enumerate(parts):
      where = '.'.join(['config', *parts[:depth]])
      if not isinstance(node, ml_collections.ConfigDict):
        return f'--config.{path}: {where} is a single value, not a group.'
      if part not in node:
        return (f'--config.{path}: {where} has no field {part!r}.'
                f'{errors.did_you_mean(part, list(node))} '
                f'Its fields: {", ".join(sorted(node))}.')
      if (bad_value and bad_value.group(1) == path
          and bad_value.group(2) == value and depth == len(parts) - 1):
        wanted = node.get_type(part)
        if wanted is ml_collections.ConfigDict:
          return (f'--config.{path}={value}: {where}.{part} is a group of '
                  f'fields ({", ".join(sorted(node[part]))}); set one with '
                  f'--config.{path}.<field>=...' +
                  ('; the model itself is --config.model_name.'
                   if path == 'model' else '.'))
        return (f'--config.{path}={value}: {where}.{part} takes a '
                f'value of type {wanted.__name__}; {value!r} is not one.')
      node = node[part]
  return str(error)


def _missing_config_file(argv: list[str]) -> str | None:
  # ml_collections would report this only at the config's first use.
  for arg in argv:
    path = arg.split('=', 1)[1].split(':')[0] if arg.startswith(
        '--config=') else None
    if path and not os.path.isfile(path):
      folder = os.path.dirname(path) or '.'
      names = os.listdir(folder) if os.path.isdir(folder) else []
      close = errors.close_matches(os.path.basename(path), names)
      hint = f' Did you mean {os.path.join(folder, close[0])}?' if close else ''
      return f'{arg}: no such file {path!r} (from {os.getcwd()}).{hint}'
  return None


def _importable_configs(argv: list[str]) -> None:
  """Config files import their siblings as `configs.common`: the folder above
  a config package goes on sys.path, whichever directory the program (or a
  console script) runs from."""
  for arg in argv:
    if arg.startswith('--config='):
      folder = os.path.dirname(os.path.abspath(arg.split('=', 1)[1]
                                               .split(':')[0]))
      if os.path.isfile(os.path.join(folder, '__init__.py')):
        sys.path.insert(0, os.path.dirname(folder))


def parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_flags, also for a bad config file or override (one line)."""
  missing = _missing_config_file(argv)
  if missing:
    cli.usage_error(missing)
  _importable_configs(argv)
  try:
    return cli.parse_flags(argv, lambda e: _override_error(argv, e))
  except Exception:  # pylint: disable=broad-except  (the config file's own)
    cli.usage_error(_config_file_error(traceback.format_exc()))
