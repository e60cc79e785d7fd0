"""Trains: python -m vit_jax.main --config=configs/X.py:args --workdir=DIR.

The config is locked: `--config.total_steps=100` overrides an existing field;
a misspelt field or a value of the wrong type is a usage error naming the
field, with a close match. Config files may import their siblings
(`from configs import common`) from any working directory. Exit status 0: done (or finished already); 2: a
usage error (bad flag, config value, workdir, a workdir in use by another
run, a resume with a changed config), one `error:` line before anything is
compiled; 75: preempted (SIGTERM), a checkpoint was written, run the same
command to resume; 1: any other error, explained in one `error:` line.
"""
import os
import re
import sys
import traceback

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from vit_jax import cli
from vit_jax.base import errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/pretrain.py:cifar10',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


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


def _parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_flags, also for a bad config file or override (one line)."""
  missing = _missing_config_file(argv)
  if missing:
    cli.usage_error(missing)
  _importable_configs(argv)
  try:
    return cli.parse_flags(argv, lambda e: _override_error(argv, e))
  except Exception:  # pylint: disable=broad-except  (the config file's own)
    cli.usage_error(_config_file_error(traceback.format_exc()))


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Imported here so that --help stays fast and flags parse before TF loads.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.parallel import distributed  # pylint: disable=g-import-not-at-top
  from vit_jax.runs import lock  # pylint: disable=g-import-not-at-top
  from vit_jax.runs import state_checkpoint  # pylint: disable=g-import-not-at-top
  from vit_jax.training import guards  # pylint: disable=g-import-not-at-top
  from vit_jax.training import setup  # pylint: disable=g-import-not-at-top
  from vit_jax.training import trainer  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  try:
    distributed.initialize(config.distributed)
  except (distributed.RendezvousError, ValueError) as e:
    cli.fail(str(e))
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s on %d process(es), %d %s device(s).', jax.__version__,
               jax.process_count(), jax.device_count(), jax.default_backend())
  try:
    trainer.train_and_evaluate(config, _WORKDIR.value)
  except guards.Preempted as e:
    logging.warning('%s', e)
    sys.exit(guards.PREEMPTED_EXIT_CODE)
  except (lock.WorkdirBusyError, setup.SetupError) as e:
    # Bad input (config values, workdir, resume changes): before any compile.
    logging.error('%s', e)
    cli.usage_error(str(e))
  except (guards.NonFiniteLossError, ValueError,
          state_checkpoint.CheckpointWriteError) as e:
    logging.error('%s', e)
    cli.fail(str(e))


def run() -> None:
  """The `vit-train` console script."""
  cli.run(main, flags_parser=_parse_flags)


if __name__ == '__main__':
  run()
