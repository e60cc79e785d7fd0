"""Plans: the trainer's own step compiled for TPU slices here, no TPU needed."""
import importlib.util
import json
import math
import pathlib
import subprocess
import sys

import pytest

from configs import pretrain
from vit_jax.planning import hlo
from vit_jax.planning import topology
from vit_jax.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec('libtpu') is None,
    reason='libtpu is not installed (pip install -e ".[tpu]")')
KEYS = {'topology': str, 'device_kind': str, 'num_devices': int,
        'num_hosts': int, 'mesh': dict, 'global_batch': int,
        'per_device_batch': float, 'memory_gib': dict, 'hbm_gib': float,
        'fits': bool, 'flops_per_device': float, 'optimal_seconds': float,
        'images_per_s_per_device_bound': float, 'collectives': dict,
        'compile_s': float}


def tiny(**overrides):
  """A 4-layer width-128 ViT at 32px (configs/pretrain.py:cifar10_quick)."""
  config = pretrain.get_config('cifar10_quick')
  config.batch_size = 256
  config.mesh.fsdp_min_size = 1024
  overrides.setdefault('eval_batch_size', overrides.get('batch_size', 256))
  return config_lib.with_overrides(config, overrides)


def forward_flops_per_image(width, depth, mlp, tokens, patches, patch_pixels,
                            classes):
  """Matmul FLOPs of one image's forward pass, from the architecture."""
  embed = 2 * patches * patch_pixels * width
  per_layer = (2 * tokens * width * 4 * width  # q, k, v, out
               + 2 * 2 * tokens * tokens * width  # logits, weighted values
               + 2 * 2 * tokens * width * mlp)  # MLP
  return embed + depth * per_layer + 2 * width * classes


@needs_libtpu
@pytest.mark.parametrize('name,hosts,devices', [('v3:2x2', 1, 8),
                                                ('v4:4x4x4', 16, 64)])
def test_a_tiny_plan_on_one_and_on_many_hosts(name, hosts, devices, tmp_path):
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  result = plan.make_plan(tiny(batch_size=devices * 8), name)
  for key, kind in KEYS.items():
    assert isinstance(result[key], kind), (key, result[key])
  assert (result['num_devices'], result['num_hosts']) == (devices, hosts)
  assert result['mesh'] == {'data': devices, 'fsdp': 1}
  assert result['per_device_batch'] == 8 and result['fits']
  assert set(result['memory_gib']) >= {'arguments', 'outputs', 'temporaries',
                                       'total'}
  assert 0 < result['memory_gib']['total'] < result['hbm_gib']
  assert result['hbm_gib'] == {'v3:2x2': 16.0, 'v4:4x4x4': 32.0}[name]
  assert result['images_per_s_per_device_bound'] > 0
  assert 0 < result['mfu_at_bound'] < 1
  path = tmp_path / 'plan.json'
  from vit_jax.base import files  # pylint: disable=g-import-not-at-top
  files.write_json(path, result)
  assert json.loads(path.read_text())['num_hosts'] == hosts


@needs_libtpu
def test_data_parallel_all_reduces_and_fsdp_gathers_and_scatters():
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  dp = plan.make_plan(tiny(), 'v3:2x2')['collectives']
  used = {k for k, v in dp.items() if v['count']}
  assert used == {'all-reduce'}
  params = 546_186  # the model's parameter count, float32 gradients
  assert dp['all-reduce']['bytes_per_device'] == pytest.approx(params * 4,
                                                               rel=0.01)
  for scan in (False, True):  # scanned layers keep batch-split activations
    fsdp = plan.make_plan(tiny(**{'mesh.fsdp': 4, 'model.scan_layers': scan}),
                          'v3:2x2')['collectives']
    assert fsdp['all-gather']['count'] > 0, fsdp
    assert fsdp['reduce-scatter']['count'] > 0, fsdp
    assert fsdp['all-to-all']['count'] == 0, fsdp
    # No activations all-reduced: what remains is small (norms, biases).
    assert fsdp['all-reduce']['bytes_per_device'] < 0.5 * params * 4, fsdp


@needs_libtpu
@pytest.mark.parametrize('scan', [False, True])
def test_flops_equal_the_analytic_count(scan):
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  result = plan.make_plan(tiny(**{'model.scan_layers': scan,
                                  'model.hidden_size': 256,
                                  'model.mlp_dim': 1024,
                                  'model.num_heads': 4}), 'v3:2x2')
  per_image = forward_flops_per_image(width=256, depth=4, mlp=1024,
                                      tokens=65, patches=64,
                                      patch_pixels=4 * 4 * 3, classes=10)
  analytic = 3 * per_image * result['per_device_batch']  # forward + backward
  assert result['flops_per_device'] == pytest.approx(analytic, rel=0.05)


@needs_libtpu
def test_a_masked_patch_prediction_plan_compiles_its_own_step():
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  supervised = plan.make_plan(tiny(), 'v3:2x2')
  masked = plan.make_plan(tiny(objective='masked_patches',
                               label_smoothing=0.0), 'v3:2x2')
  # The per-patch head (64 patches x width 128 -> 512 colours) replaces the
  # 10-class head: about 3 x 2 x 64 x 128 x 512 more FLOPs per image.
  extra = 3 * 2 * 64 * 128 * (512 - 10 / 64) * masked['per_device_batch']
  assert masked['flops_per_device'] - supervised['flops_per_device'] == (
      pytest.approx(extra, rel=0.1))
  assert masked['fits']


@needs_libtpu
def test_the_verdict_flips_and_a_change_that_fits_is_compiled():
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  small = plan.make_plan(tiny(image_size=128, batch_size=64), 'v3:2x2')
  assert small['fits']
  big = plan.make_plan(tiny(image_size=128, batch_size=16384), 'v3:2x2')
  assert not big['fits'] and big['short_gib'] > 0
  assert big['memory_gib']['total'] > big['hbm_gib']
  suggestion = big['suggestion']
  assert suggestion['verified'] and suggestion['memory_gib'] < big['hbm_gib']
  change = suggestion['overrides']
  assert set(change) <= {'model.remat_policy', 'accum_steps', 'mesh.fsdp'}
  assert suggestion['flags'].startswith('--config.')
  confirmed = plan.make_plan(tiny(image_size=128, batch_size=16384, **change),
                             'v3:2x2', suggest=False)
  assert confirmed['fits']


def _plan_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-m', 'vit_jax.plan',
       '--config=configs/pretrain.py:cifar10_quick', *args], cwd=REPO,
      capture_output=True, text=True, timeout=300)


@needs_libtpu
@pytest.mark.parametrize('args,message', [
    (['--topology=v3:3x3'], "Unknown TPU topology 'v3:3x3' (the chips do not "
     'split into whole hosts of 2x2x1): give <generation>:<chips per '
     'dimension>, e.g. v2:2x2, v3:2x2'),
    (['--topology=v9:2x2'], "Unknown TPU topology 'v9:2x2': give"),
    (['--topology=v3:2x2', '--config.mesh.fsdp=3'],
     'mesh.fsdp=3 does not divide the 8 available devices'),
    (['--topology=v3:2x2', '--config.batch_size=100'],
     'batch_size=100 must be divisible by the 8 devices'),
    (['--topology=v3:2x2', '--config.dataset=imagenet21k'],
     "'imagenet21k' is no preset"),
    (['--topology=v3:2x2', '--json=/tmp'], '--json=/tmp: name a file in an '
     'existing folder'),
    (['--topology=v3:2x2', '--mode=infer', '--config.objective='
      'masked_patches'], "--mode=infer compiles a classifier's inference"),
], ids=['host-shape', 'generation', 'mesh', 'batch', 'classes', 'json-dir',
        'infer-mpp'])
def test_bad_plans_are_one_usage_line(args, message):
  result = _plan_cli(*args)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith('error: ') and message in result.stderr
  assert 'Traceback' not in result.stderr


@needs_libtpu
def test_the_cli_prints_the_plan_and_writes_json_quietly(tmp_path):
  result = _plan_cli('--topology=v3:2x2', '--config.batch_size=256',
                     f'--json={tmp_path / "plan.json"}')
  assert result.returncode == 0, result.stderr
  assert 'on v3:2x2: 8 TPU v3 devices (4 chips, 1 host)' in result.stdout
  assert ': fits' in result.stdout and ' per chip, MFU ' in result.stdout
  plan = json.loads((tmp_path / 'plan.json').read_text())
  assert set(KEYS) <= set(plan)
  # libtpu's start-up complaints about TPU_WORKER_HOSTNAMES stay unsaid.
  assert 'TPU_WORKER_HOSTNAMES' not in result.stderr
  assert 'TPU_ACCELERATOR_TYPE' not in result.stderr


def test_a_missing_libtpu_names_the_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec',
                      lambda name, *a: None if name == 'libtpu' else True)
  with pytest.raises(topology.TopologyError, match=r'needs libtpu, which is '
                     r'not installed: pip install "vit_jax\[tpu\]"'):
    topology.slice_devices('v3:2x2')


def test_only_the_planner_touches_tpu_topologies():
  users = sorted(str(p.relative_to(REPO)) for p in (REPO / 'vit_jax').rglob(
      '*.py') if 'get_topology_desc' in p.read_text())
  assert users == ['vit_jax/planning/topology.py']


HLO = """
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  ROOT %s = f32[] add(f32[] %a, f32[] %b)
}

%body (p: (s32[], f32[8,128])) -> (s32[], f32[8,128]) {
  %g = f32[8,128]{1,0} all-gather(f32[2,128]{1,0} %x), channel_id=3, replica_groups={{0,1,2,3}}, dimensions={0}
  %r = f32[2,128]{1,0} fusion(f32[8,128]{1,0} %g), kind=kCustom, calls=%all-reduce-scatter.1
  ROOT %t = (s32[], f32[8,128]) tuple(%i, %g)
}

%all-reduce-scatter.1 (q: f32[8,128]) -> f32[2,128] {
  %ar = f32[8,128]{1,0} all-reduce(f32[8,128]{1,0} %q), channel_id=4, to_apply=%add
  ROOT %d = f32[2,128]{1,0} dynamic-slice(%ar, %z, %z), dynamic_slice_sizes={2,128}
}

%cond (c: (s32[], f32[8,128])) -> pred[] {
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(s32[] %i, s32[] %n), direction=LT
}

ENTRY %main (a: f32[1024]) -> f32[1024] {
  %w = (s32[], f32[8,128]) while((s32[], f32[8,128]) %init), condition=%cond, body=%body
  %s = bf16[1024]{0} all-reduce-start(bf16[1024]{0} %a), channel_id=1, to_apply=%add
  %e = bf16[1024]{0} all-reduce-done(bf16[1024]{0} %s)
  %s2 = bf16[1024]{0} all-reduce-start(bf16[1024]{0} %a), channel_id=1, to_apply=%add
  %p = (f32[4]{0}, f32[4]{0}, u32[]) collective-permute-start(f32[4]{0} %b), channel_id=9, source_target_pairs={{0,1}}
  ROOT %o = f32[1024]{0} convert(%e)
}
"""


def test_collectives_are_counted_through_loops_fusions_and_async_pairs():
  found = hlo.collectives(HLO)
  assert (found['all-gather'].count, found['all-gather'].bytes) == (
      12, 12 * 8 * 128 * 4)  # a while body, 12 trips
  assert (found['reduce-scatter'].count, found['reduce-scatter'].bytes) == (
      12, 12 * 2 * 128 * 4)  # the all-reduce-scatter fusion, not its inside
  # One async pair, cloned twice with one channel id: once, 2 KiB of bf16.
  assert (found['all-reduce'].count, found['all-reduce'].bytes) == (1, 2048)
  assert (found['collective-permute'].count,
          found['collective-permute'].bytes) == (1, 16)
  assert found['all-to-all'].count == 0
  assert math.isclose(hlo.shape_bytes('(bf16[2,3]{1,0:T(8,128)}, f32[4])'),
                      28)
