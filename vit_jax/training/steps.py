"""The train step of any objective (`objectives`: classification, masked
patch prediction), with micro-batches; the eval step is the objective's
`eval_sums`."""
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from vit_jax.training import objectives
from vit_jax.training import state as state_lib


def make_train_step(objective: objectives.Objective,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], *,
                    accum_steps: int = 1, skip_nonfinite: bool = False):
  """(state, batch) -> (state, metrics); gradients averaged over micro-batches.

  The step's key (the state's, folded with the step) draws the objective's
  per-example randomness for the whole batch, then dropout's. With
  `skip_nonfinite` a step whose loss, gradients or update is not finite
  keeps the previous parameters and optimizer state (only the step advances).
  """

  def train_step(state: state_lib.State, batch: dict[str, jax.Array]):
    step_key = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                                  state['step'])
    prepare_key, rng = jax.random.split(step_key)
    batch = objective.prepare(batch, prepare_key)
    grad_fn = jax.value_and_grad(objective.loss)
    if accum_steps == 1:
      loss, grads = grad_fn(state['params'], batch, rng)
    else:
      # Micro-batch i takes examples i, i+accum, ...: each device keeps its
      # own examples, so splitting needs no communication.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]),
                                 0, 1), batch)

      def accumulate(carry, xs):
        i, mb = xs
        loss, grads = grad_fn(state['params'], mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state['params']))
      total, _ = jax.lax.scan(accumulate, zeros,
                              (jnp.arange(accum_steps), micro))
      loss, grads = jax.tree.map(lambda x: x / accum_steps, total)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    update_norm = optax.tree.norm(updates)
    # A finite loss can still come with an update that poisons the params.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
              jnp.isfinite(update_norm))
    new_state = {'step': state['step'] + 1,
                 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state, 'rng': state['rng']}
    if skip_nonfinite:
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = {**jax.tree.map(keep, new_state, state),
                   'step': state['step'] + 1}
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'update_norm': update_norm, 'finite': finite,
               'learning_rate': schedule(state['step'])}
    return new_state, metrics

  return train_step
