"""Will the run fit? Its compiled steps' memory against the machine's, asked
before any state, batch or input pipeline exists.

The trainer compiles its train and eval steps ahead of time from abstract
arguments (`training.programs`, as the planner does for TPU slices) and asks
XLA for each one's memory (`memory_analysis()`: arguments, outputs, the part
of the outputs that reuses donated arguments, temporaries). A run whose step
cannot fit stops there with one line that gives the figure, the memory there
is and the change to make, instead of being killed by the kernel after it
has built its state and started its input pipeline (a batch of 10^9, an eval
batch of 10^6 at the first evaluation, 100000 px images).

Where the memory is: an accelerator's own (`memory_stats()['bytes_limit']`)
per device; on the CPU the host's, shared by all of this process's devices:
the need is summed over them and held against MemAvailable.
"""
import dataclasses
import math
from typing import Any

import jax

GIB = 2**30


class DoesNotFitError(ValueError):
  """A step needs more memory than there is; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Need:
  """Bytes one device needs while a step runs."""
  state: int  # the train state (arguments the train step donates back)
  inputs: int  # its batch (and, for eval, nothing of the state twice)
  temporaries: int

  @property
  def total(self) -> int:
    return self.state + self.inputs + self.temporaries

  def describe(self) -> str:
    return (f'state {self.state / GIB:.2f} + batch {self.inputs / GIB:.2f} + '
            f'temporaries {self.temporaries / GIB:.2f} GiB')


def shard_bytes(tree: Any) -> int:
  """Bytes one device holds of abstract arrays with shardings."""
  return sum(math.prod(leaf.sharding.shard_shape(leaf.shape))
             * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def train_need(compiled: Any, state_bytes: int) -> Need:
  m = compiled.memory_analysis()
  outputs = m.output_size_in_bytes - m.alias_size_in_bytes  # metrics
  return Need(state_bytes, m.argument_size_in_bytes - state_bytes + outputs,
              m.temp_size_in_bytes)


def eval_need(compiled: Any, state_bytes: int, params_bytes: int) -> Need:
  """The eval step runs while the train state is alive: its params are part
  of that state, its batch and temporaries come on top."""
  m = compiled.memory_analysis()
  return Need(state_bytes, m.argument_size_in_bytes - params_bytes
              + m.output_size_in_bytes, m.temp_size_in_bytes)


def host_available() -> int:
  """MemAvailable of /proc/meminfo (what can be had without swapping), or
  the physical memory where there is no such file."""
  try:
    with open('/proc/meminfo', encoding='ascii') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  import os  # pylint: disable=g-import-not-at-top
  return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')


def _local_devices(mesh: jax.sharding.Mesh) -> list[jax.Device]:
  return [d for d in mesh.devices.flat
          if d.process_index == jax.process_index()]


def available(mesh: jax.sharding.Mesh) -> tuple[int, str, int]:
  """(bytes, where, how many of the devices share them)."""
  devices = _local_devices(mesh)
  if devices[0].platform == 'cpu':
    return host_available(), 'available on this host', len(devices)
  limit = (devices[0].memory_stats() or {}).get('bytes_limit')
  return (limit or 0), f'per {devices[0].device_kind}', 1


def _hint(name: str, need: Need, budget: float, config: Any,
          num_devices: int) -> str:
  """The change that makes `need` fit in `budget` bytes per device."""
  room = budget - need.state
  if room <= 0:
    return ('The train state alone does not fit: shard it over more devices '
            '(--config.mesh.fsdp), or train a smaller model.')
  if name == 'eval':
    batch = int(config.eval_batch_size * room / (need.inputs
                                                + need.temporaries))
    batch -= batch % num_devices
    return (f'Lower --config.eval_batch_size (now {config.eval_batch_size}) '
            f'to {batch} or less.' if batch > 0 else
            'Even one image per device does not fit: lower --config.'
            'image_size or train a smaller model.')
  per_device = config.batch_size // num_devices
  accum = next((k for k in (2, 4, 8, 16, 32) if per_device % k == 0
                and need.inputs + need.temporaries / k <= room), None)
  split = (f', or split each batch with --config.accum_steps='
           f'{accum * config.accum_steps}' if accum else '')
  return (f'Lower --config.batch_size (now {config.batch_size}){split}, or '
          'recompute activations with --config.model.remat_policy=full.')


def check(needs: dict[str, Need], mesh: jax.sharding.Mesh, config: Any
          ) -> None:
  """DoesNotFitError naming the first step (by `needs`' order: 'train',
  'eval') that needs more than `available(mesh)`, with the change to make."""
  memory, where, sharing = available(mesh)
  if not memory:
    return  # a backend that does not say: nothing to check against
  for name, need in needs.items():
    total = need.total * sharing
    if total > memory:
      per = (f' ({sharing} devices x {need.total / GIB:.2f} GiB)'
             if sharing > 1 else '')
      hint = _hint(name, need, memory / sharing, config, mesh.devices.size)
      raise DoesNotFitError(
          f'The {name} step needs {total / GIB:.2f} GiB{per}: '
          f'{need.describe()} per device, compiled by XLA; {memory / GIB:.2f} '
          f'GiB {where}. {hint}')
