"""GPU plans: the trainer's own step compiled for H100 hosts here, no GPU."""
import importlib.util
import json
import subprocess
import sys

import pytest

from configs import paper
from tests.test_plan import KEYS
from tests.test_plan import REPO
from tests.test_plan import forward_flops_per_image
from tests.test_plan import tiny
from vit_jax.planning import gpus
from vit_jax.planning import host_input
from vit_jax.planning import kernels
from vit_jax.planning import topology

needs_cuda_plugin = pytest.mark.skipif(
    importlib.util.find_spec('jax_cuda12_plugin') is None,
    reason='the CUDA plugin (jax_cuda12_plugin) is not installed: '
    'pip install -e ".[cuda]" compiles for GPUs without one')
GPU_KEYS = {**KEYS, 'bound_source': str, 'roofline': dict,
            'custom_calls': dict, 'host_input': dict}


def _plan(name, **overrides):
  from vit_jax.planning import plan  # pylint: disable=g-import-not-at-top
  return plan.make_plan(tiny(**{'model.dtype': 'bfloat16', **overrides}),
                        name)


@needs_cuda_plugin
def test_a_tiny_plan_on_one_h100_host_has_sane_numbers():
  result = _plan('h100:8')
  for key, kind in GPU_KEYS.items():
    assert isinstance(result[key], kind), (key, result[key])
  assert result['device_kind'] == 'NVIDIA H100 80GB HBM3'
  assert (result['num_devices'], result['num_hosts']) == (8, 1)
  assert result['per_device_batch'] == 32 and result['fits']
  # JAX's allocator takes 75 % of the 79.1 GiB CUDA reports.
  assert result['hbm_gib'] == pytest.approx(0.75 * 84942979072 / 2**30)
  assert 0 < result['memory_gib']['total'] < 1
  assert result['bound_source'] == 'roofline'
  per_image = forward_flops_per_image(width=128, depth=4, mlp=256, tokens=65,
                                      patches=64, patch_pixels=4 * 4 * 3,
                                      classes=10)
  assert result['flops_per_device'] == pytest.approx(3 * per_image * 32,
                                                     rel=0.05)
  roof = result['roofline']
  # Every step reads the float32 state and writes it back, at the least.
  params = 546_186
  assert roof['bytes_moved_per_device'] > 2 * 3 * 4 * params
  assert result['optimal_seconds'] == max(roof['compute_s'], roof['memory_s'])
  assert result['images_per_s_per_device_bound'] == pytest.approx(
      32 / result['optimal_seconds'])
  assert 0 < result['mfu_at_bound'] <= 1
  assert sum(result['custom_calls'].values()) > 0
  assert result['host_input']['cores_per_host'] >= 1
  assert result['collectives']['all-reduce']['cross_host'] == 0


@needs_cuda_plugin
def test_cudnn_attention_is_in_the_compiled_train_step_at_an_odd_token_count():
  """The tiny model has 65 tokens (64 patches + class token): JAX's cuDNN
  attention refuses odd lengths in training; padded and masked, the step
  holds cuDNN's fused attention forward and backward, once per layer."""
  result = _plan('h100:8', **{'model.attention_impl': 'cudnn'})
  calls = result['custom_calls']
  assert calls.get('__cudnn$fmhaSoftmax') == 4, calls
  assert calls.get('__cudnn$fmhaSoftmaxBackward') == 4, calls
  assert not any('fmha' in k for k in _plan('h100:8')['custom_calls'])


@needs_cuda_plugin
@pytest.mark.parametrize('fsdp,kind', [(1, 'all-reduce'),
                                       (16, 'reduce-scatter')])
def test_gradients_cross_both_hosts_of_a_2x8_topology(fsdp, kind):
  result = _plan('h100:2x8', **{'mesh.fsdp': fsdp})
  assert (result['num_devices'], result['num_hosts']) == (16, 2)
  gradients = result['collectives'][kind]
  # The gradient reduction's group holds all 16 devices, 8 on each host.
  assert gradients['largest_group'] == 16, gradients
  assert gradients['cross_host'] >= 1, gradients


def test_bad_gpu_topologies_are_one_line_with_examples():
  for name in ('h100:0', 'h100:4x', 'h100:x8', 'h100:2x2x8', 'b200:2x0'):
    with pytest.raises(topology.TopologyError,
                       match=r"Unknown GPU topology .*: give <gpu>:<GPUs per "
                       r"host> or <gpu>:<hosts>x<GPUs per host>, e.g. h100:8,"
                       r" h100:4x8"):
      topology.slice_devices(name)


def test_a_missing_cuda_plugin_names_the_extra(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None
                      if name == 'jax_cuda12_plugin' else True)
  with pytest.raises(topology.TopologyError, match=r'needs the CUDA plugin, '
                     r'which is not installed: pip install "vit_jax\[cuda\]"'):
    topology.slice_devices('h100:8')


def test_every_gpu_has_sourced_figures_and_a_target_description():
  for gpu in gpus.GPUS.values():
    assert gpu.source.startswith('https://'), gpu.name
    assert 0 < gpu.bf16_tflops and 0 < gpu.hbm_bytes_per_s
    assert gpu.hbm_bytes * 0.85 < gpu.device_memory_size < gpu.hbm_bytes * 1.1
    text = gpu.target_config()
    assert f'device_description_str: "{gpu.device_kind}"' in text


@needs_cuda_plugin
def test_every_gpu_compiles():
  for name in gpus.GPUS:
    result = _plan(f'{name}:2')
    assert result['fits'] and result['images_per_s_per_device_bound'] > 0


def test_gpu_paper_configs_keep_the_papers_batches_on_h100_hosts():
  for (setup, model, hosts), (fsdp, _, accum) in paper._PLANNED_GPU.items():
    config = paper.get_config(f'{setup},{model},{hosts}')
    gpus_total = 8 * (4 if hosts == 'h100_4x8' else 1)
    assert config.batch_size == {'pretrain': 4096, 'finetune384': 512}[setup]
    assert config.batch_size % (gpus_total * accum) == 0
    assert gpus_total % fsdp == 0
    assert config.model.attention_impl == 'cudnn'
  # The TPU names are unchanged.
  assert paper.get_config('pretrain,B_16').model.attention_impl != 'cudnn'


def test_host_input_rates_follow_the_preprocessing():
  config = tiny()
  assert host_input.rate_for(config, 'train', 32).images_per_s_per_core == (
      3278.0)
  config = paper.get_config('pretrain,B_16')
  assert host_input.host_feed(config, 'train', 224, 8190.0)[
      'cores_per_host'] == 10  # 8190 / 819
  config.randaugment_layers = 2
  assert host_input.rate_for(config, 'train', 224).images_per_s_per_core == (
      432.0)


HLO = """
HloModule m

%fused_update (p0: f32[12,768], p1: f32[768], p2: s32[]) -> f32[12,768] {
  %p0 = f32[12,768]{1,0} parameter(0)
  %p1 = f32[768]{0} parameter(1)
  %p2 = s32[] parameter(2)
  %r = f32[1,768]{1,0} bitcast(%p1)
  %z = s32[] constant(0)
  ROOT %u = f32[12,768]{1,0} dynamic-update-slice(%p0, %r, %p2, %z)
}

%fused_slice (q0: f32[12,768], q1: s32[]) -> f32[1,768] {
  %q0 = f32[12,768]{1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %d = f32[1,768]{1,0} dynamic-slice(%q0, %q1, %z), dynamic_slice_sizes={1,768}
}

%body (b: (s32[], f32[12,768])) -> (s32[], f32[12,768]) {
  %b = (s32[], f32[12,768]) parameter(0)
  %i = s32[] get-tuple-element(%b), index=0
  %w = f32[12,768]{1,0} get-tuple-element(%b), index=1
  %s = f32[1,768]{1,0} fusion(%w, %i), kind=kLoop, calls=%fused_slice
  %g = f32[768]{0} custom-call(%s), custom_call_target="__cublas$gemm"
  %n = f32[12,768]{1,0} fusion(%w, %g, %i), kind=kLoop, calls=%fused_update
  ROOT %t = (s32[], f32[12,768]) tuple(%i, %n)
}

%cond (c: (s32[], f32[12,768])) -> pred[] {
  %c = (s32[], f32[12,768]) parameter(0)
  %k = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %k), direction=LT
}

ENTRY %main (a: f32[12,768]) -> f32[12,768] {
  %a = f32[12,768]{1,0} parameter(0)
  %init = (s32[], f32[12,768]) tuple(%zero, %a)
  %w = (s32[], f32[12,768]) while(%init), condition=%cond, body=%body
  %x = f32[12,768]{1,0} get-tuple-element(%w), index=1
  ROOT %y = f32[1,768]{1,0} fusion(%x), kind=kCustom, calls=%fused_slice, backend_config={"fusion_backend_config":{"kind":"__triton_gemm"}}
}
"""


def test_bytes_moved_counts_slices_in_place_updates_and_loops():
  row, index = 768 * 4, 4
  # Per trip: a 1-row slice (and its index) read, the row written; a GEMM
  # reading and writing a row; an in-place update reading a row (and its
  # index) and writing it, not the 12 rows it updates. Then the last fusion
  # reads and writes a row.
  assert kernels.bytes_moved(HLO) == 12 * (
      (2 * row + index) + 2 * row + (2 * row + index)) + 2 * row
  assert kernels.custom_calls(HLO) == {'__cublas$gemm': 12,
                                       '__triton_gemm': 1}


@needs_cuda_plugin
def test_the_cli_plans_a_gpu_host_and_writes_json(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.plan',
       '--config=configs/pretrain.py:cifar10_quick', '--topology=h100:8',
       '--config.batch_size=256', f'--json={tmp_path / "plan.json"}'],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  assert 'on h100:8: 8 NVIDIA H100 80GB HBM3 devices (1 host)' in (
      result.stdout)
  assert 'roofline bound' in result.stdout and 'custom calls' in result.stdout
  plan = json.loads((tmp_path / 'plan.json').read_text())
  assert plan['bound_source'] == 'roofline' and set(GPU_KEYS) <= set(plan)
  assert result.stderr == '', result.stderr
