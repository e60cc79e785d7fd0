"""A run planned on a TPU slice it has never seen: compiled there, measured.

`make_plan(config, 'v3:8x8')` builds exactly what `python -m vit_jax.main`
builds for `config` (the same Setup: model, mesh rules, state shardings,
optimizer, and the same jitted step from `training.programs`) on the
devices of the slice, compiles it ahead of time there and reads back:

  * memory per device (arguments, outputs, temporaries; total = arguments +
    outputs - donated + temporaries) against the chip's HBM, and a verdict;
    when it does not fit, the remat / FSDP / accumulation change that does,
    itself compiled and checked;
  * FLOPs per device and the compiler's `optimal_seconds`, the images/s per
    device and per chip that bound implies, and at that bound the MFU (the
    model's matmul FLOPs, without rematerialised recomputation) and the HFU
    (every FLOP XLA runs) against the chip's bf16 peak. XLA's cost analysis counts the body of a loop once, so a
    program with loops (scanned layers, gradient accumulation) takes these
    from its unrolled twin (scan_layers=False, accum_steps=1: the same work
    per step), compiled beside it; without the twin (`unrolled_cost=False`)
    the FLOPs are scaled by the loop factor (`flops.loop_factor`) and no time
    bound is given;
  * the collectives per device and step (`hlo.collectives`);
  * lowering and compile time.
"""
from collections.abc import Mapping
import dataclasses
import math
import re
import time
from typing import Any

import jax
import ml_collections

from vit_jax.data import presets
from vit_jax.planning import chips
from vit_jax.planning import flops as flops_lib
from vit_jax.planning import hlo
from vit_jax.planning import topology as topology_lib
from vit_jax.training import config as config_lib
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


def _shard_bytes(tree: Any) -> int:
  """Bytes one device holds of abstract arrays with shardings."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape))
             * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


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
    arguments = _shard_bytes(args)
    donated = _shard_bytes(args[0]) if mode == 'train' else 0
    temp = float(need.group(1)) * _UNITS[need.group(2)]
    measured.update(
        memory=_Memory(arguments, donated, donated, int(temp)),
        hbm_available=float(need.group(3)) * _UNITS[need.group(4)],
        cost={}, collectives=None, compile_s=time.time() - lowered_at)
  else:
    memory = compiled.memory_analysis()
    measured.update(memory=memory, cost=compiled.cost_analysis() or {},
                    collectives=hlo.collectives(compiled.as_text()),
                    compile_s=time.time() - lowered_at)
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


def _suggestion(config, tpu, info, mode, measured, hbm) -> dict | None:
  """The first single change that, compiled, fits; None if none does."""
  tried = []
  for change, _ in _candidates(config, measured, len(tpu.devices),
                               hbm)[:_MAX_COMPILES_FOR_A_SUGGESTION]:
    try:
      setup = setup_lib.create_setup(
          config_lib.with_overrides(config, change), info, tpu.devices)
    except ValueError:
      continue
    result = _compile(setup, mode)
    tried.append(change)
    if result['total_bytes'] <= hbm:
      return {'overrides': change, 'flags': ' '.join(
          f'--config.{k}={v}' for k, v in change.items()),
              'memory_gib': result['total_bytes'] / GIB, 'verified': True}
  return {'overrides': None, 'tried': tried, 'verified': False}


def _model_flops(config, info, tpu, mode, setup, measured) -> float:
  """Matmul FLOPs per device of the step without rematerialisation: what
  MFU counts (the recomputation a remat policy adds is the hardware's work,
  not the model's)."""
  if (config.model.remat_policy or 'none') != 'none':
    plain = setup_lib.create_setup(config_lib.with_overrides(
        config, {'model.remat_policy': 'none'}), info, tpu.devices)
    fn, args, _ = _program(plain, mode)
    total, _ = flops_lib.loop_factor(fn, *args)
  else:
    total = measured['program_flops']
  return total / setup.mesh.devices.size


def make_plan(config: ml_collections.ConfigDict, topology: str, *,
              mode: str = 'train', num_classes: int | None = None,
              suggest: bool = True, unrolled_cost: bool = True
              ) -> dict[str, Any]:
  """The plan of `config` on TPU slice `topology` (module docstring).

  Raises topology.TopologyError (unknown slice, no libtpu) and ValueError
  (a config that cannot run there, e.g. a mesh the slice cannot hold).
  """
  if mode not in MODES:
    raise ValueError(f'mode={mode!r}; allowed: {", ".join(MODES)}.')
  tpu = topology_lib.slice_devices(topology)
  chip = chips.chip(tpu.device_kind)
  info = dataset_info(config, num_classes)
  setup = setup_lib.create_setup(config, info, tpu.devices)
  measured = _compile(setup, mode)
  memory = measured['memory']
  per_chip = tpu.devices_per_chip
  hbm = chip.hbm_bytes // per_chip
  peak = chip.bf16_tflops * 1e12 / per_chip
  loops = measured['loop_factor']
  mesh_devices = setup.mesh.devices.size
  cost, cost_from = measured['cost'], 'this program'
  if loops > 1.001 and unrolled_cost:
    twin = setup_lib.create_setup(config_lib.with_overrides(
        config, {'model.scan_layers': False, 'accum_steps': 1}), info,
                                  tpu.devices)
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
  per_device_images = measured['images'] / mesh_devices
  images_bound = per_device_images / optimal if optimal else None
  model_flops = _model_flops(config, info, tpu, mode, setup, measured)
  fits = measured['total_bytes'] <= hbm
  result = {
      'topology': topology, 'mode': mode, 'device_kind': tpu.device_kind,
      'chip': chip.name, 'num_devices': len(tpu.devices),
      'num_chips': tpu.num_chips, 'num_hosts': tpu.num_hosts,
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
      'hbm_gib': hbm / GIB, 'fits': fits,
      'short_gib': max(measured['total_bytes'] - hbm, 0) / GIB,
      'flops_per_device': flops, 'loop_factor': measured['loop_factor'],
      'cost_from': cost_from,
      'optimal_seconds': optimal,
      'images_per_s_per_device_bound': images_bound,
      'images_per_s_per_chip_bound': (images_bound * per_chip
                                      if images_bound else None),
      'peak_tflops_per_device': peak / 1e12,
      'model_flops_per_device': model_flops,
      'mfu_at_bound': model_flops / (optimal * peak) if optimal else None,
      'hfu_at_bound': flops / (optimal * peak) if optimal else None,
      'collectives': ({kind: {'count': c.count, 'bytes_per_device': c.bytes}
                       for kind, c in measured['collectives'].items()}
                      if measured['collectives'] is not None else None),
      'lower_s': measured['lower_s'], 'compile_s': measured['compile_s'],
      'suggestion': None,
  }
  if not fits and suggest:
    result['suggestion'] = _suggestion(config, tpu, info, mode, measured, hbm)
  return result


def report(plan: Mapping[str, Any]) -> str:
  """The plan as lines a person reads."""
  memory = plan['memory_gib']
  mesh = ' x '.join(f'{k} {v}' for k, v in plan['mesh'].items())
  lines = [
      f'{plan["model"]} {plan["mode"]} at {plan["image_size"][0]}x'
      f'{plan["image_size"][1]} on {plan["topology"]}: {plan["num_devices"]} '
      f'{plan["device_kind"]} devices ({plan["num_chips"]} chips, '
      f'{plan["num_hosts"]} host{"s" if plan["num_hosts"] != 1 else ""}), '
      f'mesh {mesh}',
      f'  batch {plan["global_batch"]} global, {plan["per_device_batch"]:g} '
      'per device',
      f'  memory per device: {memory["total"]:.2f} GiB of {plan["hbm_gib"]:.2f}'
      f' GiB HBM (arguments {memory["arguments"]:.2f}, outputs '
      f'{memory["outputs"]:.2f}, donated {memory["donated"]:.2f}, temporaries '
      f'{memory["temporaries"]:.2f}): '
      + ('fits' if plan['fits'] else
         f'does not fit by {plan["short_gib"]:.2f} GiB')]
  suggestion = plan.get('suggestion')
  if suggestion and suggestion.get('verified'):
    lines.append(f'  fits with {suggestion["flags"]} '
                 f'({suggestion["memory_gib"]:.2f} GiB per device, compiled)')
  elif suggestion:
    lines.append('  no single remat / FSDP / accumulation change tried '
                 f'({suggestion["tried"]}) fits: lower the batch or use a '
                 'larger slice')
  bound = plan['images_per_s_per_device_bound']
  lines.append(
      f'  {plan["flops_per_device"] / 1e12:.3f} TFLOP per device per step'
      + (f' (from {plan["cost_from"]})'
         if plan['cost_from'] != 'this program' else
         f' (x{plan["loop_factor"]:.2f} for loops XLA counts once)'
         if plan['loop_factor'] > 1.001 else '')
      + (f'; compiler bound {plan["optimal_seconds"] * 1e3:.1f} ms: '
         f'{bound:,.0f} images/s per device, '
         f'{plan["images_per_s_per_chip_bound"]:,.0f} per chip, MFU '
         f'{plan["mfu_at_bound"]:.0%} of {plan["peak_tflops_per_device"]:.1f}'
         ' TFLOP/s' if bound else '; no compiler time estimate'))
  if plan['collectives'] is None:
    lines.append('  collectives: unknown (XLA refused to compile a program '
                 'that does not fit)')
  else:
    used = {k: v for k, v in plan['collectives'].items() if v['count']}
    lines.append('  collectives per device per step: ' + (', '.join(
        f'{k} x{v["count"]} {v["bytes_per_device"] / 2**20:,.1f} MiB'
        for k, v in used.items()) or 'none'))
  lines.append(f'  lowered in {plan["lower_s"]:.1f} s, compiled in '
               f'{plan["compile_s"]:.1f} s')
  return '\n'.join(lines)
