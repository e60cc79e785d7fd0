"""Pretrain at 32px, fine-tune at higher resolution: the paper's protocol on CIFAR-10.

  python experiments/finetune_cifar10.py --out=/tmp/ft_exp [--experiments=resolution,posemb,probe]

1. resolution: configs/pretrain.py:cifar10 at 32px, then fine-tuned at 48px
   and 64px with the bilinearly interpolated position embedding.
2. posemb: at 48px, bilinear (aligned corners) vs bicubic (antialiased) vs a
   freshly initialised position embedding, same steps.
3. probe: linear probe (all frozen but the head) vs full fine-tune, 48px.

Every run is a `python -m vit_jax.main` command (printed, and listed in the
table); finished runs are reused, so the script can be stopped and rerun.
Prints markdown rows for experiments/README.md. `--smoke` shrinks every run
to a few steps to check the script itself.
"""
import argparse
import pathlib

from experiment_runs import print_table
from experiment_runs import run

FINETUNE = 'configs/finetune.py:cifar10,pretrain:cifar10'
# Fine-tuning budget per run: 300 steps of 64 images (~0.4 epochs).
FT_ARGS = {'batch_size': 64, 'eval_batch_size': 400, 'total_steps': 300,
           'schedule.warmup_steps': 30, 'optimizer.learning_rate': 0.01,
           'checkpoint_every': 300, 'log_every': 50}


def finetune(name: str, out: pathlib.Path, smoke: bool, size: int,
             **overrides) -> dict:
  return run(name, FINETUNE, out, smoke, image_size=size,
             **{'pretrained.path': str(out / 'pretrain'), **FT_ARGS,
                **overrides})


def row(label: str, m: dict) -> str:
  return (f'| {label} | {100 * m["eval_accuracy"]:.1f} | {m["step"]} | '
          f'{m["minutes"]:.1f} | `{m["command"]}` |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--experiments', default='resolution,posemb,probe')
  parser.add_argument('--smoke', action='store_true')
  flags = parser.parse_args()
  chosen = set(flags.experiments.split(','))
  out, smoke = flags.out.resolve(), flags.smoke
  pre = run('pretrain', 'configs/pretrain.py:cifar10', out, smoke)
  rows = [row('pretrained at 32px (no fine-tuning)', pre)]
  if chosen & {'resolution', 'posemb', 'probe'}:
    bilinear48 = finetune('ft48_bilinear', out, smoke, 48)
  if 'resolution' in chosen:
    rows.append(row('fine-tuned at 48px, bilinear', bilinear48))
    rows.append(row('fine-tuned at 64px, bilinear',
                    finetune('ft64_bilinear', out, smoke, 64)))
  if 'posemb' in chosen:
    for method in ('bicubic', 'reinit'):
      rows.append(row(f'48px, position embedding {method}',
                      finetune(f'ft48_{method}', out, smoke, 48,
                               **{'pretrained.posemb_method': method})))
  if 'probe' in chosen:
    rows.append(row('48px, linear probe (all but the head frozen)',
                    finetune('ft48_probe', out, smoke, 48,
                             **{'optimizer.freeze': '^(?!head/)'})))
  print_table(['run', 'test top-1 %', 'steps', 'minutes', 'command'], rows)


if __name__ == '__main__':
  main()
