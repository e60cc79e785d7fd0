"""A run planned on a TPU slice or GPU hosts it has never seen: compiled there.

`make_plan(config, 'v3:8x8')` (or 'h100:4x8') builds exactly what
`python -m vit_jax.main` builds for `config` (the same Setup: model, mesh
rules, state shardings, optimizer, and the same jitted step from
`training.programs`) on the devices of the slice or hosts, compiles it ahead
of time there and reads back:

  * memory per device (arguments, outputs, temporaries; total = arguments +
    outputs - donated + temporaries) against the device's usable memory, and
    a verdict; when it does not fit, the remat / FSDP / accumulation change
    that does, itself compiled and checked;
  * FLOPs per device and a time bound for the step, the images/s per device
    and per chip it implies, and at that bound the MFU (the model's matmul
    FLOPs, without rematerialised recomputation) and the HFU (every FLOP
    counted) against the bf16 peak. On TPUs the bound is the compiler's
    `optimal_seconds` (`bound_source: 'compiler'`). XLA's cost analysis
    counts the body of a loop once, so a program with loops (scanned layers,
    gradient accumulation) takes these from its unrolled twin (scan_layers=
    False, accum_steps=1: the same work per step), compiled beside it;
    without the twin (`unrolled_cost=False`) the FLOPs are scaled by the
    loop factor (`flops.loop_factor`) and no time bound is given. On GPUs
    XLA gives no cost analysis: FLOPs are the traced program's matmuls (loops
    counted) and the bound is a roofline (`bound_source: 'roofline'`): the
    larger of FLOPs / bf16 peak and bytes moved / HBM bandwidth
    (`kernels.bytes_moved`), with the custom calls the compiler chose;
  * the collectives per device and step (`hlo.collectives`);
  * the host CPU cores the input pipeline needs at the bound (`host_input`);
  * lowering and compile time.
"""
from collections.abc import Mapping
import dataclasses
import re
import time
from typing import Any

import jax
import ml_collections

from vit_jax.data import presets
from vit_jax.planning import flops as flops_lib
from vit_jax.planning import hlo
from vit_jax.planning import host_input
from vit_jax.planning import kernels
from vit_jax.planning import roofline as roofline_lib
from vit_jax.planning import topology as topology_lib
from vit_jax.training import config as config_lib
from vit_jax.training import memory as memory_lib
from vit_jax.training import programs
from vit_jax.training import setup as setup_lib

MODES = ('train', 'eval', 'infer')
GIB = 2**30
_MAX_COMPILES_FOR_A_SUGGESTION = 3


def dataset_info(config: ml_collections.ConfigDict,
                 num_classes: int | None) -> presets.DatasetInfo:
  """What a plan needs of the dataset, without reading it."""
  if num_classes:
    return presets.DatasetInfo(
        name=config.dataset, num_classes=num_classes, train_split='train',
        eval_split='test', num_train_examples=0, num_eval_examples=0,
        default_resolution=presets.OTHER_TFDS_DEFAULTS[0],
        default_steps=presets.OTHER_TFDS_DEFAULTS[1])
  return presets.preset_info(config.dataset)


def _program(setup: setup_lib.Setup, mode: str):
  """(jitted function, abstract arguments, images per step) of `mode`."""
  abstract, shardings = programs.abstract_train_state(setup)
  if mode == 'train':
    return (programs.train_step(setup, shardings),
            (abstract, programs.abstract_train_batch(setup)),
            setup.config.batch_size)
  batch = programs.abstract_eval_batch(setup)
  if mode == 'eval':
    return (programs.eval_step(setup), (abstract['params'], batch),
            batch['mask'].shape[0])
  return (programs.infer(setup), (abstract['params'], batch['image']),
          batch['image'].shape[0])


@dataclasses.dataclass
class _Memory:
  """memory_analysis()'s fields, or what a refused compile tells of them."""
  argument_size_in_bytes: int
  output_size_in_bytes: int
  alias_size_in_bytes: int
  temp_size_in_bytes: int


_UNITS = {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}
_OUT_OF_HBM = re.compile(r'HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds '
                         r'available HBM \(([\d.]+)([KMGT]?)\)')


def _compile(setup: setup_lib.Setup, mode: str) -> dict[str, Any]:
  fn, args, images = _program(setup, mode)
  program_flops, loops = flops_lib.loop_factor(fn, *args)
  start = time.time()
  lowered = fn.lower(*args)
  lowered_at = time.time()
  measured = {'images': images, 'loop_factor': loops,
              'program_flops': program_flops,
              'lower_s': lowered_at - start, 'hbm_available': None}
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # XLA:TPU refuses a program whose temporaries exceed the HBM; it says
    # how much they need, and the arguments are known from their shardings.
    need = _OUT_OF_HBM.search(str(e))
    if not need:
      raise
    arguments = memory_lib.shard_bytes(args)
    donated = memory_lib.shard_bytes(args[0]) if mode == 'train' else 0
    temp = float(need.group(1)) * _UNITS[need.group(2)]
    measured.update(
        memory=_Memory(arguments, donated, donated, int(temp)),
        hbm_available=float(need.group(3)) * _UNITS[need.group(4)],
        cost={}, collectives=None, compile_s=time.time() - lowered_at,
        bytes_moved=None, custom_calls=None)
  else:
    compile_s = time.time() - lowered_at
    text = compiled.as_text()
    measured.update(memory=compiled.memory_analysis(),
                    cost=compiled.cost_analysis() or {},
                    collectives=hlo.collectives(text, [
                        d.process_index for d in setup.mesh.devices.flat]),
                    compile_s=compile_s,
                    bytes_moved=kernels.bytes_moved(text),
                    custom_calls=kernels.custom_calls(text))
  memory = measured['memory']
  measured['total_bytes'] = (
      memory.argument_size_in_bytes + memory.output_size_in_bytes
      - memory.alias_size_in_bytes + memory.temp_size_in_bytes)
  return measured


def _candidates(config: ml_collections.ConfigDict, measured: dict,
                num_devices: int, hbm: int) -> list[tuple[dict, float]]:
  """Single changes that could make it fit, with a rough estimate of each."""
  memory = measured['memory']
  state = (memory.argument_size_in_bytes + memory.output_size_in_bytes
           - memory.alias_size_in_bytes)
  temp = memory.temp_size_in_bytes
  remat = config.model.remat_policy or 'none'
  activation_changes = []
  for policy, share in (('dots', 0.5), ('full', 0.2)):
    if ['none', 'dots', 'full'].index(remat) < ['none', 'dots', 'full'].index(
        policy):
      activation_changes.append(({'model.remat_policy': policy},
                                 state + temp * share))
  per_device = config.batch_size // num_devices
  for factor in (2, 4, 8):
    accum = config.accum_steps * factor
    if per_device % accum == 0:
      activation_changes.append(({'accum_steps': accum},
                                 state + temp / factor))
  state_changes = []
  for factor in (2, 4, 8, 16):
    fsdp = config.mesh.fsdp * factor
    if num_devices % fsdp == 0:
      state_changes.append(({'mesh.fsdp': fsdp}, state / factor + temp))
  ordered = (activation_changes + state_changes if temp >= state
             else state_changes + activation_changes)
  return [(change, estimate) for change, estimate in ordered
          if estimate <= hbm]


def _suggestion(config, hw, info, mode, measured, hbm) -> dict | None:
  """The first single change that, compiled, fits; None if none does."""
  tried = []
  for change, _ in _candidates(config, measured, len(hw.devices),
                               hbm)[:_MAX_COMPILES_FOR_A_SUGGESTION]:
    try:
      setup = setup_lib.create_setup(
          config_lib.with_overrides(config, change), info, hw.devices)
    except ValueError:
      continue
    result = _compile(setup, mode)
    if result['total_bytes'] <= hbm:
      return {'overrides': change, 'flags': ' '.join(
          f'--config.{k}={v}' for k, v in change.items()),
              'memory_gib': result['total_bytes'] / GIB, 'verified': True,
              'tried': tried}
    tried.append({**change, 'memory_gib': result['total_bytes'] / GIB})
  return {'overrides': None, 'tried': tried, 'verified': False}


def _model_flops(config, info, hw, mode, setup, measured) -> float:
  """Matmul FLOPs per device of the step without rematerialisation: what
  MFU counts (the recomputation a remat policy adds is the hardware's work,
  not the model's)."""
  if (config.model.remat_policy or 'none') != 'none':
    plain = setup_lib.create_setup(config_lib.with_overrides(
        config, {'model.remat_policy': 'none'}), info, hw.devices)
    fn, args, _ = _program(plain, mode)
    total, _ = flops_lib.loop_factor(fn, *args)
  else:
    total = measured['program_flops']
  return total / setup.mesh.devices.size


def _compiler_bound(config, info, hw, mode, measured, mesh_devices,
                    unrolled_cost) -> tuple[float, str, float | None]:
  """(FLOPs per device, where from, optimal seconds) from XLA:TPU's cost."""
  loops = measured['loop_factor']
  cost, cost_from = measured['cost'], 'this program'
  if loops > 1.001 and unrolled_cost:
    twin = setup_lib.create_setup(config_lib.with_overrides(
        config, {'model.scan_layers': False, 'accum_steps': 1}), info,
                                  hw.devices)
    cost = _compile(twin, mode)['cost']
    cost_from = 'its unrolled twin (scan_layers=False, accum_steps=1)'
    loops = 1.0
  if cost.get('flops'):
    flops = cost['flops'] * loops
  else:  # not compiled (out of HBM): the program's matmuls, per device
    flops = measured['program_flops'] / mesh_devices
    cost_from = 'the traced program (matmuls only): XLA refused to compile it'
    loops = 1.0
  optimal = cost.get('optimal_seconds', -1.0)
  # Non-positive: XLA's "no estimate"; with loops left: counted once, wrong.
  optimal = optimal if optimal and optimal > 0 and loops == 1.0 else None
  return flops, cost_from, optimal


def make_plan(config: ml_collections.ConfigDict, topology: str, *,
              mode: str = 'train', num_classes: int | None = None,
              suggest: bool = True, unrolled_cost: bool = True
              ) -> dict[str, Any]:
  """The plan of `config` on TPU slice or GPU hosts `topology` (module
  docstring).

  Raises topology.TopologyError (unknown topology, no libtpu or CUDA plugin)
  and ValueError (a config that cannot run there, e.g. a mesh it cannot
  hold).
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; allowed: {", ".join(MODES)}.')
  objective = config.get('objective', 'classification')
  if mode == 'infer' and objective != 'classification':
    raise ValueError(f'--mode=infer compiles a classifier\'s inference; this '
                     f'config trains with objective {objective!r} (no '
                     'classifier head): plan --mode=train or --mode=eval.')
  hw = topology_lib.slice_devices(topology)
  device = roofline_lib.device_figures(hw)
  info = dataset_info(config, num_classes)
  setup = setup_lib.create_setup(config, info, hw.devices)
  measured = _compile(setup, mode)
  memory = measured['memory']
  per_chip = hw.devices_per_chip
  hbm, peak = device['hbm'], device['peak']
  mesh_devices = setup.mesh.devices.size
  roofline = None
  if hw.platform == 'cuda':
    flops = measured['program_flops'] / mesh_devices
    roofline = roofline_lib.roofline(flops, measured['bytes_moved'], device)
    cost_from = 'the traced program (matmuls, loops counted)'
    optimal = max(roofline['compute_s'], roofline['memory_s'])
  else:
    flops, cost_from, optimal = _compiler_bound(
        config, info, hw, mode, measured, mesh_devices, unrolled_cost)
  per_device_images = measured['images'] / mesh_devices
  images_bound = per_device_images / optimal if optimal else None
  model_flops = _model_flops(config, info, hw, mode, setup, measured)
  fits = measured['total_bytes'] <= hbm
  per_host = (images_bound * len(hw.devices) / hw.num_hosts
              if images_bound else None)
  result = {
      'topology': topology, 'mode': mode, 'device_kind': hw.device_kind,
      'platform': hw.platform, 'chip': device['chip'],
      'num_devices': len(hw.devices),
      'num_chips': hw.num_chips, 'num_hosts': hw.num_hosts,
      'devices_per_chip': per_chip, 'mesh': dict(setup.mesh.shape),
      'model': config.model_name, 'image_size': list(setup.image_size),
      'global_batch': measured['images'],
      'per_device_batch': per_device_images,
      'memory_gib': {
          'arguments': memory.argument_size_in_bytes / GIB,
          'outputs': memory.output_size_in_bytes / GIB,
          'donated': memory.alias_size_in_bytes / GIB,
          'temporaries': memory.temp_size_in_bytes / GIB,
          'total': measured['total_bytes'] / GIB},
      'hbm_gib': hbm / GIB, 'hbm_physical_gib': device['hbm_physical'] / GIB,
      'fits': fits,
      'short_gib': max(measured['total_bytes'] - hbm, 0) / GIB,
      'flops_per_device': flops, 'loop_factor': measured['loop_factor'],
      'cost_from': cost_from,
      'bound_source': 'roofline' if roofline else 'compiler',
      'roofline': roofline,
      'optimal_seconds': optimal,
      'images_per_s_per_device_bound': images_bound,
      'images_per_s_per_chip_bound': (images_bound * per_chip
                                      if images_bound else None),
      'peak_tflops_per_device': peak / 1e12,
      'figures_source': device['source'],
      'model_flops_per_device': model_flops,
      'mfu_at_bound': model_flops / (optimal * peak) if optimal else None,
      'hfu_at_bound': flops / (optimal * peak) if optimal else None,
      'collectives': ({kind: {'count': c.count, 'bytes_per_device': c.bytes,
                              'cross_host': c.cross_host,
                              'largest_group': c.largest_group}
                       for kind, c in measured['collectives'].items()}
                      if measured['collectives'] is not None else None),
      'custom_calls': measured['custom_calls'],
      'host_input': host_input.host_feed(config, mode, setup.image_size[0],
                                         per_host),
      'lower_s': measured['lower_s'], 'compile_s': measured['compile_s'],
      'suggestion': None,
  }
  if not fits and suggest:
    result['suggestion'] = _suggestion(config, hw, info, mode, measured, hbm)
  return result
