"""The training state: its layout, its shardings, its creation.

A state is {'step', 'params', 'opt_state', 'rng' (raw key data)}: the layout
of every checkpoint. It is created directly with its shardings on the mesh
(no host copy), or only described (`abstract_state`) to restore onto or to
compile for.
"""
from collections.abc import Callable
from typing import Any
import warnings

import jax
import jax.numpy as jnp
import optax

from vit_jax.parallel import mesh as mesh_lib
from vit_jax.training import objectives

State = dict[str, Any]  # step, params, opt_state, rng (raw key data)


def make_init_fn(objective: objectives.Objective,
                 tx: optax.GradientTransformation,
                 image_size: tuple[int, int]
                 ) -> Callable[..., State]:
  """(rng, params=None) -> State: the layout every checkpoint has."""
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)

  def init(rng: jax.Array, params=None) -> State:
    params_rng, state_rng = jax.random.split(rng)
    if params is None:
      with warnings.catch_warnings():
        # Parameters do not depend on the attention implementation, and this
        # one-image init runs off the mesh; whether cuDNN serves attention is
        # said when the steps are traced on their mesh.
        warnings.filterwarnings(
            'ignore', message="attention implementation 'cudnn' unavailable")
        params = objective.init(params_rng, dummy)
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params),
            'rng': jax.random.key_data(state_rng)}

  return init


def abstract_state(init: Callable[..., State], mesh: jax.sharding.Mesh,
                   seed: int, fsdp_min_size: int) -> tuple[State, Any]:
  """(the state's shapes, dtypes and shardings, nothing allocated; shardings)."""
  abstract = jax.eval_shape(init, jax.random.key(seed))
  shardings = mesh_lib.state_shardings(mesh, abstract, fsdp_min_size)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings), shardings


def create_state(init: Callable[..., State], shardings: Any, seed: int,
                 params: Any = None) -> State:
  """The initial state on its shardings; `params` (placed) replace the init's."""
  rng = jax.random.key(seed)
  if params is None:
    return jax.jit(init, out_shardings=shardings)(rng)
  params = jax.device_put(params, shardings['params'])
  return jax.jit(init, out_shardings=shardings)(rng, params)
