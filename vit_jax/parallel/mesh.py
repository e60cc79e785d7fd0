"""Device mesh and sharding rules: data parallel and FSDP, no pmap.

The mesh has two axes, `data` and `fsdp`. Batches are split over both (every
device sees different examples); parameters and optimizer state are either
replicated or, with FSDP, split over `fsdp` along their largest divisible
dimension, so that each device holds 1/fsdp of every large array.
"""
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def create_mesh(data: int = -1, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh; -1 means "all the devices fsdp leaves".

  With several processes the mesh must span every device of every process;
  a single process may use fewer devices than it has (the first data*fsdp).
  """
  num_devices = jax.device_count()
  if fsdp < 1 or data == 0 or data < -1:
    raise ValueError(f'Mesh axes must be positive (data may be -1 for "all the '
                     f'rest"); got data={data}, fsdp={fsdp}.')
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f'mesh.fsdp={fsdp} does not divide the {num_devices} '
                       'available devices; choose a divisor.')
    data = num_devices // fsdp
  needed = data * fsdp
  if needed > num_devices or (needed < num_devices and
                              jax.process_count() > 1):
    raise ValueError(
        f'The mesh data={data} x fsdp={fsdp} needs {needed} devices but '
        f'{num_devices} are available; make data x fsdp at most {num_devices} '
        '(equal to it with several processes), or set mesh.data=-1.')
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=jax.devices()[:needed])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
  """Split the largest dimension divisible by `fsdp`; small arrays stay whole.

  Arrays under `min_size` elements (biases, norms) are replicated: splitting
  them saves little memory and costs a collective each.
  """
  if fsdp == 1 or np.prod(shape, dtype=np.int64) < min_size:
    return P()
  candidates = [(size, axis) for axis, size in enumerate(shape)
                if size % fsdp == 0]
  if not candidates:
    return P()
  _, axis = max(candidates)
  spec = [None] * len(shape)
  spec[axis] = 'fsdp'
  return P(*spec)


def state_shardings(mesh: Mesh, abstract_state: Any,
                    fsdp_min_size: int = 2**14) -> Any:
  """A NamedSharding for every leaf of `abstract_state` (shapes only)."""
  fsdp = mesh.shape['fsdp']
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp, fsdp_min_size)),
      abstract_state)
