"""ViT-B/16, L/16 and H/14 planned on TPU slices: the table of experiments/README.md.

    python experiments/plan_slices.py --out=/tmp/plans [--only=B_16]

Each row is one `vit_jax.plan` of configs/paper.py (pretraining at 224 with
batch 4096, fine-tuning at 384 and 512 with batch 512) with the row's topology,
sharding and rematerialisation, layers unrolled (as the configs choose; one
row shows scanned layers). A row's JSON is kept in --out and reused, so the
script can be stopped and run again; the markdown table goes to stdout.
About 70 s of compiling a row on the 2-core development CPU.
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
from vit_jax.base import files  # noqa: E402
from vit_jax.planning import plan as plan_lib  # noqa: E402

MODELS = ('B_16', 'L_16', 'H_14')
# (setup, topology, models, [(fsdp, remat, scan), ...])
GRID = [
    ('pretrain', 'v3:8x8', MODELS, [(1, 'none', False), (1, 'full', False),
                                    (8, 'none', False)]),
    ('finetune384', 'v3:2x2', MODELS, [(1, 'none', False),
                                       (1, 'full', False)]),
    ('finetune512', 'v3:2x2', MODELS, [(1, 'full', False)]),
    ('finetune512', 'v3:2x2', ('H_14',), [(8, 'full', False)]),
    ('pretrain', 'v4:4x4x4', ('B_16',), [(1, 'none', False)]),
    ('pretrain', 'v5p:4x4x4', ('B_16',), [(1, 'none', False)]),
    ('pretrain', 'v3:8x8', ('B_16',), [(1, 'none', True)]),
]
NUM_CLASSES = {'pretrain': 21843, 'finetune384': 1000, 'finetune512': 1000}


def rows(only: str | None):
  for setup, topology, names, variants in GRID:
    for model in names:
      for variant in variants:
        yield setup, topology, model, variant


def plan_row(out: pathlib.Path, setup: str, topology: str, model: str,
             variant) -> dict:
  fsdp, remat, scan = variant
  name = (f'{setup}_{model}_{topology.replace(":", "_")}_fsdp{fsdp}_{remat}'
          f'{"_scan" if scan else ""}.json')
  path = out / name
  if path.exists():
    return json.loads(path.read_text())
  config = paper.get_config(f'{setup},{model}')
  config.mesh.fsdp = fsdp
  config.model.remat_policy = remat
  config.model.scan_layers = scan
  start = time.time()
  result = plan_lib.make_plan(config, topology,
                              num_classes=NUM_CLASSES[setup], suggest=False)
  result['wall_s'] = time.time() - start
  result['command'] = (
      f'python -m vit_jax.plan --config=configs/paper.py:{setup},{model} '
      f'--topology={topology} --num_classes={NUM_CLASSES[setup]} '
      f'--config.mesh.fsdp={fsdp} --config.model.remat_policy={remat} '
      f'--config.model.scan_layers={scan} --nosuggest')
  files.write_json(path, result)
  return result


def table_row(setup, topology, model, variant, r) -> str:
  fsdp, remat, scan = variant
  memory = r['memory_gib']
  collectives = r['collectives'] or {}
  mib = sum(v['bytes_per_device'] for v in collectives.values()) / 2**20
  chip = r.get('images_per_s_per_chip_bound')
  mfu = r.get('mfu_at_bound')
  return (f'| ViT-{model} | {setup} {r["image_size"][0]} | {topology} | '
          f'{"FSDP " + str(fsdp) if fsdp > 1 else "DP"} | {remat}'
          f'{" (scan)" if scan else ""} | '
          f'{"yes" if r["fits"] else "no"} | {memory["total"]:.1f} | '
          f'{memory["temporaries"]:.1f} | '
          f'{f"{chip:,.0f}" if chip else "-"} | '
          f'{f"{mfu:.0%}" if mfu else "-"} | '
          f'{f"{mib:,.0f}" if collectives else "-"} | {r["compile_s"]:.0f} |')


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='/tmp/plans')
  parser.add_argument('--only', default=None, help='one model, e.g. B_16')
  args = parser.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lines = ['| model | setup, px | slice | sharding | remat | fits | GiB per '
           'device | of which temporaries | bound images/s per chip | MFU at '
           'bound | collective MiB per device per step | compile s |',
           '|---|---|---|---|---|---|---|---|---|---|---|---|']
  for setup, topology, model, variant in rows(args.only):
    if args.only and model != args.only:
      continue
    result = plan_row(out, setup, topology, model, variant)
    lines.append(table_row(setup, topology, model, variant, result))
    print(lines[-1], file=sys.stderr, flush=True)
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
