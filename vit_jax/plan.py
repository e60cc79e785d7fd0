"""Plans a training run on a TPU slice or GPU hosts, without them.

    python -m vit_jax.plan --config=configs/X.py:args --topology=v3:8x8
        [--mode=train|eval|infer] [--json=FILE] [--num_classes=N]
        [--config.<field>=<value> ...]

Builds what `python -m vit_jax.main` would build for the config (same model,
mesh rules, state shardings, optimizer and step), compiles it for the slice
with libtpu (`pip install "vit_jax[tpu]"`) or for the GPUs with the CUDA
plugin (`pip install "vit_jax[cuda]"`) and reports memory per device against
its HBM (fits / does not fit, with a change that does), FLOPs, a time bound
as images/s per device and MFU (TPU: the compiler's; GPU: a roofline), the
collectives, the custom calls (GPU), the host CPU cores the input pipeline
needs at the bound and the compile time (`vit_jax.planning`). The dataset is
not read: presets give its classes (else --num_classes). TPU topologies are
<generation>:<chips per dimension>: v2:2x2, v3:8x8, v4:4x4x4, v5e:16x16,
v5p:8x8x8, v6e:16x16, ...; GPU ones <gpu>:[<hosts>x]<GPUs per host>:
h100:8, h100:4x8, a100-40g:8, a100-80g:8, h200:8, b200:8, l4:1. Exit status 2
for a bad flag, config, topology or a missing libtpu / CUDA plugin, one
`error:` line.
"""
import os
import sys

# Planning compiles for the slice; this process itself needs no accelerator.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from vit_jax import cli  # noqa: E402
from vit_jax.cli import configs  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Experiment config file, e.g. configs/pretrain.py:cifar10',
    lock_config=True)
_TOPOLOGY = flags.DEFINE_string('topology', None, 'TPU slice or GPU hosts, '
                                'e.g. v3:8x8, h100:8, h100:4x8.')
_MODE = flags.DEFINE_enum('mode', 'train', ['train', 'eval', 'infer'],
                          'Which program to compile.')
_JSON = flags.DEFINE_string('json', None, 'Also write the plan here (JSON).')
_NUM_CLASSES = flags.DEFINE_integer(
    'num_classes', None, 'Classes of a dataset that is no preset.',
    lower_bound=1)
_SUGGEST = flags.DEFINE_bool('suggest', True, 'When it does not fit, compile '
                             'changes until one fits (at most 3).')
_UNROLLED_COST = flags.DEFINE_bool(
    'unrolled_cost', True, 'For a program with loops (scan_layers, '
    'accum_steps), also compile its unrolled twin for FLOPs and the time '
    'bound, which XLA counts once per loop body.')


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise cli.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  cli.require('config', 'topology')
  from vit_jax.base import files  # pylint: disable=g-import-not-at-top
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  from vit_jax.planning import report  # pylint: disable=g-import-not-at-top
  if _JSON.value:  # checked before the (minutes of) compiling
    folder = os.path.dirname(os.path.abspath(_JSON.value))
    if os.path.isdir(_JSON.value) or not os.path.isdir(folder):
      raise cli.UsageError(f'--json={_JSON.value}: name a file in an existing '
                           'folder (it is a directory, or its folder is '
                           'missing).')
  try:
    result = plan.make_plan(_CONFIG.value, _TOPOLOGY.value, mode=_MODE.value,
                            num_classes=_NUM_CLASSES.value,
                            suggest=_SUGGEST.value,
                            unrolled_cost=_UNROLLED_COST.value)
  except ValueError as e:  # topology, config, mesh: before compiling
    raise cli.UsageError(str(e)) from None
  print(report.report(result))
  if _JSON.value:
    files.write_json(_JSON.value, result)


def run() -> None:
  """The `vit-plan` console script."""
  cli.run(main, flags_parser=configs.parse_flags)


if __name__ == '__main__':
  run()
  sys.exit(0)
