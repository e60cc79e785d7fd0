"""The benchmark harness runs and its FLOP count is the model's (no timing)."""
import json
import math
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _forward_matmul_flops(tokens: int, width: int, mlp: int, layers: int,
                          patch_pixels: int, classes: int) -> int:
  """2 x multiply-adds of ViT's matmuls for one image (the bulk of its FLOPs)."""
  per_layer = tokens * (4 * width * width + 2 * width * mlp)  # qkv, out, MLP
  attention = 2 * tokens * tokens * width  # q k^T and weights v
  patches = (tokens - 1) * patch_pixels * width
  return 2 * (layers * (per_layer + attention) + patches + width * classes)


def test_harness_reports_every_case_with_the_model_flops(tmp_path):
  out = tmp_path / 'results.jsonl'
  result = subprocess.run(
      [sys.executable, 'experiments/benchmark.py', '--models=ViT-Ti_16',
       '--batch=2', '--resolution=32', '--mode=train,infer', '--rounds=1',
       '--warmup=1', '--peak_size=256', f'--json={out}',
       f'--profile={tmp_path / "profile"}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  rows = {r['mode']: r for r in map(json.loads, out.read_text().splitlines())}
  assert set(rows) == {'train', 'infer'}
  assert 'ViT-Ti_16 | infer | 2 | 32 | float32' in result.stdout
  # ViT-Ti/16 at 32px: 2x2 patches + class token, width 192, MLP 768, 12 layers.
  expected = 2 * _forward_matmul_flops(5, 192, 768, 12, 16 * 16 * 3, 1000)
  assert 1.0 <= rows['infer']['flops_per_step'] / expected < 1.05
  # Backward ~ twice the forward, plus the optimizer's elementwise work.
  assert 2.8 < rows['train']['flops_per_step'] / expected < 4
  for row in rows.values():
    assert row['step_ms'] > 0 and row['compile_s'] > 0 and row['mem_bytes'] > 0
    # One round: the median of per-round ratios is that round's ratio.
    assert row['mfu'] > 0 and math.isclose(
        row['mfu'], row['tflop_per_s'] / row['peak_tflop_per_s'], rel_tol=1e-6)

  # The profile of the train step, broken down by kind of work.
  sys.path.insert(0, str(REPO / 'experiments'))
  import profile_breakdown
  kinds, ops, wall = profile_breakdown.breakdown(
      tmp_path / 'profile' / 'ViT-Ti_16_train')
  total = sum(times.total() for times in kinds.values())
  # Overlapping thunks are split, not double counted: the rows add up to the
  # traced span (less the gaps between thunks).
  assert 0.5 * wall < total <= wall * 1.001
  assert math.isclose(sum(ops.values()), total)
  for matmuls in ('dense matmuls', 'attention matmuls'):
    assert kinds[matmuls]['fwd'] > 0 and kinds[matmuls]['bwd'] > 0
  assert kinds['outside the model (loss, optimizer, norms)'].total() > 0


def test_matmul_chain_runs_exactly_the_step_matmuls(capsys):
  sys.path.insert(0, str(REPO / 'experiments'))
  import matmul_chain
  from vit_jax.models import registry as model_registry
  arch = model_registry.get_model_config('ViT-Ti_16')
  rows, width, mlp, layers = 2 * 5, 192, 768, 12  # batch 2 at 32 px: 5 tokens
  dense = 3 * 2 * rows * (4 * width * width + 2 * width * mlp) * layers
  attention = 3 * 2 * 2 * 2 * 5 * 5 * width * layers  # q kᵀ and weights v
  for with_attention, expected in ((False, dense),
                                   (True, dense + attention)):
    fn, inputs = matmul_chain.matmul_chain(arch, 2, 32, with_attention)
    flops = fn.lower(*inputs).compile().cost_analysis()['flops']
    # Only residual adds and scalings come on top.
    assert 1.0 <= flops / expected < 1.01, (with_attention, flops, expected)
  matmul_chain.main(['matmul_chain', '--models=ViT-Ti_16', '--batch=2',
                     '--resolution=32', '--rounds=2', '--peak_size=256'])
  lines = capsys.readouterr().out.splitlines()
  assert [l.split(' | ')[:2] for l in lines[1:]] == [
      ['ViT-Ti_16', 'dense'], ['ViT-Ti_16', 'dense+attention'],
      ['ViT-Ti_16', 'train step']]


def test_against_timm_times_both_sides_round_by_round(tmp_path):
  import importlib.util
  for name in ('torch', 'timm'):
    if importlib.util.find_spec(name) is None:
      pytest.skip(f'{name} is not installed (the [parity] extra)')
  out = tmp_path / 'results.jsonl'
  result = subprocess.run(
      [sys.executable, 'experiments/benchmark.py', '--models=ViT-Ti_16',
       '--batch=2', '--resolution=32', '--mode=train,infer',
       '--dtype=float32,bfloat16', '--rounds=2', '--peak_size=256',
       '--against=timm', f'--json={out}'],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  rows = list(map(json.loads, out.read_text().splitlines()))
  assert {(r['mode'], r['dtype']) for r in rows} == {
      (m, d) for m in ('train', 'infer') for d in ('float32', 'bfloat16')}
  for row in rows:
    assert row['timm'] and row['torch'] and row['torch_threads'] >= 1
    assert len(row['against_ms_all']) == len(row['step_ms_all']) == 2
    ratios = sorted(a / s for a, s in zip(row['against_ms_all'],
                                           row['step_ms_all']))
    assert math.isclose(row['speedup'], sum(ratios) / 2, rel_tol=1e-6)


def test_against_timm_without_torch_is_one_usage_error(monkeypatch, capsys):
  sys.path.insert(0, str(REPO / 'experiments'))
  import benchmark
  import benchmark_timm
  monkeypatch.setattr(benchmark_timm.importlib.util, 'find_spec',
                      lambda name: None)
  with pytest.raises(SystemExit) as exit_info:
    benchmark.parse_args(['benchmark', '--against=timm'])
  assert exit_info.value.code == 2
  assert ('--against=timm needs torch and timm: pip install -e ".[parity]"'
          in capsys.readouterr().err)
