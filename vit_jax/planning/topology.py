"""A TPU slice without a TPU: its devices, for compiling ahead of time.

`slice_devices('v3:8x8')` gives the devices of that slice from libtpu
(`pip install "vit_jax[tpu]"`), for meshes to be built on and programs
compiled for. Nothing here runs at import: a user who never plans never
loads libtpu. v4 slices are described in megacore mode (one device per chip,
as JAX shows a real v4 VM); v2 and v3 devices are TensorCores (two a chip).
"""
import contextlib
import dataclasses
import importlib.util
import os
from typing import Sequence

import jax

EXAMPLES = ('v2:2x2', 'v3:2x2', 'v3:8x8', 'v4:2x2x1', 'v4:4x4x4', 'v4:8x8x16',
            'v5e:4x4', 'v5p:2x2x1', 'v5p:8x8x8', 'v6e:16x16')
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


def slice_devices(name: str) -> Slice:
  """The devices of TPU slice `name` (e.g. 'v3:8x8'); TopologyError if none."""
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
        f'dimension>, e.g. {", ".join(EXAMPLES)}. (libtpu: {reason[:200]})'
    ) from None
  devices = list(topology.devices)
  kinds = {d.device_kind for d in devices}
  chips = {(getattr(d, 'slice_index', 0), *d.coords) for d in devices}
  return Slice(name, devices, kinds.pop(), len(chips),
               len({d.process_index for d in devices}))
