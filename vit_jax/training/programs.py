"""The run's compiled programs and the inputs they compile for.

The jitted train step, eval step and inference of a Setup on its mesh, with
the abstract state and batches (shapes, dtypes, shardings; nothing
allocated). The trainer runs them; a plan (`vit_jax.planning`) compiles the
very same ones for a TPU slice.
"""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import setup as setup_lib
from vit_jax.training import state as state_lib
from vit_jax.training import steps


def init_fn(setup: setup_lib.Setup) -> Callable[..., state_lib.State]:
  return state_lib.make_init_fn(setup.objective, setup.tx, setup.image_size)


def abstract_train_state(setup: setup_lib.Setup) -> tuple[state_lib.State, Any]:
  """The state's shapes, dtypes and shardings, nothing allocated; shardings."""
  return state_lib.abstract_state(init_fn(setup), setup.mesh,
                                  setup.config.seed,
                                  setup.config.mesh.fsdp_min_size)


def train_step(setup: setup_lib.Setup, shardings: Any):
  """The jitted train step: (state, batch) -> (state, metrics), state donated."""
  config = setup.config
  return jax.jit(
      mesh_lib.on_mesh(steps.make_train_step(
          setup.objective, setup.tx, setup.schedule,
          accum_steps=config.accum_steps,
          skip_nonfinite=config.on_nonfinite == 'skip'), setup.mesh),
      in_shardings=(shardings, mesh_lib.batch_sharding(setup.mesh)),
      out_shardings=(shardings, mesh_lib.replicated(setup.mesh)),
      donate_argnums=0)


def eval_step(setup: setup_lib.Setup):
  """The jitted eval step: (params, batch) -> the objective's sums."""
  return jax.jit(mesh_lib.on_mesh(setup.objective.eval_sums, setup.mesh))


def infer(setup: setup_lib.Setup):
  """Jitted inference: (params, images in [-1, 1]) -> logits."""
  return jax.jit(mesh_lib.on_mesh(lambda params, images: setup.model.apply(
      {'params': params}, images, train=False), setup.mesh))


def _batch(setup: setup_lib.Setup, size: int, **fields) -> dict[str, Any]:
  sharding = mesh_lib.batch_sharding(setup.mesh)
  spec = lambda shape, dtype: jax.ShapeDtypeStruct((size, *shape), dtype,
                                                   sharding=sharding)
  return {name: spec(*shape_dtype) for name, shape_dtype in fields.items()}


def abstract_train_batch(setup: setup_lib.Setup) -> dict[str, Any]:
  """What the training pipeline yields: images and (soft) one-hot labels."""
  return _batch(setup, setup.config.batch_size,
                image=((*setup.image_size, 3), jnp.float32),
                label=((setup.info.num_classes,), jnp.float32))


def abstract_eval_batch(setup: setup_lib.Setup) -> dict[str, Any]:
  """What the evaluation pipeline yields: images, labels, the padding mask."""
  return _batch(setup, setup.config.eval_batch_size,
                image=((*setup.image_size, 3), jnp.float32),
                label=((), jnp.int32), mask=((), jnp.bool_))
