"""A plan (`plan.make_plan`'s dict, or its JSON) as lines a person reads."""
from collections.abc import Mapping
from typing import Any


def _header(plan: Mapping[str, Any]) -> str:
  mesh = ' x '.join(f'{k} {v}' for k, v in plan['mesh'].items())
  hosts = f'{plan["num_hosts"]} host{"s" if plan["num_hosts"] != 1 else ""}'
  chips = ('' if plan.get('platform') == 'cuda'
           else f'{plan["num_chips"]} chips, ')
  return (f'{plan["model"]} {plan["mode"]} at {plan["image_size"][0]}x'
          f'{plan["image_size"][1]} on {plan["topology"]}: '
          f'{plan["num_devices"]} {plan["device_kind"]} devices ({chips}'
          f'{hosts}), mesh {mesh}')


def _memory(plan: Mapping[str, Any]) -> str:
  memory = plan['memory_gib']
  if plan.get('platform') == 'cuda':
    share = plan['hbm_gib'] / plan['hbm_physical_gib']
    of = (f'{plan["hbm_gib"]:.2f} GiB usable ({share:.0%} of '
          f'{plan["hbm_physical_gib"]:.2f} GiB: JAX\'s '
          'XLA_PYTHON_CLIENT_MEM_FRACTION)')
  else:
    of = f'{plan["hbm_gib"]:.2f} GiB HBM'
  return (f'  memory per device: {memory["total"]:.2f} GiB of {of} (arguments '
          f'{memory["arguments"]:.2f}, outputs {memory["outputs"]:.2f}, '
          f'donated {memory["donated"]:.2f}, temporaries '
          f'{memory["temporaries"]:.2f}): '
          + ('fits' if plan['fits'] else
             f'does not fit by {plan["short_gib"]:.2f} GiB'))


def _bound(plan: Mapping[str, Any]) -> str:
  bound = plan['images_per_s_per_device_bound']
  flops = (f'  {plan["flops_per_device"] / 1e12:.3f} TFLOP per device per '
           'step' + (f' (from {plan["cost_from"]})'
                     if plan['cost_from'] != 'this program' else
                     f' (x{plan["loop_factor"]:.2f} for loops XLA counts once)'
                     if plan['loop_factor'] > 1.001 else ''))
  if not bound:
    return flops + '; no compiler time estimate'
  peak = (f'MFU {plan["mfu_at_bound"]:.0%} of '
          f'{plan["peak_tflops_per_device"]:.1f} TFLOP/s')
  if plan.get('bound_source') == 'roofline':
    roof = plan['roofline']
    return (flops + f'; roofline bound {plan["optimal_seconds"] * 1e3:.1f} ms'
            f' ({roof["limited_by"]}: compute {roof["compute_s"] * 1e3:.1f} '
            f'ms, memory {roof["memory_s"] * 1e3:.1f} ms for '
            f'{roof["bytes_moved_per_device"] / 1e9:.1f} GB at '
            f'{roof["hbm_bytes_per_s"] / 1e12:.2f} TB/s): {bound:,.0f} '
            f'images/s per GPU, {peak} (a roofline, not a measurement)')
  return (flops + f'; compiler bound {plan["optimal_seconds"] * 1e3:.1f} ms: '
          f'{bound:,.0f} images/s per device, '
          f'{plan["images_per_s_per_chip_bound"]:,.0f} per chip, {peak}')


def _change(tried: Mapping[str, Any]) -> str:
  """'model.remat_policy=full (61.20 GiB)' of a change that did not fit."""
  flags = ' '.join(f'{k}={v}' for k, v in tried.items() if k != 'memory_gib')
  return f'{flags} ({tried["memory_gib"]:.2f} GiB)'


def report(plan: Mapping[str, Any]) -> str:
  """The plan as lines a person reads."""
  lines = [_header(plan),
           f'  batch {plan["global_batch"]} global, '
           f'{plan["per_device_batch"]:g} per device', _memory(plan)]
  suggestion = plan.get('suggestion')
  if suggestion and suggestion.get('verified'):
    lines.append(f'  fits with {suggestion["flags"]} '
                 f'({suggestion["memory_gib"]:.2f} GiB per device, compiled)'
                 + ''.join(f'; tried first: {_change(t)}'
                           for t in suggestion.get('tried', [])))
  elif suggestion:
    lines.append('  no single remat / FSDP / accumulation change tried ('
                 + ', '.join(_change(t) for t in suggestion['tried'])
                 + ') fits: lower the batch or use a larger slice')
  lines.append(_bound(plan))
  if plan['collectives'] is None:
    lines.append('  collectives: unknown (XLA refused to compile a program '
                 'that does not fit)')
  else:
    used = {k: v for k, v in plan['collectives'].items() if v['count']}
    lines.append('  collectives per device per step: ' + (', '.join(
        f'{k} x{v["count"]} {v["bytes_per_device"] / 2**20:,.1f} MiB'
        + (f' ({v["cross_host"]} across hosts)' if v.get('cross_host') else '')
        for k, v in used.items()) or 'none'))
  if plan.get('platform') == 'cuda' and plan.get('custom_calls') is not None:
    lines.append('  custom calls per device per step: ' + (', '.join(
        f'{k} x{v}' for k, v in plan['custom_calls'].items()) or 'none'))
  feed = plan.get('host_input') or {}
  if feed.get('cores_per_host'):
    lines.append(
        f'  host input: {feed["cores_per_host"]} CPU cores per host to feed '
        f'{feed["images_per_s_per_host_at_bound"]:,.0f} images/s at the '
        f'bound, at {feed["images_per_s_per_core"]:,.0f} images/s per core '
        f'({feed["case"]}; planning/host_input.py)')
  lines.append(f'  lowered in {plan["lower_s"]:.1f} s, compiled in '
               f'{plan["compile_s"]:.1f} s')
  return '\n'.join(lines)
