"""A TPU slice or GPU hosts without them: their devices, for compiling ahead.

`slice_devices('v3:8x8')` gives the devices of that TPU slice from libtpu
(`pip install "vit_jax[tpu]"`); `slice_devices('h100:4x8')` those of 4 hosts
of 8 H100s from the CUDA plugin (`pip install "vit_jax[cuda]"`) and the GPU's
target description (`gpus`). Meshes are built on them and programs compiled
for them. Nothing here runs at import: a user who never plans never loads
libtpu or the plugin. v4 slices are described in megacore mode (one device
per chip, as JAX shows a real v4 VM); v2 and v3 devices are TensorCores (two
a chip); a GPU is one device.
"""
import contextlib
import dataclasses
import importlib.util
import os
import re
from typing import Sequence

import jax

from vit_jax.planning import gpus

EXAMPLES = ('v2:2x2', 'v3:2x2', 'v3:8x8', 'v4:2x2x1', 'v4:4x4x4', 'v4:8x8x16',
            'v5e:4x4', 'v5p:2x2x1', 'v5p:8x8x8', 'v6e:16x16')
GPU_EXAMPLES = ('h100:8', 'h100:4x8', 'a100-40g:8', 'a100-80g:2x8', 'h200:8',
                'b200:4x8', 'l4:1')
_GPU_NAME = re.compile(r'^(\d+)(?:x(\d+))?$')  # [hosts x] GPUs per host
# Set while libtpu starts, only if unset: without them it prints five lines
# about TPU_WORKER_HOSTNAMES / TPU_ACCELERATOR_TYPE (results do not change),
# and it would refuse to start while another process holds its lock file.
_QUIET_LIBTPU = {'TPU_WORKER_HOSTNAMES': 'localhost',
                 'TPU_ACCELERATOR_TYPE': 'v4-8',
                 'ALLOW_MULTIPLE_LIBTPU_LOAD': '1'}


class TopologyError(ValueError):
  """A slice that cannot be described: unknown name, or no libtpu."""


@dataclasses.dataclass(frozen=True)
class Slice:
  name: str
  devices: Sequence[jax.Device]
  device_kind: str
  num_chips: int
  num_hosts: int
  platform: str = 'tpu'  # or 'cuda'

  @property
  def devices_per_chip(self) -> int:
    return len(self.devices) // self.num_chips


@contextlib.contextmanager
def _quiet_libtpu():
  added = [k for k in _QUIET_LIBTPU if k not in os.environ]
  os.environ.update({k: _QUIET_LIBTPU[k] for k in added})
  try:
    yield
  finally:
    for key in added:
      os.environ.pop(key, None)


def _gpu_hosts(name: str) -> Slice:
  """`<gpu>:[<hosts>x]<GPUs per host>` from the CUDA plugin."""
  kind, _, shape = name.partition(':')
  match = _GPU_NAME.match(shape)
  if not match or int(match.group(1)) < 1 or (
      match.group(2) and int(match.group(2)) < 1):
    raise TopologyError(
        f'Unknown GPU topology {name!r}: give <gpu>:<GPUs per host> or '
        f'<gpu>:<hosts>x<GPUs per host>, e.g. {", ".join(GPU_EXAMPLES)}.')
  hosts, per_host = ((1, int(match.group(1))) if not match.group(2) else
                     (int(match.group(1)), int(match.group(2))))
  if importlib.util.find_spec('jax_cuda12_plugin') is None:
    raise TopologyError('Planning for GPUs needs the CUDA plugin, which is '
                        'not installed: pip install "vit_jax[cuda]".')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  gpu = gpus.gpu(kind)
  # '<slices>x<hosts per slice>x<devices per host>': hosts are processes.
  topology = topologies.get_topology_desc(
      platform='cuda', target_config=gpu.target_config(),
      topology=f'1x{hosts}x{per_host}')
  devices = list(topology.devices)
  return Slice(name, devices, devices[0].device_kind, len(devices),
               len({d.process_index for d in devices}), platform='cuda')


def slice_devices(name: str) -> Slice:
  """The devices of TPU slice or GPU hosts `name` (e.g. 'v3:8x8', 'h100:8');
  TopologyError if none."""
  if name.partition(':')[0] in gpus.GPUS:
    return _gpu_hosts(name)
  if importlib.util.find_spec('libtpu') is None:
    raise TopologyError('Planning for TPU slices needs libtpu, which is not '
                        'installed: pip install "vit_jax[tpu]".')
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  options = ({'chip_config_name': 'megacore'}
             if name.replace('_', ':').startswith('v4:') else {})
  try:
    with _quiet_libtpu():
      topology = topologies.get_topology_desc(platform='tpu',
                                              topology_name=name, **options)
  except Exception as e:  # pylint: disable=broad-except  (JaxRuntimeError)
    reason = str(e).split('\n')[0]
    hint = (' (the chips do not split into whole hosts of 2x2x1)'
            if 'not divisible' in reason else '')
    raise TopologyError(
        f'Unknown TPU topology {name!r}{hint}: give <generation>:<chips per '
        f'dimension>, e.g. {", ".join(EXAMPLES)}; or GPUs <gpu>:[<hosts>x]'
        f'<GPUs per host>, e.g. {", ".join(GPU_EXAMPLES)}. '
        f'(libtpu: {reason[:200]})'
    ) from None
  devices = list(topology.devices)
  kinds = {d.device_kind for d in devices}
  chips = {(getattr(d, 'slice_index', 0), *d.coords) for d in devices}
  return Slice(name, devices, kinds.pop(), len(chips),
               len({d.process_index for d in devices}))
