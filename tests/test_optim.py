"""Optimizers, schedules and sharding rules found by name from the config."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import common
from vit_jax.parallel import mesh as sharding
from vit_jax.training import config as config_lib
from vit_jax.training import optim


def config_with(**overrides):
  config = common.get_config()
  config.optimizer.learning_rate = 0.1
  config.schedule.warmup_steps = 10
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


@pytest.mark.parametrize('name', optim.SCHEDULES)
def test_schedules_warm_up_linearly_then_decay(name):
  schedule = optim.create_schedule(config_with(schedule__name=name), 110)
  values = np.array([schedule(s) for s in range(111)])
  np.testing.assert_allclose(values[:11], np.linspace(0, 0.1, 11), rtol=1e-5)
  decay = values[10:]
  if name == 'constant':
    np.testing.assert_allclose(decay, 0.1, rtol=1e-6)
  else:
    assert np.all(np.diff(decay) <= 1e-9) and decay[-1] < 0.1
  if name in ('cosine', 'linear'):
    assert decay[-1] == pytest.approx(0.0, abs=1e-6)
  if name == 'cosine':
    assert values[60] == pytest.approx(0.05, rel=1e-4)  # half-way: half lr
  if name == 'rsqrt':
    assert values[40] == pytest.approx(0.1 * np.sqrt(10 / 40), rel=1e-4)


def test_adamw_decays_kernels_only():
  params = {'dense': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'norm': {'scale': jnp.ones(2)}, 'cls': jnp.ones((1, 1, 2))}
  config = config_with(optimizer__name='adamw', optimizer__weight_decay=0.5,
                       schedule__name='constant', schedule__warmup_steps=0)
  config.grad_clip_norm = 0.0
  tx = optim.create_optimizer(config, optim.create_schedule(config, 10))
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero_grads, tx.init(params), params)
  np.testing.assert_allclose(updates['dense']['kernel'], -0.1 * 0.5)
  for leaf in (updates['dense']['bias'], updates['norm']['scale'],
               updates['cls']):
    np.testing.assert_array_equal(leaf, 0.0)


def test_sgd_momentum_with_bfloat16_accumulator_and_clipping():
  params = {'w': jnp.ones(4)}
  config = config_with(optimizer__accumulator_dtype='bfloat16',
                       schedule__name='constant', schedule__warmup_steps=0)
  config.grad_clip_norm = 1.0
  tx = optim.create_optimizer(config, optim.create_schedule(config, 10))
  state = tx.init(params)
  momentum = [x for x in jax.tree.leaves(state) if x.shape == (4,)]
  assert momentum and all(x.dtype == jnp.bfloat16 for x in momentum)
  updates, _ = tx.update({'w': jnp.full(4, 10.0)}, state, params)
  # Clipped to global norm 1, then scaled by -lr.
  np.testing.assert_allclose(updates['w'], -0.1 * 0.5, rtol=1e-2)


@pytest.mark.parametrize('field,value,match', [
    ('optimizer__name', 'lamb', r"Unknown optimizer 'lamb'"),
    ('schedule__name', 'step', r"Unknown schedule 'step'.*cosine"),
])
def test_unknown_names(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.check(config_with(**{field: value}))


def test_fsdp_spec_splits_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((768, 3072), 4, 1024) == P(None, 'fsdp')
  assert sharding.fsdp_spec((3, 768, 10), 4, 1024) == P(None, 'fsdp', None)
  assert sharding.fsdp_spec((10, 7), 4, 1) == P()  # nothing divisible
  assert sharding.fsdp_spec((768,), 4, 1024) == P()  # below the threshold
  assert sharding.fsdp_spec((768, 3072), 1, 1) == P()  # no fsdp axis


def test_mesh_errors_name_the_sizes():
  with pytest.raises(ValueError, match=r'data=4 x fsdp=4 needs 16 devices '
                     r'but 8 are available'):
    sharding.create_mesh(4, 4)
  with pytest.raises(ValueError, match=r'mesh.fsdp=3 does not divide the 8'):
    sharding.create_mesh(-1, 3)
  mesh = sharding.create_mesh(-1, 2)
  assert dict(mesh.shape) == {'data': 4, 'fsdp': 2}


@pytest.mark.parametrize('module,arg', [
    ('pretrain', 'cifar10_quick'), ('pretrain', 'cifar10'),
    ('pretrain', 'imagenet_s16'), ('finetune', 'cifar10,ViT-B_16'),
    ('finetune', 'imagenet2012,R50+ViT-B_16'),
    ('finetune', 'cifar10,pretrain:cifar10'),
])
def test_shipped_configs_build_model_and_optimizer(module, arg):
  import importlib  # pylint: disable=g-import-not-at-top
  from vit_jax import models  # pylint: disable=g-import-not-at-top
  config = importlib.import_module(f'configs.{module}').get_config(arg)
  config_lib.check(config)
  config_lib.check_steps(config, config.total_steps)
  model = models.create_model(config.model_name, 10,
                              **models.options_from_json(config.model))
  size = (config.image_size, config.image_size)
  model.check_input_shape((1, *size, 3))
  schedule = optim.create_schedule(config, config.total_steps)
  tx = optim.create_optimizer(config, schedule)
  assert schedule(config.schedule.warmup_steps) == pytest.approx(
      config.optimizer.learning_rate, rel=1e-3)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *size, 3)))
  jax.eval_shape(tx.init, params['params'])
  assert config.batch_size % 8 == 0 and config.eval_batch_size % 8 == 0


def test_freeze_and_lr_multipliers_group_parameters():
  params = {'head': {'kernel': jnp.ones((2, 2)), 'bias': jnp.ones(2)},
            'Transformer': {'encoderblock_0': {'w': jnp.ones(2)},
                            'encoderblock_1': {'w': jnp.ones(2)}},
            'embedding': {'kernel': jnp.ones(2)}}
  config = config_with(optimizer__name='sgd', optimizer__momentum=0.0,
                       optimizer__freeze='^embedding/',
                       optimizer__lr_multipliers='encoderblock_0/:0.1',
                       schedule__name='constant', schedule__warmup_steps=0)
  config.grad_clip_norm = 0.0
  tx = optim.create_optimizer(config, optim.create_schedule(config, 10))
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates['head']['kernel'], -0.1)
  np.testing.assert_allclose(updates['Transformer']['encoderblock_0']['w'],
                             -0.01, rtol=1e-6)
  np.testing.assert_allclose(updates['Transformer']['encoderblock_1']['w'],
                             -0.1)
  np.testing.assert_array_equal(updates['embedding']['kernel'], 0.0)


def test_linear_probe_clips_on_the_head_gradient_only():
  params = {'head': {'kernel': jnp.ones(2)}, 'body': {'kernel': jnp.ones(2)}}
  config = config_with(optimizer__name='sgd', optimizer__momentum=0.0,
                       optimizer__freeze='^(?!head/)',
                       schedule__name='constant', schedule__warmup_steps=0)
  config.grad_clip_norm = 1.0
  tx = optim.create_optimizer(config, optim.create_schedule(config, 10))
  grads = {'head': {'kernel': jnp.array([0.3, 0.4])},
           'body': {'kernel': jnp.array([100.0, 100.0])}}
  updates, state = tx.update(grads, tx.init(params), params)
  # Norm 0.5 < 1: the frozen body's huge gradient must not trigger clipping.
  np.testing.assert_allclose(updates['head']['kernel'], [-0.03, -0.04],
                             rtol=1e-6)
  np.testing.assert_array_equal(updates['body']['kernel'], 0.0)


@pytest.mark.parametrize('field,value,match', [
    ('optimizer__freeze', '(', r"optimizer.freeze='\(' is not a regex"),
    ('optimizer__lr_multipliers', 'encoder:x',
     r"item 'encoder:x' is not \"regex:factor\""),
])
def test_bad_group_patterns(field, value, match):
  with pytest.raises(ValueError, match=match):
    config_lib.check(config_with(**{field: value}))
