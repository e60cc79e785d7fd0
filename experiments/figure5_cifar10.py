"""A small Figure 5 of the paper: ViT vs hybrid vs BiT ResNet per unit of
training compute, trained from scratch on real CIFAR-10.

  python experiments/figure5_cifar10.py --out=/tmp/figure5 [--smoke]

Two sizes of each family, one recipe (configs/pretrain.py's CIFAR-10 recipe:
AdamW 1e-3, wd 0.05, 5 % warmup, cosine, label smoothing 0.1, inception
crop, batch 128) and the same number of steps (600, 1.5 epochs) at 32px. The
ViTs and hybrids see 64 tokens (patch 4; a one-unit ResNet stem of stride 4
with patch 1); the ResNets are BiT ResNet-v2 with 1 and 2 units per stage.
Training compute = XLA's cost analysis of the compiled train step (FLOPs,
this CPU) x steps. y: test top-1 (10,000 images) and 10-shot linear
accuracy on the frozen features (`config.fewshot`). Writes figure5.png and
figure5.json into --out and prints the markdown table for
experiments/README.md. Finished runs are reused.
"""
import argparse
import json
import pathlib
import sys

from experiment_runs import REPO
from experiment_runs import print_table
from experiment_runs import run

STEPS = 600
_VIT = 'configs/pretrain.py:cifar10_quick'  # width 128, 4 layers, patch 4
_BIT = 'configs/pretrain.py:cifar10_bit'
_WIDER = {'model.hidden_size': 192, 'model.num_layers': 6,
          'model.mlp_dim': 384, 'model.num_heads': 3}  # configs' cifar10 ViT
_HYBRID = {'model_name': 'R26+ViT-S_32', 'model.resnet_layers': (1,),
           'model.patch_size': 1}
# (label, family, config, overrides)
RUNS = [
    ('ViT 4x128', 'ViT', _VIT, {}),
    ('ViT 6x192', 'ViT', _VIT, _WIDER),
    ('R1+ViT 4x128', 'hybrid', _VIT, _HYBRID),
    ('R1+ViT 6x192', 'hybrid', _VIT, {**_HYBRID, **_WIDER}),
    ('BiT-R14x1', 'ResNet', _BIT, {'model.resnet_layers': (1, 1, 1, 1)}),
    ('BiT-R26x1', 'ResNet', _BIT, {'model.resnet_layers': (2, 2, 2, 2)}),
]
# The recipe of these runs (crop_min_area 0.05: the configs' CIFAR-10 recipe
# on 2026-12-04, before cifar10_quick moved to 0.6).
COMMON = {'total_steps': STEPS, 'eval_batch_size': 400, 'crop_min_area': 0.05,
          'fewshot.datasets': 'cifar10', 'fewshot.shots': '10'}
FEWSHOT = 'eval_fewshot_cifar10_10shot'


def _config(config_arg: str, overrides: dict):
  """The config a run uses, built in this process (for its FLOPs)."""
  # pylint: disable=g-import-not-at-top
  import importlib
  from vit_jax.training import config as config_lib
  if str(REPO) not in sys.path:  # configs/ is a package of the repository
    sys.path.insert(0, str(REPO))
  path, arg = config_arg.split(':')
  module = importlib.import_module(path.removesuffix('.py').replace('/', '.'))
  return config_lib.with_overrides(module.get_config(arg), overrides)


def measure(config) -> tuple[float, int]:
  """(FLOPs of one train step, from XLA's cost analysis of the compiled step
  on one device: the whole step; parameters)."""
  # pylint: disable=g-import-not-at-top
  from vit_jax import models
  from vit_jax.planning import plan
  from vit_jax.training import programs
  from vit_jax.training import setup as setup_lib
  setup = setup_lib.create_setup(config, plan.dataset_info(config, None))
  abstract, shardings = programs.abstract_train_state(setup)
  compiled = programs.train_step(setup, shardings).lower(
      abstract, programs.abstract_train_batch(setup)).compile()
  return (float(compiled.cost_analysis()['flops']),
          models.count_params(setup.model, setup.image_size))


def plot(results: list[dict], path: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
  styles = {'ViT': ('tab:blue', 'o'), 'hybrid': ('tab:orange', 's'),
            'ResNet': ('tab:green', '^')}
  for ax, key, title in ((axes[0], 'top1', 'CIFAR-10 test top-1 (%)'),
                         (axes[1], 'fewshot10', '10-shot linear (%)')):
    for family, (color, marker) in styles.items():
      points = sorted((r['compute_tflops'], r[key], r['label'])
                      for r in results if r['family'] == family)
      ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker,
              color=color, label=family)
      for x, y, label in points:
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3),
                    textcoords='offset points')
    ax.set_xscale('log')
    ax.set_xlabel(f'training compute (TFLOPs, {STEPS} steps)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].legend()
  fig.savefig(path, dpi=120)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--out', type=pathlib.Path, required=True)
  parser.add_argument('--smoke', action='store_true')
  flags = parser.parse_args()
  out = flags.out.resolve()
  results = []
  # A smoke run scores the few-shot maps on a slice too.
  common = {**COMMON, **({'fewshot.test_split': 'test[:400]'}
                         if flags.smoke else {})}
  for label, family, config_arg, overrides in RUNS:
    name = label.replace(' ', '_').replace('+', '')
    metrics = run(name, config_arg, out, flags.smoke,
                  **{**common, **overrides})
    step_flops, params = measure(_config(config_arg, {**common, **overrides}))
    results.append({
        'label': label, 'family': family, 'params': params,
        'compute_tflops': step_flops * metrics['step'] / 1e12,
        'steps': metrics['step'],
        'top1': 100 * metrics['eval_accuracy'],
        'fewshot10': 100 * metrics[FEWSHOT], 'minutes': metrics['minutes'],
        'command': metrics['command']})
  (out / 'figure5.json').write_text(json.dumps(results, indent=1) + '\n')
  plot(results, out / 'figure5.png')
  print_table(['model', 'family', 'params', 'train TFLOPs', 'test top-1 %',
               '10-shot %', 'minutes', 'command'],
              [f'| {r["label"]} | {r["family"]} | {r["params"]:,} | '
               f'{r["compute_tflops"]:.2f} | {r["top1"]:.1f} | '
               f'{r["fewshot10"]:.1f} | {r["minutes"]:.1f} | `{r["command"]}` |'
               for r in results], note=f'; plot: {out / "figure5.png"}')


if __name__ == '__main__':
  main()
