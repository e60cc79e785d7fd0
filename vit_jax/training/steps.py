"""The jitted step functions: training (with micro-batches) and evaluation."""
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from vit_jax.evaluation import classification
from vit_jax import models
from vit_jax.training import state as state_lib


def make_train_step(model: models.VisionTransformer,
                    tx: optax.GradientTransformation,
                    schedule: Callable[[jax.Array], jax.Array], *,
                    label_smoothing: float = 0.0, accum_steps: int = 1,
                    skip_nonfinite: bool = False):
  """(state, batch) -> (state, metrics); gradients averaged over micro-batches.

  With `skip_nonfinite` a step whose loss, gradients or update is not finite
  keeps the previous parameters and optimizer state (only the step advances).
  """

  def loss_fn(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': rng})
    return jnp.mean(classification.cross_entropy(logits, labels,
                                                 label_smoothing))

  def train_step(state: state_lib.State, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                             state['step'])
    grad_fn = jax.value_and_grad(loss_fn)
    if accum_steps == 1:
      loss, grads = grad_fn(state['params'], batch['image'], batch['label'], rng)
    else:
      # Micro-batch i takes examples i, i+accum, ...: each device keeps its
      # own examples, so splitting needs no communication.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(-1, accum_steps, *x.shape[1:]),
                                 0, 1), batch)

      def accumulate(carry, xs):
        i, mb = xs
        loss, grads = grad_fn(state['params'], mb['image'], mb['label'],
                              jax.random.fold_in(rng, i))
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


def make_eval_step(model: models.VisionTransformer):
  """(params, batch) -> `classification.batch_sums` of the model's logits."""

  def eval_step(params: Any, batch: dict[str, jax.Array]):
    logits = model.apply({'params': params}, batch['image'], train=False)
    return classification.batch_sums(logits, batch['label'], batch['mask'])

  return eval_step
