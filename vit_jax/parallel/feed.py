"""Host batches -> global `jax.Array`s, each process feeding its own rows.

The input pipeline's last stage, kept free of TensorFlow: it takes batches of
numpy arrays. A process's local batch holds exactly the rows of the global
batch that its devices own (`local_rows`), in ascending order.
"""
import collections
import itertools
import math
import numbers
from typing import Iterator

import jax
import numpy as np

Batch = dict[str, jax.Array]


def batch_sharding(sharding: jax.sharding.NamedSharding
                   ) -> jax.sharding.NamedSharding:
  """Partitions only the leading (batch) axis, whatever the array's rank."""
  spec = sharding.spec[0] if len(sharding.spec) else None
  return jax.sharding.NamedSharding(sharding.mesh,
                                    jax.sharding.PartitionSpec(spec))


def local_rows(global_batch: int, sharding: jax.sharding.NamedSharding
               ) -> list[int]:
  """Checks that the batch splits evenly; returns this process's rows.

  `make_array_from_process_local_data` fills them, in ascending order, from
  the rows of the process's local batch.
  """
  processes = jax.process_count()
  if not isinstance(global_batch, numbers.Integral) or global_batch <= 0:
    raise ValueError(f'global_batch_size must be a positive int, got '
                     f'{global_batch!r}.')
  if global_batch % processes:
    raise ValueError(f'global_batch_size={global_batch} is not divisible by '
                     f'the number of processes ({processes}).')
  spec = batch_sharding(sharding).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  shards = math.prod(sharding.mesh.shape[a] for a in axes)
  if global_batch % shards:
    raise ValueError(
        f'global_batch_size={global_batch} is not divisible by the {shards} '
        f'devices the batch is sharded over (mesh axes {axes}); use a '
        f'multiple of {shards}.')
  rows = set()
  for index in batch_sharding(sharding).addressable_devices_indices_map(
      (global_batch,)).values():
    rows.update(range(global_batch)[index[0]])
  if len(rows) != global_batch // processes:
    raise ValueError(f'The sharding gives process {jax.process_index()} '
                     f'{len(rows)} rows of a {global_batch} batch; the input '
                     'pipeline needs each process to own an equal, disjoint '
                     'share of the batch axis.')
  return sorted(rows)


def global_batches(host_batches: Iterator[dict[str, np.ndarray]],
                   sharding: jax.sharding.NamedSharding, global_batch: int,
                   prefetch: int) -> Iterator[Batch]:
  """Local numpy batches -> global arrays, `prefetch` transfers in flight.

  `make_array_from_process_local_data` starts the host->device copies
  asynchronously, so building the next arrays before yielding the current
  ones overlaps the copy with the caller's step.
  """
  sharding = batch_sharding(sharding)

  def to_global(batch):
    return {k: jax.make_array_from_process_local_data(
        sharding, v, (global_batch,) + v.shape[1:]) for k, v in batch.items()}

  queue = collections.deque(
      to_global(b) for b in itertools.islice(host_batches, max(prefetch, 1)))
  while queue:
    yield queue.popleft()
    queue.extend(to_global(b) for b in itertools.islice(host_batches, 1))
