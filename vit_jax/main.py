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
import sys

from absl import flags
from absl import logging
from ml_collections import config_flags

from vit_jax import cli
from vit_jax.cli import configs

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/pretrain.py:cifar10',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  # Imported here so that --help stays fast and flags parse before TF loads.
  import jax  # pylint: disable=g-import-not-at-top
  from vit_jax.base import files  # pylint: disable=g-import-not-at-top
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
  except (lock.WorkdirBusyError, setup.SetupError,
          files.UnsafeFileError) as e:
    # Bad input (config values, workdir, resume changes): before any compile.
    logging.error('%s', e)
    cli.usage_error(str(e))
  except (guards.NonFiniteLossError, ValueError,
          state_checkpoint.CheckpointWriteError) as e:
    logging.error('%s', e)
    cli.fail(str(e))


def run() -> None:
  """The `vit-train` console script."""
  cli.run(main, flags_parser=configs.parse_flags)


if __name__ == '__main__':
  run()
