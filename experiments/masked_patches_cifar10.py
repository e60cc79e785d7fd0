"""Self-supervised masked patch prediction, then fine-tuning, against
training from scratch: the paper's section 4.6 on real CIFAR-10.

  python experiments/masked_patches_cifar10.py --out=/tmp/mpp [--steps=600] [--smoke]

1. mpp: configs/pretrain.py:cifar10_mpp (the quick ViT, 3-bit mean colour
   of 50 % corrupted patches, labels unused) for --steps steps; 10- and
   25-shot linear accuracy of its frozen features.
2. finetune: configs/pretrain.py:cifar10_quick from the mpp run's encoder
   (`pretrained.path`, head re-initialised) for --steps steps.
3. scratch: configs/pretrain.py:cifar10_quick for 2 x --steps steps: the same
   recipe and the same total number of steps as 1 + 2.

Every run evaluates on the 10,000 test images and reports few-shot accuracy
of its final features. Finished runs are reused. Prints the markdown table
of experiments/README.md.
"""
import argparse
import pathlib

from experiment_runs import print_table
from experiment_runs import run

FEWSHOT = {'fewshot.datasets': 'cifar10', 'fewshot.shots': '10,25'}


def row(label: str, m: dict) -> str:
  top1 = (f'{100 * m["eval_accuracy"]:.1f}' if 'eval_accuracy' in m
          else '-')
  mpp = (f'{m["eval_masked_patch_loss"]:.3f} / '
         f'{100 * m["eval_masked_patch_accuracy"]:.1f} %'
         if 'eval_masked_patch_loss' in m else '-')
  return (f'| {label} | {m["step"]} | {top1} | '
          f'{100 * m["eval_fewshot_cifar10_10shot"]:.1f} | '
          f'{100 * m["eval_fewshot_cifar10_25shot"]:.1f} | {mpp} | '
          f'{m["minutes"]:.1f} | `{m["command"]}` |')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--steps', type=int, default=600)
  parser.add_argument('--smoke', action='store_true')
  flags = parser.parse_args()
  out, smoke, steps = flags.out.resolve(), flags.smoke, flags.steps
  mpp = run('mpp', 'configs/pretrain.py:cifar10_mpp', out, smoke,
            total_steps=steps, **FEWSHOT)
  finetune = run('finetune', 'configs/pretrain.py:cifar10_quick', out, smoke,
                 total_steps=steps, **FEWSHOT,
                 **{'pretrained.path': str(out / 'mpp')})
  scratch = run('scratch', 'configs/pretrain.py:cifar10_quick', out, smoke,
                total_steps=2 * steps, **FEWSHOT)
  print_table(['run', 'steps', 'test top-1 %', '10-shot %', '25-shot %',
               'masked patch loss / accuracy', 'minutes', 'command'],
              [row('masked patch prediction (self-supervised)', mpp),
               row('  then fine-tuned (supervised)', finetune),
               row('from scratch (supervised), same total steps', scratch)])


if __name__ == '__main__':
  main()
