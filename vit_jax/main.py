"""Runs training: python -m vit_jax.main --config=configs/X.py:args --workdir=DIR.

The config is locked: `--config.total_steps=100` overrides an existing field,
a misspelt one or a value of the wrong type is a usage error (exit status 2)
naming the field, with a close match. Exit status 75 means "preempted
(SIGTERM), a checkpoint was written; run the same command to resume"; 1, an
error explained in one line starting "error: ".
"""
import difflib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags

from vit_jax import cli

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/pretrain.py:cifar10',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(dist) -> None:
  """jax.distributed when the config or the environment asks for it.

  Must run before anything touches a JAX backend. On CPU the processes talk
  through gloo collectives. When a process dies, JAX's coordination service
  aborts the others (after dist.heartbeat_timeout_s at most) with "another
  task died" rather than letting them hang in a collective.
  """
  if not (dist.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
          or dist.auto):
    return
  # CPU devices of different processes talk through gloo (no effect on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {'heartbeat_timeout_seconds': dist.heartbeat_timeout_s}
  if dist.coordinator_address:
    kwargs.update(coordinator_address=dist.coordinator_address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)


def _config_file_error(text: str) -> str:
  """The config file's own exception and line, without the traceback."""
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  frames = [line.split(', in ')[0] for line in lines
            if line.startswith('File "') and 'site-packages' not in line]
  return ' '.join([lines[0], *lines[1:][-1:]] +
                  ([f'({frames[-1]})'] if frames else []))


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
        close = difflib.get_close_matches(part, list(node), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ''
        return (f'--config.{path}: {where} has no field {part!r}.{hint} '
                f'Its fields: {", ".join(sorted(node))}.')
      if bad_value and bad_value.group(1) == path and depth == len(parts) - 1:
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
      close = difflib.get_close_matches(os.path.basename(path), names, n=1)
      hint = f' Did you mean {os.path.join(folder, close[0])}?' if close else ''
      return f'{arg}: no such file {path!r} (from {os.getcwd()}).{hint}'
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  """cli.parse_flags, also for a bad config file or override (one line)."""
  missing = _missing_config_file(argv)
  if missing:
    cli.usage_error(missing)
  try:
    return flags.FLAGS(argv)
  except (flags.Error, KeyError, AttributeError) as e:  # ml_collections: Key/Attr
    cli.usage_error(_override_error(argv, e))


class _QuietLibraries(logging.logging.Filter):
  """Orbax and TFDS: drops INFO chatter (dozens of lines per save), and cuts
  Orbax's error tracebacks to their first line, since StateCheckpointer
  re-raises those errors with the reason. asyncio's "Task exception was never
  retrieved" for Orbax's tasks, logged at exit after a failed save, only
  repeats that error: dropped."""

  def filter(self, record) -> bool:
    if record.name == 'asyncio' and 'orbax' in record.getMessage():
      return False
    if not any(lib in record.pathname for lib in
               ('/orbax/', '/tensorflow_datasets/')):
      return True
    if record.levelno < logging.logging.WARNING:
      return False
    record.msg = record.getMessage().splitlines()[0][:300]
    record.args, record.exc_info, record.exc_text = None, None, None
    return True


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that --helpfull stays fast and flags parse before TF loads.
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax import train_utils  # pylint: disable=g-import-not-at-top
  from vit_jax import state_checkpoint  # pylint: disable=g-import-not-at-top
  config = _CONFIG.value
  initialize_distributed(config.distributed)
  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)
  logging.info('JAX %s on %d process(es), %d %s device(s).', jax.__version__,
               jax.process_count(), jax.device_count(), jax.default_backend())
  try:
    result = train.train_and_evaluate(config, _WORKDIR.value)
  except train_utils.Preempted as e:
    logging.warning('%s', e)
    sys.exit(train_utils.PREEMPTED_EXIT_CODE)
  except (ValueError, train_utils.NonFiniteLossError,
          state_checkpoint.CheckpointWriteError) as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')
  logging.info('Done: %s', result)


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
