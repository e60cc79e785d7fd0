"""Masked patch prediction (the paper's section 4.6): corruption, targets,
loss, and the one trainer running it on real CIFAR-10."""
import json
import signal
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import runs
from configs import common
from vit_jax import models
from vit_jax import sources
from vit_jax.models import masked
from vit_jax.training import config as config_lib
from vit_jax.training import masked_patches
from vit_jax.training import objectives
from vit_jax.training import setup as setup_lib
from vit_jax.training import trainer as train

MPP = {'objective': 'masked_patches', 'label_smoothing': 0.0}


def _objective(target='color', bits=3, color_grid=1, image_size=(16, 16)):
  cfg = common.get_config().masked_patches
  cfg.update(dict(target=target, bits=bits, color_grid=color_grid))
  model = models.create_model('ViT-Ti_16', 10, patch_size=4, hidden_size=16,
                              num_layers=1, num_heads=2, mlp_dim=32)
  return masked_patches.MaskedPatches(model, image_size, cfg)


def test_corruption_follows_the_stated_proportions():
  corruption = masked_patches.Corruption()
  n = 64
  kind, source = jax.jit(lambda k: corruption.sample_batch(k, 500, n))(
      jax.random.key(1))
  kind, source = np.asarray(kind), np.asarray(source)
  # Exactly half of every image's patches are corrupted.
  assert ((kind != masked.KEEP).sum(axis=1) == n // 2).all()
  chosen = kind[kind != masked.KEEP]
  for value, p in [(masked.MASK, 0.8), (masked.RANDOM, 0.1),
                   (masked.UNCHANGED, 0.1)]:
    share = np.mean(chosen == value)
    sigma = np.sqrt(p * (1 - p) / chosen.size)
    assert abs(share - p) < 4 * sigma, (value, share)
  # Which patches: uniform over positions.
  per_position = (kind != masked.KEEP).mean(axis=0)
  assert np.abs(per_position - 0.5).max() < 4 * np.sqrt(0.25 / 500) + 0.02
  # A random patch takes another patch of its own image.
  assert (source != np.arange(n)).all() and source.min() >= 0
  assert source.max() < n


def test_corruption_comes_from_each_examples_own_key():
  corruption = masked_patches.Corruption()
  key = jax.random.key(7)
  eight = corruption.sample_batch(key, 8, 16)
  three = corruption.sample_batch(key, 3, 16)
  # Example i's corruption does not depend on the batch around it.
  for a, b in zip(eight, three):
    np.testing.assert_array_equal(np.asarray(a)[:3], np.asarray(b))
  one = corruption.sample(jax.random.fold_in(key, 5), 16)
  np.testing.assert_array_equal(np.asarray(eight[0])[5], np.asarray(one[0]))
  # Same key, same draw; another step's key, another draw.
  np.testing.assert_array_equal(corruption.sample_batch(key, 8, 16)[0],
                                eight[0])
  other = corruption.sample_batch(jax.random.key(8), 8, 16)[0]
  assert (np.asarray(other) != np.asarray(eight[0])).any()


def test_class_token_is_never_corrupted_and_patches_are_as_told():
  objective = _objective()
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1)
  params = objective.init(jax.random.key(1), images)
  assert set(params) >= {'cls', 'embedding', 'Transformer', masked.MASK_TOKEN,
                         masked.HEAD}
  assert 'head' not in params
  kind = jnp.array([[masked.MASK, masked.RANDOM, masked.UNCHANGED,
                     masked.KEEP] * 4] * 2)
  source = jnp.array([[(i + 5) % 16 for i in range(16)]] * 2)
  _, inter = objective.model.apply(
      {'params': params}, images, kind, source,
      capture_intermediates=lambda mdl, _: mdl.name == 'posembed_input')
  # The ViT's modules sit at the top level (shared scope).
  tokens = inter['intermediates']['Transformer']['posembed_input'][
      '__call__'][0]
  pe = params['Transformer']['posembed_input']['pos_embedding'][0]
  patches = (masked_patches.patches_of(images, (4, 4)).reshape(2, 16, -1)
             @ params['embedding']['kernel'].reshape(-1, 16)
             + params['embedding']['bias'])
  np.testing.assert_allclose(tokens[:, 0], jnp.broadcast_to(
      params['cls'][0, 0] + pe[0], (2, 16)), atol=1e-6)
  expected = jnp.where(
      (kind == masked.MASK)[..., None], params[masked.MASK_TOKEN][0],
      jnp.where((kind == masked.RANDOM)[..., None],
                jnp.take_along_axis(patches, source[..., None], 1), patches))
  np.testing.assert_allclose(tokens[:, 1:], expected + pe[1:], atol=1e-5)


def test_color_targets_are_the_bins_of_each_cells_mean_colour():
  # One 8x8 image, 4x4 patches: a patch of one colour per quadrant, values
  # chosen away from the bin edges, as pixel values in [0, 1].
  rgb = np.array([[[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]],
                  [[0.30, 0.55, 0.95], [0.10, 0.9, 0.40]]])
  image = np.kron(rgb, np.ones((4, 4, 1)))[None] * 2 - 1
  got = masked_patches.color_targets(jnp.asarray(image), (4, 4), 3, 1)
  bins = np.floor(rgb.reshape(4, 3) * 8).clip(0, 7).astype(int)
  np.testing.assert_array_equal(
      got[0, :, 0], (bins[:, 0] * 8 + bins[:, 1]) * 8 + bins[:, 2])
  assert got[0, 1, 0] == 511 and got[0, 0, 0] == 0
  # 2x2 cells per patch: each cell its own mean; 1 bit per channel.
  cells = np.zeros((1, 4, 4, 3))
  cells[0, 2:, 2:] = 1.0  # the patch's bottom-right cell white
  cells[0, :2, 2:, 0] = 0.75  # top-right cell red
  got = masked_patches.color_targets(jnp.asarray(cells * 2 - 1), (4, 4), 1, 2)
  np.testing.assert_array_equal(got[0, 0], [0, 4, 0, 7])
  # The mean of a mixed patch, not its majority.
  mixed = np.zeros((1, 4, 4, 3))
  mixed[0, :, :1] = 1.0  # a quarter white: mean 0.25 -> bin 2 of 8
  got = masked_patches.color_targets(jnp.asarray(mixed * 2 - 1), (4, 4), 3, 1)
  assert int(got[0, 0, 0]) == (2 * 8 + 2) * 8 + 2


def test_the_loss_counts_corrupted_patches_only():
  objective = _objective()
  images = jax.random.uniform(jax.random.key(0), (4, 16, 16, 3), minval=-1)
  params = objective.init(jax.random.key(1), images)
  # A non-zero head: every patch has its own loss.
  params[masked.HEAD]['kernel'] = jax.random.normal(
      jax.random.key(2), params[masked.HEAD]['kernel'].shape)
  batch = objective.prepare({'image': images}, jax.random.key(3))
  per_patch, _ = objective.per_patch(params, batch, train=False)
  corrupted = np.asarray(batch['patch_kind'] != masked.KEEP)
  loss = objective.loss(params, batch, jax.random.key(4))
  np.testing.assert_allclose(loss, np.asarray(per_patch)[corrupted].mean(),
                             rtol=1e-5)
  assert abs(np.asarray(per_patch)[~corrupted].mean() - float(loss)) > 1e-3


def test_pixel_targets_regress_the_patch():
  objective = _objective(target='pixels')
  images = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3), minval=-1)
  params = objective.init(jax.random.key(1), images)
  assert params[masked.HEAD]['kernel'].shape == (16, 4 * 4 * 3)
  batch = objective.prepare({'image': images}, jax.random.key(3))
  per_patch, _ = objective.per_patch(params, batch, train=False)
  # A zero head predicts 0: the loss is the patch's mean squared pixel.
  target = masked_patches.patches_of(images, (4, 4)).reshape(2, 16, -1)
  np.testing.assert_allclose(per_patch, jnp.mean(target ** 2, -1), rtol=1e-5)


@pytest.mark.parametrize('overrides, match', [
    ({'objective': 'mae'}, r"config.objective: Unknown value 'mae'"),
    ({'label_smoothing': 0.1}, r'masked_patches uses no labels'),
    ({'label_smoothing': 0.0, 'mixup_alpha': 0.2},
     r'masked_patches uses no labels'),
    ({'label_smoothing': 0.0, 'masked_patches.color_grid': 3},
     r'color_grid=3 must be a positive integer dividing the patch \(8x8'),
    ({'label_smoothing': 0.0, 'masked_patches.mask_rate': 0.95},
     r'with a sum <= 1'),
    ({'label_smoothing': 0.0, 'masked_patches.target': 'depth'},
     r"target='depth' is not supported; allowed: color, pixels"),
    ({'label_smoothing': 0.0, 'model_name': 'BiT-R50x1',
      'model.resnet_layers': (1, 1, 1, 1)}, r'needs a Vision Transformer'),
])
def test_bad_objective_configs_fail_before_compiling(tfds_data_dir, overrides,
                                                     match):
  overrides = {'objective': 'masked_patches', **overrides}
  if 'model_name' in overrides:  # BiT takes none of TINY's ViT sizes
    config = runs.tiny_config(tfds_data_dir)
    for name in ('num_layers', 'hidden_size', 'mlp_dim', 'num_heads',
                 'patch_size'):
      config.model[name] = None
    config = config_lib.with_overrides(config, overrides)
  else:
    config = runs.tiny_config(tfds_data_dir, **overrides)
  with pytest.raises(ValueError, match=match):
    setup_lib.create_setup(config)


def test_a_tiny_run_on_real_cifar10_lowers_the_masked_patch_loss(
    tfds_data_dir, tmp_path):
  config = runs.tiny_config(tfds_data_dir, total_steps=60, log_every=5,
                            checkpoint_every=60, **MPP,
                            **{'fewshot.datasets': 'cifar10',
                               'fewshot.shots': '2',
                               'fewshot.test_split': 'test[:100]'})
  result = train.train_and_evaluate(config, tmp_path / 'mpp')
  history = runs.losses(result)
  # ln(512) = 6.24 at the zero-initialised head.
  assert abs(history[0] - np.log(512)) < 0.2, history
  assert history[-3:].mean() < history[0] - 1.0, history
  saved = json.loads((tmp_path / 'mpp' / 'metrics.json').read_text())
  assert 0 < saved['eval_masked_patch_loss'] < history[0]
  assert 0 < saved['eval_masked_patch_accuracy'] < 1
  assert 'eval_accuracy' not in saved
  assert 'eval_fewshot_cifar10_2shot' in saved
  assert saved['eval_num_examples'] == 200


def test_data_parallel_fsdp_and_one_device_give_the_same_trajectory(
    tfds_data_dir, tmp_path):
  results = {}
  for name, data, fsdp in [('single', 1, 1), ('dp8', 8, 1), ('fsdp8', 1, 8)]:
    config = runs.tiny_config(tfds_data_dir, **MPP, **{
        'mesh.data': data, 'mesh.fsdp': fsdp, 'mesh.fsdp_min_size': 256})
    results[name] = train.train_and_evaluate(config, tmp_path / name)
  for name in ('dp8', 'fsdp8'):
    np.testing.assert_allclose(runs.losses(results[name]),
                               runs.losses(results['single']), rtol=2e-4)
    np.testing.assert_allclose(results[name]['eval_masked_patch_loss'],
                               results['single']['eval_masked_patch_loss'],
                               rtol=2e-4)


def test_resume_after_sigkill_is_bit_identical(tfds_data_dir, tmp_path):
  overrides = {**MPP, 'total_steps': 12, 'checkpoint_every': 1,
               'log_every': 4}
  workdir = tmp_path / 'killed'
  proc = runs.start(runs.cli(tfds_data_dir, workdir, **overrides))
  runs.wait_for(lambda: len(runs.complete_steps(workdir)) >= 1 and
                runs.complete_steps(workdir)[-1] >= 4, proc)
  proc.send_signal(signal.SIGKILL)
  proc.communicate()
  killed_at = runs.complete_steps(workdir)[-1]
  assert killed_at < 12
  final = subprocess.run(runs.cli(tfds_data_dir, workdir, **overrides),
                         cwd=runs.REPO, capture_output=True, text=True)
  assert final.returncode == 0, final.stderr
  assert f'Resumed from step {killed_at} ' in final.stderr
  train.train_and_evaluate(runs.tiny_config(tfds_data_dir, **overrides),
                           tmp_path / 'straight')
  jax.tree.map(np.testing.assert_array_equal, runs.final_params(workdir),
               runs.final_params(tmp_path / 'straight'))


def test_fine_tuning_and_programs_take_the_encoder_of_a_self_supervised_run(
    tfds_data_dir, tmp_path):
  pretrained = tmp_path / 'mpp'
  train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=2, **MPP), pretrained)
  source = sources.load(pretrained)
  assert source.model.num_classes == 0
  assert source.origin['objective'] == 'masked_patches'
  assert not {'head', masked.MASK_TOKEN, masked.HEAD} & set(source.params)
  stored = runs.final_params(pretrained)
  result = train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=2,
                       **{'pretrained.path': str(pretrained)}),
      tmp_path / 'finetune')
  assert 0 <= result['eval_accuracy'] <= 1
  record = json.loads((tmp_path / 'finetune' / 'adaptation.json').read_text())
  assert record['pretraining_objective'] == 'masked_patches'
  assert record['head'] == {'classes': [0, 10], 're_initialised': True}
  # The encoder started from the self-supervised one: step 0 of the
  # fine-tune equals it (checked on the embedding after 2 small steps).
  tuned = runs.final_params(tmp_path / 'finetune')
  assert np.abs(tuned['embedding']['kernel'] -
                stored['embedding']['kernel']).max() < 0.05
  # Programs that need a classifier refuse it in one line.
  for program, args in [('predict', [str(runs.REPO / 'README.md')]),
                        ('export', [f'--output={tmp_path / "export"}']),
                        ('evaluate', [f'--data_dir={tfds_data_dir}',
                                      'tfds:cifar10:test[:10]'])]:
    done = subprocess.run(
        [runs.sys.executable, '-m', f'vit_jax.{program}',
         f'--model={pretrained}', *args], cwd=runs.REPO, capture_output=True,
        text=True)
    assert done.returncode == 2, (program, done.stderr)
    errors = [line for line in done.stderr.splitlines()
              if line.startswith('error:')]
    assert len(errors) == 1 and 'has no classifier head' in errors[0], (
        program, done.stderr)


def test_an_objective_change_is_refused_on_resume(tfds_data_dir, tmp_path):
  train.train_and_evaluate(runs.tiny_config(tfds_data_dir, total_steps=2),
                           tmp_path / 'run')
  config = runs.tiny_config(tfds_data_dir, total_steps=4, **MPP,
                            resume_accept='total_steps,label_smoothing')
  with pytest.raises(ValueError, match="objective 'classification' -> "
                     "'masked_patches'.*objective cannot change on resume"):
    train.train_and_evaluate(config, tmp_path / 'run')


def test_configs_without_the_objective_field_still_classify():
  config = common.get_config()
  del config['objective']
  model = models.create_model('ViT-Ti_16', 10, patch_size=8, hidden_size=16,
                              num_layers=1, num_heads=2, mlp_dim=32)
  assert isinstance(objectives.create(ml_collections.ConfigDict(config),
                                      model, (32, 32)),
                    objectives.Classification)
