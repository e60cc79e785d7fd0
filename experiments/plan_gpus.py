"""ViT-B/16, L/16 and H/14 planned on H100 hosts: experiments/README.md's table.

    pip install -e ".[cuda]"
    python experiments/plan_gpus.py --out=/tmp/gpu_plans [--only=B_16]

Each row is one `vit_jax.plan` of configs/paper.py's setups (pretraining at
224 with batch 4096, fine-tuning at 384 with batch 512) on one host of 8
H100s (h100:8) or four (h100:4x8), with the row's sharding,
rematerialisation, gradient accumulation and attention. A row's JSON is kept
in --out and reused, so the script can be stopped and run again; the
markdown table goes to stdout. 0.5-3 min of compiling a row on the 2-core
development CPU.
"""
import argparse
import json
import os
import pathlib
import sys
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from configs import paper  # noqa: E402
from experiment_runs import print_table  # noqa: E402
from vit_jax.base import files  # noqa: E402
from vit_jax.planning import plan as plan_lib  # noqa: E402

MODELS = ('B_16', 'L_16', 'H_14')
# (setup, topology, model, [(fsdp, remat, accum_steps, attention), ...])
GRID = [
    ('pretrain', 'h100:8', 'B_16', [(8, 'none', 1, 'xla'),
                                    (8, 'none', 1, 'cudnn'),
                                    (1, 'none', 1, 'cudnn')]),
    ('pretrain', 'h100:8', 'L_16', [(8, 'none', 1, 'cudnn'),
                                    (8, 'full', 1, 'cudnn'),
                                    (8, 'none', 2, 'cudnn')]),
    ('pretrain', 'h100:8', 'H_14', [(8, 'full', 1, 'cudnn'),
                                    (8, 'none', 4, 'cudnn'),
                                    (8, 'none', 8, 'cudnn')]),
    ('pretrain', 'h100:4x8', 'B_16', [(8, 'none', 1, 'cudnn'),
                                      (1, 'none', 1, 'cudnn')]),
    ('pretrain', 'h100:4x8', 'L_16', [(8, 'none', 1, 'cudnn')]),
    ('pretrain', 'h100:4x8', 'H_14', [(8, 'none', 1, 'cudnn'),
                                      (8, 'full', 1, 'cudnn')]),
    ('finetune384', 'h100:8', 'B_16', [(1, 'none', 1, 'cudnn')]),
    ('finetune384', 'h100:8', 'L_16', [(1, 'none', 1, 'cudnn')]),
    ('finetune384', 'h100:8', 'H_14', [(8, 'none', 1, 'cudnn'),
                                       (8, 'none', 2, 'cudnn')]),
    ('finetune384', 'h100:4x8', 'B_16', [(1, 'none', 1, 'cudnn')]),
    ('finetune384', 'h100:4x8', 'L_16', [(1, 'none', 1, 'cudnn')]),
    ('finetune384', 'h100:4x8', 'H_14', [(8, 'none', 1, 'cudnn')]),
]
NUM_CLASSES = {'pretrain': 21843, 'finetune384': 1000}


def plan_row(out: pathlib.Path, setup: str, topology: str, model: str,
             variant) -> dict:
  fsdp, remat, accum, attention = variant
  name = (f'{setup}_{model}_{topology.replace(":", "_")}_fsdp{fsdp}_{remat}'
          f'_accum{accum}_{attention}.json')
  path = out / name
  if path.exists():
    return json.loads(path.read_text())
  overrides = {'mesh.fsdp': fsdp, 'model.remat_policy': remat,
               'accum_steps': accum, 'model.attention_impl': attention}
  config = paper.get_config(f'{setup},{model}')
  config.update_from_flattened_dict(overrides)
  start = time.time()
  result = plan_lib.make_plan(config, topology,
                              num_classes=NUM_CLASSES[setup], suggest=False)
  result['wall_s'] = time.time() - start
  result['command'] = (
      f'python -m vit_jax.plan --config=configs/paper.py:{setup},{model} '
      f'--topology={topology} --num_classes={NUM_CLASSES[setup]} '
      + ' '.join(f'--config.{k}={v}' for k, v in overrides.items())
      + ' --nosuggest')
  files.write_json(path, result)
  return result


def table_row(setup, topology, model, variant, r) -> str:
  fsdp, remat, accum, attention = variant
  memory = r['memory_gib']
  roof = r['roofline']
  gpu = r['images_per_s_per_device_bound']
  return (f'| ViT-{model} | {setup} {r["image_size"][0]} | {topology} | '
          f'{r["per_device_batch"]:g} | '
          f'{"FSDP " + str(fsdp) if fsdp > 1 else "DP"} | {remat} | {accum} | '
          f'{attention} | {"yes" if r["fits"] else "no"} | '
          f'{memory["total"]:.1f} | {roof["compute_s"] * 1e3:.0f} | '
          f'{roof["memory_s"] * 1e3:.0f} | {gpu:,.0f} | '
          f'{r["mfu_at_bound"]:.0%} | '
          f'{r["host_input"]["cores_per_host"]} | {r["compile_s"]:.0f} |')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='/tmp/gpu_plans')
  parser.add_argument('--only', default=None,
                      help='models, comma-separated, e.g. B_16,L_16')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  only = args.only.split(',') if args.only else MODELS
  columns = ['model', 'setup, px', 'hosts', 'images per GPU', 'sharding',
             'remat', 'accum', 'attention', 'fits', 'GiB per GPU (of 59.3)',
             'compute ms', 'memory ms', 'bound images/s per GPU',
             'MFU at bound', 'host cores at bound', 'compile s']
  rows = []
  for setup, topology, model, variants in GRID:
    if model not in only:
      continue
    for variant in variants:
      result = plan_row(out, setup, topology, model, variant)
      rows.append(table_row(setup, topology, model, variant, result))
      print(rows[-1], file=sys.stderr, flush=True)
  print_table(columns, rows, ' (compiled without a GPU, jax 0.10.2)')


if __name__ == '__main__':
  main()
