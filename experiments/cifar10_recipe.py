"""The sweep behind configs/pretrain.py's CIFAR-10 recipes (cifar10_quick, cifar10).

  python experiments/cifar10_recipe.py --out=/tmp/recipe [--variants=quick/base,quick/crop35] [--smoke]

Each variant is the named config plus a few `--config.` overrides, trained
from scratch on real CIFAR-10 at 32px and evaluated on the 10,000 test images.
The variants are listed in the order they were tried (one knob at a time from
the config of the day, then the winners combined); the configs' docstrings
and experiments/README.md quote the results. Finished runs are reused.
"""
import argparse
import pathlib

from experiment_runs import print_table
from experiment_runs import run

_CONFIGS = {'quick': 'configs/pretrain.py:cifar10_quick',
            'full': 'configs/pretrain.py:cifar10'}
# 'config/name': overrides of that config. The quick variants name every
# knob they moved from the 2026-12-04 recipe (crop_min_area 0.05, lr 1e-3,
# batch 128 x 600 steps), so they mean the same whatever the config is today.
_OLD_QUICK = {'crop_min_area': 0.05}
VARIANTS = {
    'quick/base': _OLD_QUICK,
    'quick/crop35': {'crop_min_area': 0.35},
    'quick/lr3e-3': {**_OLD_QUICK, 'optimizer.learning_rate': 3e-3},
    'quick/batch64': {**_OLD_QUICK, 'batch_size': 64, 'total_steps': 1200},
    'quick/crop35_batch64': {'crop_min_area': 0.35, 'batch_size': 64,
                             'total_steps': 1200},
    'quick/crop60': {'crop_min_area': 0.6},  # = cifar10_quick since 2026-12-05
    # cifar10: the quick ViT (4x128) for 7500 steps, crop_min_area 0.35,
    # instead of 6x192 for 3000 steps at 0.25 (54.9 %, 2026-11-21).
    'full/base': {},
}


def row(name: str, m: dict) -> str:
  overrides = ', '.join(f'{k}={v}' for k, v in VARIANTS[name].items()) or '-'
  return (f'| {name} | {overrides} | {100 * m["eval_accuracy"]:.1f} | '
          f'{m["step"]} | {m["minutes"]:.1f} |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--smoke', action='store_true')
  flags = parser.parse_args()
  names = flags.variants.split(',')
  unknown = sorted(set(names) - set(VARIANTS))
  if unknown:
    parser.error(f'unknown variants {unknown}; known: {", ".join(VARIANTS)}')
  rows = []
  for name in names:
    config = _CONFIGS[name.split('/')[0]]
    metrics = run(name.replace('/', '_'), config, flags.out.resolve(),
                  flags.smoke, **VARIANTS[name])
    rows.append(row(name, metrics))
  print_table(['variant', 'overrides', 'test top-1 %', 'steps', 'minutes'],
              rows)


if __name__ == '__main__':
  main()
