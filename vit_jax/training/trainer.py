"""Training and evaluation: one jitted step on a device mesh, resumable.

Reads top to bottom: the train state (from scratch, from pretrained weights
or restored), evaluation, what a checkpoint stores beside its arrays, the
resume checks, then `train_and_evaluate`: the workdir's lock, and the loop.
The setup derived from the config is in `setup`, the jitted programs in
`programs` (the step functions in `steps`), the state's layout in `state`.
"""
import contextlib
import json
import pathlib
import time
from typing import Any

from absl import logging
import jax
import ml_collections

from vit_jax.base import files
from vit_jax.data import pipeline
from vit_jax.evaluation import classification
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.runs import lock as lock_lib
from vit_jax.runs import paths
from vit_jax.runs import reader
from vit_jax.runs import resume
from vit_jax.runs import state_checkpoint
from vit_jax.training import fewshot as fewshot_lib
from vit_jax.training import finetune
from vit_jax.training import guards
from vit_jax.training import memory
from vit_jax.training import programs
from vit_jax.training import progress as progress_lib
from vit_jax.training import setup as setup_lib
from vit_jax.training import state as state_lib


def create_train_state(setup: setup_lib.Setup) -> tuple[state_lib.State, Any,
                                               dict[str, Any] | None]:
  """(initial state, its shardings, adaptation record or None).

  With config.pretrained.path the parameters come from those weights,
  adapted to this model (`finetune`), and the record says what changed.
  """
  config = setup.config
  init = programs.init_fn(setup)
  _, shardings = programs.abstract_train_state(setup)
  if not config.pretrained.path:
    return state_lib.create_state(init, shardings, config.seed), shardings, None
  # Replicated, hence readable on every host, for the head's fresh init.
  fresh = jax.jit(lambda rng: init(rng)['params'],
                  out_shardings=mesh_lib.replicated(setup.mesh))(
                      jax.random.key(config.seed))
  params, record = finetune.pretrained_params(
      config.pretrained.path, jax.device_get(fresh), setup.model,
      setup.image_size, config.pretrained.posemb_method)
  logging.info('Initialised from %s: %s', config.pretrained.path, record)
  return (state_lib.create_state(init, shardings, config.seed, params),
          shardings, record)


def evaluate(setup: setup_lib.Setup, eval_step, params) -> dict[str, Any]:
  """The objective's metrics over every eval example once (classification:
  top-1/top-5 accuracy, loss, per class)."""
  config = setup.config
  batches = pipeline.eval_iterator(
      config.dataset, split=setup.eval_split,
      data_dir=config.data_dir or None, manual_dir=config.manual_dir or None,
      global_batch_size=config.eval_batch_size, image_size=setup.image_size,
      sharding=mesh_lib.batch_sharding(setup.mesh), resize=config.eval_resize)
  totals = classification.run(eval_step, params, batches, len(batches))
  return setup.objective.summarize(totals, setup.info.label_names)


def checkpoint_meta(setup: setup_lib.Setup, examples_seen: int,
                    history: dict[str, list]) -> dict[str, Any]:
  """What a checkpoint needs beside its arrays: the model, the data position
  (in examples), the history so far."""
  return {'config': setup.config.to_json(),
          'model_name': setup.config.model_name,
          'num_classes': setup.info.num_classes,
          'image_size': list(setup.image_size),
          'total_steps': setup.total_steps,
          'label_names': setup.info.label_names,
          'examples_seen': examples_seen,
          'processes': jax.process_count(),
          'history': history}


def _examples_seen(meta: dict[str, Any]) -> int:
  if 'examples_seen' in meta:
    return meta['examples_seen']
  # Checkpoints before positions were counted in examples: batches x size.
  old = json.loads(meta['config'])
  return meta['data_position'] * old['batch_size']


def _check_resume(setup: setup_lib.Setup, workdir: pathlib.Path) -> dict | None:
  """The newest checkpoint's meta, after refusing config changes that matter."""
  directory = workdir / paths.CHECKPOINTS
  steps_on_disk = reader.complete_steps(directory)
  if not steps_on_disk:
    return None
  meta = reader.read_meta(directory / str(steps_on_disk[-1]))
  extra = {}
  processes = meta.get('processes', jax.process_count())
  if processes != jax.process_count() and not setup.config.input_global_order:
    # Each process reads its own part of the split: the parts move.
    extra['processes'] = (processes, jax.process_count())
  accepted = resume.check(meta['config'], setup.config, str(workdir), extra)
  if accepted:
    logging.warning('Resuming with accepted config changes: %s.',
                    ', '.join(accepted))
  return meta


def _finished_result(workdir: pathlib.Path, meta: dict | None,
                     total_steps: int) -> dict | None:
  """metrics.json of a run that is done (its last step saved and evaluated)."""
  path = workdir / paths.METRICS
  if meta is None or not path.is_file():
    return None
  try:
    result = files.read_json(path, 'metrics')
  except ValueError:
    return None  # damaged: evaluate again
  last_step = reader.complete_steps(workdir / paths.CHECKPOINTS)[-1]
  if (isinstance(result, dict) and result.get('finished')
      and result.get('step') == last_step and last_step >= total_steps):
    return result
  return None


def train_and_evaluate(config: ml_collections.ConfigDict,
                       workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Returns the final metrics, also written to `workdir/metrics.json`. A run
  that finished already returns its result and changes nothing. Raises
  `guards.Preempted` after checkpointing on SIGTERM,
  `guards.NonFiniteLossError` (the last good checkpoint kept) on a
  non-finite loss, `lock.WorkdirBusyError` while another run holds the
  workdir, and ValueError subclasses for bad input, before compiling.
  """
  with setup_lib.before_compiling():
    paths.prepare_for_writing(workdir, create=False)
    setup = setup_lib.create_setup(config)
    # Its datasets and splits are checked with the run's own: before the
    # workdir is locked or written.
    fewshot = fewshot_lib.from_config(config, setup.model, setup.mesh,
                                      setup.image_size)
    # Created only now: a refused config leaves no empty workdir behind.
    workdir = paths.prepare_for_writing(workdir)
  with contextlib.ExitStack() as stack:
    if jax.process_index() == 0:
      lock = stack.enter_context(lock_lib.WorkdirLock(workdir))
      if lock.previous:
        logging.warning('The previous run on %s (%s) ended without releasing '
                        'it (killed?); resuming from its newest checkpoint.',
                        workdir, lock_lib.describe(lock.previous))
    with setup_lib.before_compiling():
      meta = _check_resume(setup, workdir)
    finished = _finished_result(workdir, meta, setup.total_steps)
    if finished:
      logging.info('This run finished already; nothing to do (use another '
                   '--workdir to train again): %s',
                   progress_lib.result_line(finished))
      return finished
    _log_start(setup, workdir)
    # Compiled and its memory checked before the run writes anything but its
    # lock: a run that cannot fit leaves the workdir as it found it.
    abstract, shardings = programs.abstract_train_state(setup)
    compiled_step = _compile_checked(setup, abstract, shardings)
    if jax.process_index() == 0:
      files.write_json(workdir / paths.CONFIG, setup_lib.resolved_config(setup))
    preemption = stack.enter_context(guards.PreemptionWatcher())
    writer = stack.enter_context(progress_lib.MetricWriter(
        workdir, enabled=jax.process_index() == 0))
    ckpt = stack.enter_context(state_checkpoint.StateCheckpointer(
        workdir / paths.CHECKPOINTS, max_to_keep=config.keep_checkpoints))
    return _train_loop(setup, workdir, preemption, writer, ckpt, fewshot,
                       abstract, compiled_step)


def _log_start(setup: setup_lib.Setup, workdir: pathlib.Path) -> None:
  logging.info('Config (also in %s):\n%s', workdir / paths.CONFIG,
               setup.config)
  mesh = ' x '.join(f'{name} {size}' for name, size in setup.mesh.shape.items())
  params = jax.eval_shape(programs.init_fn(setup),
                          jax.random.key(0))['params']
  objective = setup.config.get('objective', 'classification')
  logging.info(
      '%s (%s params) on %s, %dx%d px, %d classes, objective %s; %d steps of '
      'batch %d; mesh %s over %d %s device(s) in %d process(es).',
      setup.config.model_name,
      f'{sum(x.size for x in jax.tree.leaves(params)):,}',
      setup.config.dataset, *setup.image_size, setup.info.num_classes,
      objective,
      setup.total_steps, setup.config.batch_size, mesh, jax.device_count(),
      jax.default_backend(), jax.process_count())


def _compile_checked(setup: setup_lib.Setup, abstract: state_lib.State,
                     shardings: Any):
  """The train step compiled from abstract arguments, after XLA's memory of
  it and of the eval step is checked against the devices' (`memory`):
  before any state, batch or input pipeline exists."""
  logging.info('Compiling the train step...')
  start = time.time()
  compiled = programs.train_step(setup, shardings).lower(
      abstract, programs.abstract_train_batch(setup)).compile()
  logging.info('Compiled in %.1f s.', time.time() - start)
  state_bytes = memory.shard_bytes(abstract)
  params_bytes = memory.shard_bytes(abstract['params'])
  # Every run ends with an evaluation: its step must fit beside the state.
  eval_compiled = programs.eval_step(setup).lower(
      abstract['params'], programs.abstract_eval_batch(setup)).compile()
  needs = {'train': memory.train_need(compiled, state_bytes),
           'eval': memory.eval_need(eval_compiled, state_bytes, params_bytes)}
  with setup_lib.before_compiling():
    memory.check(needs, setup.mesh, setup.config)
  return compiled


def _evaluations_due(config: ml_collections.ConfigDict, step: int,
                     fewshot) -> tuple[bool, bool]:
  """(classification, few-shot) evaluations due after `step` in the loop."""
  run_eval = bool(config.eval_every) and step % config.eval_every == 0
  every = config.fewshot.every_steps if fewshot else 0
  run_fewshot = fewshot is not None and (
      step % every == 0 if every else run_eval)
  return run_eval, run_fewshot


def _train_loop(setup: setup_lib.Setup, workdir: pathlib.Path,
                preemption: guards.PreemptionWatcher,
                writer: progress_lib.MetricWriter,
                ckpt: state_checkpoint.StateCheckpointer,
                fewshot: fewshot_lib.FewShotEvaluator | None,
                abstract: state_lib.State, compiled_step
                ) -> dict[str, Any]:
  config = setup.config
  examples_seen, history = 0, None
  with setup_lib.before_compiling():
    if ckpt.latest_step() is not None:
      # Restored straight onto the devices: no initial state is built first.
      state, meta = ckpt.restore(abstract)
      examples_seen = _examples_seen(meta)
      history = meta.get('history')
      logging.info('Resumed from step %d of %s.', int(state['step']), workdir)
    else:
      state, shardings, adaptation = create_train_state(setup)
      if adaptation and jax.process_index() == 0:
        files.write_json(workdir / paths.ADAPTATION, adaptation)

  batch_sharding = mesh_lib.batch_sharding(setup.mesh)
  eval_step = programs.eval_step(setup)

  def evaluate_all(params, classify: bool, linear: bool) -> dict[str, Any]:
    metrics = {}
    if classify:
      metrics.update(setup.objective.scalars(
          evaluate(setup, eval_step, params)))
    if linear:
      metrics.update(fewshot(params))
    return metrics

  train_iter = pipeline.train_iterator(
      config.dataset, split=config.train_split or setup.info.train_split,
      data_dir=config.data_dir or None, manual_dir=config.manual_dir or None,
      global_batch_size=config.batch_size, image_size=setup.image_size,
      sharding=batch_sharding, seed=config.seed, start_example=examples_seen,
      randaugment=((config.randaugment_layers, config.randaugment_magnitude)
                   if config.randaugment_layers else None),
      mixup_alpha=config.mixup_alpha, cutmix_alpha=config.cutmix_alpha,
      global_order=config.input_global_order,
      crop_min_area=config.crop_min_area)
  progress = progress_lib.Progress(setup.total_steps, config.batch_size,
                                   writer, history)
  guard = guards.NonFiniteGuard(config.on_nonfinite)
  step = int(state['step'])
  unchecked = None  # (step, metrics) not yet seen on the host: one step late

  def check(pending):
    """Fetches a step's metrics; stops the run per config.on_nonfinite."""
    at, metrics = pending
    values = {k: jax.device_get(v).item() for k, v in metrics.items()}
    finite = values.pop('finite')
    if not guard.accept(at, finite, values):
      ckpt.wait_until_finished()  # the save in flight is a good one: keep it
      raise guard.error(at, values, ckpt.latest_step())
    progress.record(values)

  while step < setup.total_steps:
    state, metrics = compiled_step(state, next(train_iter))
    step += 1
    if unchecked:
      check(unchecked)
    unchecked = (step, metrics)
    log = step % config.log_every == 0 or step == setup.total_steps
    save = step % config.checkpoint_every == 0 or step == setup.total_steps
    preempted = preemption.reached(step)
    if log or save or preempted:
      # Never log or save a state whose loss has not been seen to be finite.
      check(unchecked)
      unchecked = None
    if log:
      progress.log(step)
    run_eval, run_fewshot = _evaluations_due(config, step, fewshot)
    if run_eval or run_fewshot:
      progress.evaluated(step, evaluate_all(
          state['params'], run_eval, run_fewshot))
      logging.info('eval step %d: %s', step,
                   json.dumps(progress.eval_history[-1][1]))
    if save or preempted:
      ckpt.save(step, state, checkpoint_meta(setup, train_iter.examples,
                                             progress.history()),
                force=preempted)
    if preempted:
      ckpt.wait_until_finished()
      raise guards.Preempted(step)
  ckpt.wait_until_finished()
  done = (progress.eval_history[-1][1] if progress.eval_history and
          progress.eval_history[-1][0] == step else {})  # evaluated here
  missing_eval = setup.objective.headline not in done
  missing_fewshot = fewshot is not None and not any(
      k.startswith('fewshot_') for k in done)
  if missing_eval or missing_fewshot:
    logging.info('Evaluating on %s (%s)...', config.dataset, setup.eval_split)
    eval_metrics = {**done, **evaluate_all(state['params'], missing_eval,
                                           missing_fewshot)}
    if done:
      progress.eval_history.pop()
    progress.evaluated(step, eval_metrics)
  else:
    eval_metrics = done
  result = {'step': step, 'finished': True,
            **{f'eval_{k}': v for k, v in eval_metrics.items()},
            **progress.summary(), 'skipped_steps': guard.skipped}
  if jax.process_index() == 0:
    files.write_json(workdir / paths.METRICS, result)
  logging.info('Done: %s. Metrics in %s.', progress_lib.result_line(result),
               workdir / paths.METRICS)
  return result
