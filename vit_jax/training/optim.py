"""Optimizers and learning-rate schedules, found by name from the config.

config.optimizer: name ('sgd' | 'adamw'), learning_rate, and per optimizer
  sgd: momentum, nesterov, accumulator_dtype ('float32' | 'bfloat16')
  adamw: b1, b2, eps, weight_decay (decoupled, kernels only, scaled by the lr
    as in Loshchilov & Hutter / optax), mu_dtype
config.schedule: name ('cosine' | 'linear' | 'rsqrt' | 'constant'),
  warmup_steps, end_learning_rate (cosine / linear);
config.grad_clip_norm: global-norm clipping, 0 disables.
config.optimizer.freeze: regex of parameter paths kept fixed ('' none);
config.optimizer.lr_multipliers: 'regex:factor,...' scales those updates.
"""
from collections.abc import Callable
import re

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ('cosine', 'linear', 'rsqrt', 'constant')
OPTIMIZERS = ('sgd', 'adamw')


def create_schedule(config: ml_collections.ConfigDict, total_steps: int
                    ) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from 0 to the peak, then the named decay.

  Built once per run (`training.config` checked its fields) and shared by
  the optimizer and the step's logged learning rate.
  """
  peak = config.optimizer.learning_rate
  sched = config.schedule
  warmup = sched.warmup_steps
  decay_steps = max(total_steps - warmup, 1)
  end = sched.get('end_learning_rate', 0.0)
  if sched.name == 'cosine':
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=end / peak)
  elif sched.name == 'linear':
    decay = optax.linear_schedule(peak, end, decay_steps)
  elif sched.name == 'rsqrt':
    # lr * sqrt(warmup / step): continuous with the warmup at its end.
    decay = lambda s: peak * jnp.sqrt(warmup / jnp.maximum(s + warmup, 1))
  else:
    decay = optax.constant_schedule(peak)
  if not warmup:
    return decay
  return optax.join_schedules(
      [optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def kernels_only(params) -> object:
  """Mask: True for weight matrices/conv kernels, False for biases, norms, embeddings."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def _path(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def parse_lr_multipliers(spec: str) -> list[tuple[re.Pattern, float]]:
  """'regex:factor,regex:factor' -> [(compiled regex, factor)]."""
  rules = []
  for item in filter(None, (x.strip() for x in spec.split(','))):
    pattern, sep, factor = item.rpartition(':')
    try:
      rules.append((re.compile(pattern), float(factor)))
    except (re.error, ValueError) as e:
      raise ValueError(
          f'optimizer.lr_multipliers item {item!r} is not "regex:factor" '
          f'({e}); e.g. "Transformer/encoderblock_[0-5]/:0.1".') from None
    if not sep:
      raise ValueError(f'optimizer.lr_multipliers item {item!r} has no '
                       '":factor".')
  return rules


def param_groups(params, freeze: str, lr_multipliers: str):
  """Per-parameter label: 'frozen' or 'lr*<factor>' (first matching rule).

  Patterns are regular expressions searched in '/'-joined parameter paths,
  e.g. freeze='^(?!head/)' trains only the head (a linear probe).
  """
  try:
    frozen = re.compile(freeze) if freeze else None
  except re.error as e:
    raise ValueError(f'optimizer.freeze={freeze!r} is not a regex: {e}') from None
  rules = parse_lr_multipliers(lr_multipliers)

  def label(path, _):
    name = _path(path)
    if frozen and frozen.search(name):
      return 'frozen'
    return next((f'lr*{f}' for r, f in rules if r.search(name)), 'lr*1.0')

  return jax.tree_util.tree_map_with_path(label, params)


def create_optimizer(config: ml_collections.ConfigDict,
                     schedule: Callable[[jax.Array], jax.Array]
                     ) -> optax.GradientTransformation:
  """[Freezing ->] clipping (if any) -> the named optimizer on the schedule.

  With optimizer.freeze / optimizer.lr_multipliers the parameters are split
  into groups: frozen ones get zero gradients before clipping (so they do
  not shrink the others' clipped update) and no optimizer state; the others
  get the optimizer with their update scaled by the group's factor.
  """
  opt = config.optimizer
  if opt.name == 'sgd':
    main = optax.sgd(schedule, momentum=opt.get('momentum', 0.9) or None,
                     nesterov=opt.get('nesterov', False),
                     accumulator_dtype=jnp.dtype(
                         opt.get('accumulator_dtype', 'float32')))
  else:
    main = optax.adamw(schedule, b1=opt.get('b1', 0.9), b2=opt.get('b2', 0.999),
                       eps=opt.get('eps', 1e-8),
                       weight_decay=opt.get('weight_decay', 0.0),
                       mu_dtype=opt.get('mu_dtype', None), mask=kernels_only)
  clip = config.get('grad_clip_norm', 0.0)
  clipping = [optax.clip_by_global_norm(clip)] if clip else []
  freeze, multipliers = opt.get('freeze', ''), opt.get('lr_multipliers', '')
  if not (freeze or multipliers):
    return optax.chain(*clipping, main) if clipping else main
  groups = lambda params: param_groups(params, freeze, multipliers)
  factors = {float(f) for _, f in parse_lr_multipliers(multipliers)} | {1.0}
  transforms = {f'lr*{f}': main if f == 1.0 else optax.chain(main,
                                                             optax.scale(f))
                for f in factors}
  transforms['frozen'] = optax.set_to_zero()
  zero_frozen = optax.masked(
      optax.set_to_zero(),
      lambda p: jax.tree.map(lambda g: g == 'frozen', groups(p)))
  return optax.chain(zero_frozen, *clipping,
                     optax.multi_transform(transforms, groups))
