"""Every config value checked before anything is built: one line per mistake.

`check` runs before the dataset is opened, the model built or a step
compiled, so a typo or a value out of range costs a second, not a compile or
a whole training run (fields used only by the final evaluation included).
Each ConfigError names the field, its value and what is allowed.
"""
from collections.abc import Mapping
import copy
import fnmatch
import math
import numbers
from typing import Any

import ml_collections

from vit_jax.base import errors
from vit_jax import models
from vit_jax.evaluation import fewshot
from vit_jax.training import objectives
from vit_jax.training import optim

ON_NONFINITE = ('stop', 'skip')
RESIZE_MODES = ('resize', 'resize_crop')  # = serving.images.RESIZE_MODES
ACCUMULATOR_DTYPES = ('float32', 'bfloat16')
POSEMB_METHODS = ('bilinear', 'bicubic', 'reinit')


class ConfigError(ValueError):
  """A config value that cannot work; the message names field and remedy."""


def with_overrides(config: ml_collections.ConfigDict,
                   overrides: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with {'optimizer.name': 'sgd', ...} set, as
  `--config.<path>=...` would set them (values of the fields' types; fields
  that follow another, e.g. a warmup of 5 % of total_steps, follow it)."""
  config = copy.deepcopy(config)
  for path, value in overrides.items():
    *groups, leaf = path.split('.')
    node = config
    for group in groups:
      node = node[group]
    node[leaf] = value
  return config


_MAX_INT = 2**31 - 1


def _number(config, path: str, *, low=None, high=None, low_open=False,
            high_open=False, integer=False, what: str = '') -> None:
  node = config
  for part in path.split('.'):
    node = node[part]
  value = node
  kind = numbers.Integral if integer else numbers.Real
  ok = isinstance(value, kind) and not isinstance(value, bool)
  if ok and not integer:
    ok = math.isfinite(value)
  if ok and integer and abs(value) > _MAX_INT:
    # Steps, seeds and sizes become 32-bit integers on the devices: 1e20
    # would otherwise be an OverflowError after the dataset is built.
    raise ConfigError(f'config.{path}={value} is out of range: at most '
                      f'{_MAX_INT:,} (a 32-bit integer).')
  if ok and low is not None:
    ok = value > low if low_open else value >= low
  if ok and high is not None:
    ok = value < high if high_open else value <= high
  if not ok:
    lo = '' if low is None else ('(' if low_open else '[') + f'{low}, '
    hi = '' if high is None else f'{high}' + (')' if high_open else ']')
    rule = what or (f'in {lo}{hi}' if low is not None and high is not None
                    else f'{">" if low_open else ">="} {low}' if low is not None
                    else f'{"<" if high_open else "<="} {high}')
    kind = 'an integer ' if integer and not what else ''
    raise ConfigError(f'config.{path}={value!r} must be {kind}{rule}.')


def _choice(config, path: str, allowed) -> None:
  node = config
  for part in path.split('.'):
    node = node[part]
  if node not in allowed:
    raise ConfigError(f'config.{path}: ' + errors.unknown(
        'value', node, list(allowed)))


def _all_paths(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
  paths = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      paths += _all_paths(value, f'{prefix}{key}.')
    else:
      paths.append(prefix + key)
  return paths


def check(config: ml_collections.ConfigDict) -> None:
  """ConfigError for the first value that cannot work (module docstring)."""
  if not isinstance(config.dataset, str) or not config.dataset.strip():
    raise ConfigError(f'config.dataset={config.dataset!r} names no dataset; '
                      'give a TFDS name (e.g. cifar10, imagenet2012) or '
                      'imagefolder:PATH.')
  # Model: sizes, rates and choices are checked by the model itself.
  try:
    models.create_model(config.model_name, 1,
                     **models.options_from_json(config.model.to_dict()))
  except (ValueError, TypeError) as e:
    raise ConfigError(f'config.model_name / config.model: {e}') from None
  _number(config, 'image_size', low=0, integer=True,
          what='a positive integer (or 0 for the dataset\'s resolution)')
  _choice(config, 'eval_resize', RESIZE_MODES)
  _number(config, 'crop_min_area', low=0, high=1, low_open=True)
  _number(config, 'randaugment_layers', low=0, integer=True)
  _number(config, 'randaugment_magnitude', low=0)
  _number(config, 'mixup_alpha', low=0)
  _number(config, 'cutmix_alpha', low=0)
  _choice(config, 'pretrained.posemb_method', POSEMB_METHODS)

  _number(config, 'seed', low=0, integer=True)
  _number(config, 'batch_size', low=1, integer=True)
  _number(config, 'eval_batch_size', low=1, integer=True)
  _number(config, 'accum_steps', low=1, integer=True)
  _number(config, 'total_steps', low=0, integer=True,
          what='a positive integer (or 0 for the dataset\'s default)')
  _number(config, 'label_smoothing', low=0, high=1, high_open=True)
  _number(config, 'grad_clip_norm', low=0, what='>= 0 (0 disables clipping)')
  _choice(config, 'on_nonfinite', ON_NONFINITE)
  if 'objective' in config:  # configs written before self-supervision
    _choice(config, 'objective', objectives.OBJECTIVES)
  _check_optimizer(config)

  _number(config, 'mesh.fsdp', low=1, integer=True)
  if config.mesh.data != -1:
    _number(config, 'mesh.data', low=1, integer=True,
            what='a positive integer or -1 (all devices fsdp leaves)')
  _number(config, 'mesh.fsdp_min_size', low=0, integer=True)
  dist = config.distributed
  _number(config, 'distributed.num_processes', low=1, integer=True)
  _number(config, 'distributed.process_id', low=0,
          high=dist.num_processes - 1, integer=True,
          what=f'in [0, num_processes={dist.num_processes})')
  _number(config, 'distributed.heartbeat_timeout_s', low=1, integer=True)
  _number(config, 'distributed.wait_s', low=1, integer=True)

  _number(config, 'log_every', low=1, integer=True)
  _number(config, 'eval_every', low=0, integer=True,
          what='>= 0 (0: evaluate at the end only)')
  _number(config, 'checkpoint_every', low=1, integer=True)
  _number(config, 'keep_checkpoints', low=1, integer=True,
          what='>= 1 (at least the newest checkpoint is kept)')
  _check_fewshot(config)
  _check_resume_accept(config)


def _check_fewshot(config: ml_collections.ConfigDict) -> None:
  if 'fewshot' not in config:  # configs written before few-shot evaluation
    return
  try:
    fewshot.parse_shots(config.fewshot.shots)
  except ValueError as e:
    raise ConfigError(f'config.fewshot.shots={config.fewshot.shots!r} '
                      f'{e}') from None
  _number(config, 'fewshot.every_steps', low=0, integer=True,
          what='>= 0 (0: with each evaluation)')
  _number(config, 'fewshot.seed', low=0, integer=True)
  _number(config, 'fewshot.l2_reg', low=0, low_open=True)


def _check_optimizer(config: ml_collections.ConfigDict) -> None:
  opt, sched = config.optimizer, config.schedule
  if opt.name not in optim.OPTIMIZERS:
    raise ConfigError(errors.unknown('optimizer', opt.name, optim.OPTIMIZERS))
  if sched.name not in optim.SCHEDULES:
    raise ConfigError(errors.unknown('schedule', sched.name, optim.SCHEDULES))
  _number(config, 'optimizer.learning_rate', low=0, low_open=True,
          what='> 0 (to keep weights fixed, use optimizer.freeze)')
  if opt.name == 'sgd':
    _number(config, 'optimizer.momentum', low=0, high=1, high_open=True)
    _choice(config, 'optimizer.accumulator_dtype', ACCUMULATOR_DTYPES)
  else:
    _number(config, 'optimizer.b1', low=0, high=1, high_open=True)
    _number(config, 'optimizer.b2', low=0, high=1, high_open=True)
    _number(config, 'optimizer.eps', low=0, low_open=True)
    _number(config, 'optimizer.weight_decay', low=0)
    _choice(config, 'optimizer.mu_dtype', ACCUMULATOR_DTYPES)
  _number(config, 'schedule.warmup_steps', low=0, integer=True)
  _number(config, 'schedule.end_learning_rate', low=0,
          high=opt.learning_rate, what=f'in [0, optimizer.learning_rate='
          f'{opt.learning_rate}]')
  try:
    optim.param_groups({}, opt.freeze, opt.lr_multipliers)  # syntax only
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_steps(config: ml_collections.ConfigDict, total_steps: int) -> None:
  """The schedule fits the run once total_steps is known (0 -> the preset)."""
  warmup = config.schedule.warmup_steps
  if warmup > total_steps:
    raise ConfigError(
        f'config.schedule.warmup_steps={warmup} is more than the run\'s '
        f'total_steps={total_steps}; set --config.schedule.warmup_steps to at '
        f'most {total_steps}.')


def _check_resume_accept(config: ml_collections.ConfigDict) -> None:
  paths = _all_paths(config)
  for pattern in filter(None, (p.strip() for p in
                               config.resume_accept.split(','))):
    if not any(fnmatch.fnmatchcase(p, pattern) for p in paths):
      raise ConfigError(f'config.resume_accept: no config field matches '
                        f'{pattern!r}.{errors.did_you_mean(pattern, paths)}')


def check_batch_sizes(config: ml_collections.ConfigDict, num_devices: int,
                      num_processes: int) -> None:
  """Each device must get whole micro-batches, each process whole batches."""
  per = num_devices * config.accum_steps
  if config.batch_size % per:
    raise ConfigError(
        f'config.batch_size={config.batch_size} must be divisible by the '
        f'{num_devices} devices x accum_steps={config.accum_steps} = {per}.')
  if config.eval_batch_size % num_devices or (
      config.eval_batch_size % num_processes):
    raise ConfigError(
        f'config.eval_batch_size={config.eval_batch_size} must be divisible '
        f'by the {num_devices} devices and {num_processes} processes.')
