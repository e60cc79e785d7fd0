"""The training state's layout, shared by the trainer and workdir readers."""
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax import models

State = dict[str, Any]  # step, params, opt_state, rng (raw key data)


def make_init_fn(model: models.VisionTransformer,
                 tx: optax.GradientTransformation,
                 image_size: tuple[int, int]):
  """(rng, params=None) -> State: the layout every checkpoint has."""
  dummy = jnp.zeros((1, *image_size, 3), jnp.float32)

  def init(rng: jax.Array, params=None) -> State:
    params_rng, state_rng = jax.random.split(rng)
    if params is None:
      params = model.init({'params': params_rng}, dummy)['params']
    return {'step': jnp.zeros((), jnp.int32), 'params': params,
            'opt_state': tx.init(params),
            'rng': jax.random.key_data(state_rng)}

  return init
