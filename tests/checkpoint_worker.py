"""Helper for tests/test_checkpoint.py: the training state, and a restore run
in a process with another device count.

    python tests/checkpoint_worker.py CKPT_DIR EXPECTED_NPZ NUM_DEVICES

restores the latest checkpoint of CKPT_DIR onto a mesh over all NUM_DEVICES
(simulated CPU) devices, compares every leaf with EXPECTED_NPZ and prints OK.
XLA_FLAGS must be set before jax is imported, hence a separate process.
"""
import os
import sys

if __name__ == '__main__':
  os.environ['XLA_FLAGS'] = (
      f'--xla_force_host_platform_device_count={int(sys.argv[3])}')
  os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from vit_jax import models  # noqa: E402

TINY = dict(num_layers=2, hidden_size=64, mlp_dim=128, num_heads=2,
            patch_size=8)


def shard_like(tree, mesh: Mesh):
  """Leading axis split over the mesh where it divides, else replicated."""
  size = mesh.devices.size

  def sharding(x):
    spec = P('data') if x.ndim and x.shape[0] % size == 0 else P()
    return NamedSharding(mesh, spec)
  return jax.tree.map(sharding, tree)


def _unsharded_state(seed: int):
  model = models.create_model('ViT-Ti_16', 10, **TINY)
  # Shapes only (model.init would compile for seconds); values random.
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3)))['params']
  rng = np.random.default_rng(seed)
  params = jax.tree.map(
      lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype), shapes)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3))
  opt_state = tx.init(params)
  # Non-trivial moments, so that a mix-up of mu and nu would show.
  opt_state = jax.tree.map(
      lambda x: x + 0.5 if jnp.issubdtype(x.dtype, jnp.floating) else x + 3,
      opt_state)
  state = {'params': params, 'opt_state': opt_state,
           'step': jnp.asarray(7 + seed, jnp.int32),
           'rng': jax.random.key_data(jax.random.key(seed + 42))}
  return state


def make_state(mesh: Mesh, seed: int = 0):
  """params + adamw state + step + raw RNG key data, sharded over `mesh`."""
  state = _unsharded_state(seed)
  return jax.device_put(state, shard_like(state, mesh))


def abstract_state(mesh: Mesh):
  shapes = jax.eval_shape(lambda: _unsharded_state(0))
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      shapes, shard_like(shapes, mesh))


def flat_leaves(tree) -> dict[str, np.ndarray]:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def main(directory: str, expected_path: str, num_devices: int) -> None:
  from vit_jax.runs import state_checkpoint
  assert jax.device_count() == num_devices, jax.devices()
  mesh = Mesh(np.array(jax.devices()), ('data',))
  ckpt = state_checkpoint.StateCheckpointer(directory)
  state, meta = ckpt.restore(abstract_state(mesh))
  ckpt.close()
  expected = np.load(expected_path)
  got = flat_leaves(state)
  assert sorted(got) == sorted(expected.files), (sorted(got), expected.files)
  for key, value in got.items():
    np.testing.assert_array_equal(value, expected[key], err_msg=key)
  for leaf in jax.tree.leaves(state):
    assert leaf.sharding.mesh.devices.size == num_devices, leaf.sharding
  print('OK', num_devices, meta['data_position'])


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
