"""Runs training: python -m vit_jax.main --config=configs/X.py:args --workdir=DIR.

The config is locked: `--config.total_steps=100` overrides an existing field,
a misspelt one is an error. Exit status 75 means "preempted (SIGTERM), a
checkpoint was written; run the same command to resume".
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/pretrain.py:cifar10',
    lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None,
                               'Directory for checkpoints, summaries and metrics.')
flags.mark_flags_as_required(['config', 'workdir'])


def initialize_distributed(dist) -> None:
  """jax.distributed when the config or the environment asks for it.

  Must run before anything touches a JAX backend. On CPU the processes talk
  through gloo collectives.
  """
  if not (dist.coordinator_address or os.environ.get('JAX_COORDINATOR_ADDRESS')
          or dist.auto):
    return
  # CPU devices of different processes talk through gloo (no effect on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if dist.coordinator_address:
    kwargs = dict(coordinator_address=dist.coordinator_address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)


class _QuietLibraries(logging.logging.Filter):
  """Drops the INFO chatter of Orbax and TFDS (dozens of lines per save)."""

  def filter(self, record) -> bool:
    return record.levelno >= logging.logging.WARNING or not any(
        lib in record.pathname for lib in ('/orbax/', '/tensorflow_datasets/'))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # Imported here so that --helpfull stays fast and flags parse before TF loads.
  from vit_jax import train  # pylint: disable=g-import-not-at-top
  from vit_jax import train_utils  # pylint: disable=g-import-not-at-top
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
  except (ValueError, train_utils.NonFiniteLossError) as e:
    logging.error('%s', e)
    sys.exit(f'error: {e}')
  logging.info('Done: %s', result)


if __name__ == '__main__':
  app.run(main)
