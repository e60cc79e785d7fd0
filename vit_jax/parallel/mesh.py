"""Device mesh and sharding rules: data parallel and FSDP, no pmap.

The mesh has two axes, `data` and `fsdp`. Batches are split over both (every
device sees different examples); parameters and optimizer state are either
replicated or, with FSDP, split over `fsdp` along their largest divisible
dimension, so that each device holds 1/fsdp of every large array.
"""
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')


def create_mesh(data: int = -1, fsdp: int = 1,
                devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp) mesh; -1 means "all the devices fsdp leaves".

  With several processes the mesh must span every device of every process;
  a single process may use fewer devices than it has (the first data*fsdp).
  `devices` defaults to this run's (`jax.devices()`); a plan passes those of
  a TPU slice it compiles for.
  """
  devices = list(jax.devices() if devices is None else devices)
  num_devices = len(devices)
  num_processes = len({d.process_index for d in devices})
  if fsdp < 1 or data == 0 or data < -1:
    raise ValueError(f'Mesh axes must be positive (data may be -1 for "all the '
                     f'rest"); got data={data}, fsdp={fsdp}.')
  if data == -1:
    if num_devices % fsdp:
      raise ValueError(f'mesh.fsdp={fsdp} does not divide the {num_devices} '
                       'available devices; choose a divisor.')
    data = num_devices // fsdp
  needed = data * fsdp
  if needed > num_devices or (needed < num_devices and num_processes > 1):
    raise ValueError(
        f'The mesh data={data} x fsdp={fsdp} needs {needed} devices but '
        f'{num_devices} are available; make data x fsdp at most {num_devices} '
        '(equal to it with several processes), or set mesh.data=-1.')
  return jax.make_mesh((data, fsdp), ('data', 'fsdp'),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2,
                       devices=devices[:needed])


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def constrain_to_batch(x: jax.Array) -> jax.Array:
  """`x` split along its batch axis over the mesh in context, if there is one.

  The model calls this on its activations. On a (data, fsdp) mesh set by the
  train or eval step (`on_mesh`), it keeps XLA from propagating FSDP's
  parameter sharding into scanned activations, which turned the step into
  tensor parallelism with all-reduces of every activation (experiments/
  README.md, "Planning"). Without a mesh (inference, export) it is a no-op.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x
  return jax.lax.with_sharding_constraint(x, P(BATCH_AXES))


def on_mesh(fn, mesh: Mesh):
  """`fn` traced with `mesh` in context (for `constrain_to_batch`)."""
  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)
  return traced


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
