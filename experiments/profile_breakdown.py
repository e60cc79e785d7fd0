"""Where one profiled step's time goes, by kind of work, forward and backward.

    python experiments/benchmark.py --mode=train --rounds=2 --profile=/tmp/prof
    python experiments/profile_breakdown.py /tmp/prof/ViT-B_16_train

Reads the trace that `benchmark.py --profile` wrote for one case and the
compiled program it saved beside it (`hlo.txt`), and names every XLA thunk by
the model code it came from (the op_name metadata JAX attaches to each HLO
op). A thunk's time is split evenly among the thunks running at the same
moment, so the rows add up to the step's wall time even though XLA runs
independent thunks side by side. XLA:CPU also runs some matmuls (`dot`
thunks, the backward's weight gradients) in the background: their work is
counted in whatever thunk runs meanwhile, so this finds the ops but skews the
split between kinds; `matmul_chain.py` measures that split by subtraction.
Backward ops are those JAX emitted under `transpose(jvp(...))`. Prints a table by kind (dense matmuls, attention
matmuls, softmax, normalisation, ...) and the --top single ops.
"""
import argparse
import collections
import gzip
import json
import pathlib
import re
import sys

# `%name = f32[..]{..} opcode(...), ..., metadata={op_name="..." ...}`
_HLO_OP = re.compile(r'\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w\-]+)\('
                     r'.*?op_name="([^"]*)"')


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """HLO instruction name -> (result shape, opcode, op_name)."""
  ops = {}
  for line in hlo_text.splitlines():
    match = _HLO_OP.match(line)
    if match:
      ops.setdefault(match.group(1), match.group(2, 3, 4))
  return ops


def thunk_times(trace: dict) -> tuple[collections.Counter, float]:
  """(HLO op -> microseconds, its share of overlaps split evenly; wall us)."""
  edges = []
  for i, event in enumerate(trace['traceEvents']):
    op = event.get('args', {}).get('hlo_op')
    if event.get('ph') == 'X' and op and op == event['name']:
      edges += [(event['ts'], 1, i, op), (event['ts'] + event['dur'], 0, i, op)]
  if not edges:
    raise SystemExit('no XLA thunks in this trace: was it written by '
                     '`benchmark.py --profile` on this backend?')
  edges.sort()
  times, running, last = collections.Counter(), {}, edges[0][0]
  for time, starts, i, op in edges:
    for running_op in running.values():
      times[running_op] += (time - last) / len(running)
    last = time
    if starts:
      running[i] = op
    else:
      running.pop(i)
  return times, edges[-1][0] - edges[0][0]


def kind(opcode: str, op_name: str) -> str:
  """The kind of work an op does, from its opcode and model path."""
  last = op_name.rsplit('/', 1)[-1]
  if 'VisionTransformer' not in op_name:
    return 'outside the model (loss, optimizer, norms)'
  # A weight gradient's dot carries the op_name of the transpose it absorbed.
  if opcode == 'dot' or last == 'dot_general':
    # The attention core's einsums carry their subscripts in the path.
    return 'attention matmuls' if '/bhq' in op_name else 'dense matmuls'
  if last == 'conv_general_dilated':
    return 'convolutions (patch embedding, ResNet)'
  if 'transpose' in last:
    return 'layout copies (transposes)'
  if 'LayerNorm' in op_name or 'GroupNorm' in op_name:
    return 'normalisation'
  if 'MultiHeadDotProductAttention' in op_name:
    return 'softmax and other attention ops'
  if 'MlpBlock' in op_name:
    return 'GELU, biases (MLP elementwise)'
  return 'other model ops'


def breakdown(profile_dir: pathlib.Path) -> tuple[dict, dict, float]:
  """({kind: {'fwd': us, 'bwd': us}}, {op description: us}, wall us)."""
  traces = sorted(profile_dir.glob('plugins/profile/*/*.trace.json.gz'))
  hlo = profile_dir / 'hlo.txt'
  if not traces or not hlo.exists():
    raise SystemExit(f'{profile_dir} has no trace or no hlo.txt: give the '
                     'case folder that `benchmark.py --profile=DIR` wrote '
                     '(DIR/<model>_<mode>).')
  with gzip.open(traces[-1]) as f:
    times, wall = thunk_times(json.load(f))
  ops = hlo_ops(hlo.read_text())
  kinds = collections.defaultdict(collections.Counter)
  single = collections.Counter()
  for op, us in times.items():
    shape, opcode, op_name = ops.get(op, ('', '', ''))
    direction = 'bwd' if 'transpose(jvp(' in op_name else 'fwd'
    kinds[kind(opcode, op_name) if op_name else 'ops without op_name'][
        direction] += us
    # One row per op of the layer, summed over layers.
    op_name = re.sub(r'encoderblock_[0-9]+', 'encoderblock_N',
                     re.sub(r'^jit\([^)]*\)/', '', op_name))
    single[f'{op_name or op} {shape}'] += us
  return kinds, single, wall


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('profile_dir', type=pathlib.Path)
  parser.add_argument('--top', type=int, default=20)
  args = parser.parse_args(argv[1:])
  kinds, single, wall = breakdown(args.profile_dir)
  print(f'step wall time {wall / 1e3:.0f} ms\n')
  print('| kind | forward ms | backward ms | total ms | share |')
  print('|---|---:|---:|---:|---:|')
  for name, times in sorted(kinds.items(), key=lambda kv: -kv[1].total()):
    print(f"| {name} | {times['fwd'] / 1e3:.1f} | {times['bwd'] / 1e3:.1f} | "
          f'{times.total() / 1e3:.1f} | {100 * times.total() / wall:.1f} % |')
  print('\nlargest ops (summed over layers):')
  for name, us in single.most_common(args.top):
    print(f'{us / 1e3:8.1f} ms {100 * us / wall:5.1f} %  {name}')


if __name__ == '__main__':
  main(sys.argv)
