"""Training and evaluation: one jitted step on a device mesh, resumable.

Reads top to bottom: validate the config, build the mesh, model, optimizer
and sharded train state, the step functions, then `train_and_evaluate`.
"""
import contextlib
import dataclasses
import json
import pathlib
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import optax

from vit_jax import input_pipeline
from vit_jax import models
from vit_jax import optim
from vit_jax import sharding
from vit_jax import state_checkpoint
from vit_jax import train_state
from vit_jax import train_utils
from vit_jax import workdir as workdir_lib

State = train_state.State


@dataclasses.dataclass
class Setup:
  """Everything derived from the config before anything is compiled."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: models.VisionTransformer
  info: input_pipeline.DatasetInfo
  image_size: tuple[int, int]
  total_steps: int


def create_setup(config: ml_collections.ConfigDict) -> Setup:
  """Validates the config and builds the pieces; raises ValueError on bad input."""
  optim.check_config(config)
  if config.pretrained.posemb_method not in workdir_lib.POSEMB_METHODS:
    raise ValueError(f'pretrained.posemb_method='
                     f'{config.pretrained.posemb_method!r}; allowed: '
                     f'{", ".join(workdir_lib.POSEMB_METHODS)}.')
  mesh = sharding.create_mesh(config.mesh.data, config.mesh.fsdp)
  info = input_pipeline.get_dataset_info(config.dataset, config.data_dir or None)
  image_size = train_utils.pair(config.image_size or info.default_resolution)
  model = models.create_model(config.model_name, info.num_classes,
                              **train_utils.model_overrides(config.model))
  model.check_input_shape((1, *image_size, 3))
  train_utils.check_batch_sizes(config, jax.device_count(),
                                jax.process_count())
  return Setup(config, mesh, model, info, image_size,
               config.total_steps or info.default_steps)


def abstract_train_state(setup: Setup, tx: optax.GradientTransformation
                         ) -> tuple[State, Any]:
  """The state's shapes, dtypes and shardings, nothing allocated; shardings."""
  init = train_state.make_init_fn(setup.model, tx, setup.image_size)
  abstract = jax.eval_shape(init, jax.random.key(setup.config.seed))
  shardings = sharding.state_shardings(setup.mesh, abstract,
                                       setup.config.mesh.fsdp_min_size)
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      abstract, shardings), shardings


def create_train_state(setup: Setup, tx: optax.GradientTransformation
                       ) -> tuple[State, Any, dict[str, Any] | None]:
  """(initial state, its shardings, adaptation record or None).

  The state is created directly with its shardings (no host copy). With
  config.pretrained.path the parameters come from those weights, adapted to
  this model (new head, position embedding resized to the new grid), and the
  record says what was adapted.
  """
  config = setup.config
  init = train_state.make_init_fn(setup.model, tx, setup.image_size)
  init_params = lambda rng: init(rng)['params']
  rng = jax.random.key(config.seed)
  _, shardings = abstract_train_state(setup, tx)
  if not config.pretrained.path:
    return jax.jit(init, out_shardings=shardings)(rng), shardings, None
  # Replicated, hence readable on every host, for the head's fresh init.
  fresh = jax.jit(init_params, out_shardings=sharding.replicated(setup.mesh))(
      rng)
  params, record = workdir_lib.pretrained_params(
      config.pretrained.path, jax.device_get(fresh), setup.model,
      setup.image_size, config.pretrained.posemb_method)
  logging.info('Initialised from %s: %s', config.pretrained.path, record)
  params = jax.device_put(params, shardings['params'])
  return (jax.jit(init, out_shardings=shardings)(rng, params), shardings,
          record)


def cross_entropy(logits: jax.Array, labels: jax.Array,
                  label_smoothing: float = 0.0) -> jax.Array:
  """Per-example softmax cross-entropy with (soft) one-hot labels."""
  if label_smoothing:
    labels = labels * (1 - label_smoothing) + label_smoothing / labels.shape[-1]
  return -jnp.sum(labels * jax.nn.log_softmax(logits), axis=-1)


def make_train_step(setup: Setup, tx: optax.GradientTransformation):
  """(state, batch) -> (state, metrics); gradients averaged over micro-batches."""
  config, model = setup.config, setup.model
  accum = config.accum_steps
  schedule = optim.create_schedule(config, setup.total_steps)

  def loss_fn(params, images, labels, rng):
    logits = model.apply({'params': params}, images, train=True,
                         rngs={'dropout': rng})
    return jnp.mean(cross_entropy(logits, labels, config.label_smoothing))

  def train_step(state: State, batch: dict[str, jax.Array]):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state['rng']),
                             state['step'])
    grad_fn = jax.value_and_grad(loss_fn)
    if accum == 1:
      loss, grads = grad_fn(state['params'], batch['image'], batch['label'], rng)
    else:
      # Micro-batch i takes examples i, i+accum, ...: each device keeps its
      # own examples, so splitting needs no communication.
      micro = jax.tree.map(
          lambda x: jnp.swapaxes(x.reshape(-1, accum, *x.shape[1:]), 0, 1),
          batch)

      def accumulate(carry, xs):
        i, mb = xs
        loss, grads = grad_fn(state['params'], mb['image'], mb['label'],
                              jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (loss, grads)), None

      zeros = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, state['params']))
      total, _ = jax.lax.scan(accumulate, zeros, (jnp.arange(accum), micro))
      loss, grads = jax.tree.map(lambda x: x / accum, total)
    grad_norm = optax.tree.norm(grads)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    update_norm = optax.tree.norm(updates)
    # A finite loss can still come with an update that poisons the params.
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm) &
              jnp.isfinite(update_norm))
    new_state = {'step': state['step'] + 1,
                 'params': optax.apply_updates(state['params'], updates),
                 'opt_state': opt_state, 'rng': state['rng']}
    if config.on_nonfinite == 'skip':
      # Keep the old parameters and optimizer state; only the step advances.
      keep = lambda new, old: jnp.where(finite, new, old)
      new_state = {**jax.tree.map(keep, new_state, state),
                   'step': state['step'] + 1}
    metrics = {'loss': loss, 'grad_norm': grad_norm,
               'update_norm': update_norm, 'finite': finite,
               'learning_rate': schedule(state['step'])}
    return new_state, metrics

  return train_step


def make_eval_step(setup: Setup):
  """(params, batch) -> exact sums of correct, loss and count over the mask."""
  model = setup.model

  def eval_step(params, batch):
    logits = model.apply({'params': params}, batch['image'], train=False)
    mask = batch['mask']
    labels = jax.nn.one_hot(batch['label'], logits.shape[-1])
    correct = (jnp.argmax(logits, -1) == batch['label']) & mask
    return {'correct': jnp.sum(correct, dtype=jnp.int32),
            'count': jnp.sum(mask, dtype=jnp.int32),
            'loss_sum': jnp.sum(jnp.where(mask, cross_entropy(logits, labels),
                                          0.0))}

  return eval_step


def evaluate(setup: Setup, eval_step, params) -> dict[str, float]:
  """Top-1 accuracy and loss over every eval example exactly once."""
  config = setup.config
  totals = {'correct': 0, 'count': 0, 'loss_sum': 0.0}
  for batch in input_pipeline.eval_iterator(
      config.dataset, split=config.eval_split or setup.info.eval_split,
      data_dir=config.data_dir or None, manual_dir=config.manual_dir or None,
      global_batch_size=config.eval_batch_size, image_size=setup.image_size,
      sharding=sharding.batch_sharding(setup.mesh), resize=config.eval_resize):
    sums = jax.device_get(eval_step(params, batch))
    for key in totals:
      totals[key] += sums[key].item()
  count = max(totals['count'], 1)
  return {'accuracy': totals['correct'] / count,
          'loss': totals['loss_sum'] / count, 'num_examples': totals['count']}


def checkpoint_meta(setup: Setup) -> dict[str, Any]:
  """What a checkpoint needs beside its arrays to rebuild the model."""
  return {'config': setup.config.to_json(),
          'model_name': setup.config.model_name,
          'num_classes': setup.info.num_classes,
          'image_size': list(setup.image_size),
          'total_steps': setup.total_steps,
          'label_names': setup.info.label_names}


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Returns the final metrics, also written to `workdir/metrics.json`. Raises
  `train_utils.Preempted` after checkpointing on SIGTERM, and
  `train_utils.NonFiniteLossError` (the last good checkpoint kept) on a
  non-finite loss.
  """
  workdir = pathlib.Path(workdir)
  setup = create_setup(config)
  with contextlib.ExitStack() as stack:
    # Watch SIGTERM from the start: a preemption during compilation still
    # gets its checkpoint, after the first step.
    preemption = stack.enter_context(train_utils.PreemptionWatcher())
    writer = stack.enter_context(
        train_utils.MetricWriter(workdir, enabled=jax.process_index() == 0))
    ckpt = stack.enter_context(state_checkpoint.StateCheckpointer(
        workdir / 'checkpoints', max_to_keep=config.keep_checkpoints))
    return _train_loop(setup, workdir, preemption, writer, ckpt)


def _train_loop(setup: Setup, workdir: pathlib.Path,
                preemption: train_utils.PreemptionWatcher,
                writer: train_utils.MetricWriter,
                ckpt: state_checkpoint.StateCheckpointer) -> dict[str, Any]:
  config = setup.config
  tx = optim.create_optimizer(config, setup.total_steps)
  data_position = 0
  if ckpt.latest_step() is not None:
    # Restored straight onto the devices: no initial state is built first.
    abstract, shardings = abstract_train_state(setup, tx)
    state, meta = ckpt.restore(abstract)
    data_position = meta['data_position']
    logging.info('Resumed from step %d of %s.', int(state['step']), workdir)
  else:
    state, shardings, adaptation = create_train_state(setup, tx)
    if adaptation and jax.process_index() == 0:
      (workdir / 'adaptation.json').write_text(
          json.dumps(adaptation, indent=2))

  batch_sharding = sharding.batch_sharding(setup.mesh)
  train_step = jax.jit(make_train_step(setup, tx),
                       in_shardings=(shardings, batch_sharding),
                       out_shardings=(shardings, sharding.replicated(setup.mesh)),
                       donate_argnums=0)
  eval_step = jax.jit(make_eval_step(setup))
  train_iter = input_pipeline.train_iterator(
      config.dataset, split=config.train_split or setup.info.train_split,
      data_dir=config.data_dir or None, manual_dir=config.manual_dir or None,
      global_batch_size=config.batch_size, image_size=setup.image_size,
      sharding=batch_sharding, seed=config.seed, start_position=data_position,
      randaugment=train_utils.randaugment(config),
      mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
      global_order=config.input_global_order,
      crop_min_area=config.crop_min_area)
  progress = train_utils.Progress(setup.total_steps, config.batch_size, writer)
  step = int(state['step'])
  unchecked = None  # (step, metrics) not yet checked: read one step late
  last_eval = (None, None)  # (step, metrics) of the latest evaluation
  while step < setup.total_steps:
    state, metrics = train_step(state, next(train_iter))
    step += 1
    if unchecked:
      progress.check_finite(*unchecked, config.on_nonfinite, ckpt)
    unchecked = (step, metrics)
    log = step % config.log_every == 0 or step == setup.total_steps
    save = step % config.checkpoint_every == 0 or step == setup.total_steps
    preempted = preemption.reached(step)
    if log or save or preempted:
      # Never log or save a state whose loss has not been seen to be finite.
      values = progress.check_finite(*unchecked, config.on_nonfinite, ckpt)
      unchecked = None
    if log:
      progress.log(step, values)
    if config.eval_every and step % config.eval_every == 0:
      last_eval = (step, evaluate(setup, eval_step, state['params']))
      writer.write(step, last_eval[1], 'eval')
    if save or preempted:
      ckpt.save(step, state, {'data_position': train_iter.position,
                              **checkpoint_meta(setup)}, force=preempted)
    if preempted:
      ckpt.wait_until_finished()
      raise train_utils.Preempted(step)
  ckpt.wait_until_finished()
  if last_eval[0] == step:  # evaluated at the last step already
    eval_metrics = last_eval[1]
  else:
    eval_metrics = evaluate(setup, eval_step, state['params'])
    writer.write(step, eval_metrics, 'eval')
  result = {'step': step, **{f'eval_{k}': v for k, v in eval_metrics.items()},
            **progress.summary()}
  if jax.process_index() == 0:
    (workdir / 'metrics.json').write_text(json.dumps(result, indent=2))
  return result
