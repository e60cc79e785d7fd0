"""BiT ResNet-v2 baselines: the shared ResNet code, BiT's published .npz
layout, and the trainer and tools running them like any model."""
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
import runs
from vit_jax import checkpoint
from vit_jax import models
from vit_jax import sources
from vit_jax.serving import classifier as serving_classifier
from vit_jax.training import config as config_lib
from vit_jax.training import trainer

import test_timm_names as names

TINY = dict(resnet_layers=(1, 2), resnet_width=1)


def published_layout(params) -> dict[str, np.ndarray]:
  """`params` of a BiT model under the names of BiT's published files,
  spelt out here (not by the library's converter): a/b/c per conv of a
  unit, gamma/beta, 2-digit units, the head as a 1x1 convolution."""
  flat = {'resnet/root_block/standardized_conv2d/kernel':
              params['conv_root']['kernel'],
          'resnet/group_norm/gamma': params['norm_pre_head']['scale'],
          'resnet/group_norm/beta': params['norm_pre_head']['bias'],
          'resnet/head/conv2d/kernel': params['head']['kernel'][None, None],
          'resnet/head/conv2d/bias': params['head']['bias']}
  for block in (k for k in params if k.startswith('block')):
    for unit, p in params[block].items():
      prefix = f'resnet/{block}/unit{int(unit[len("unit"):]):02d}'
      for i, letter in enumerate('abc', 1):
        flat[f'{prefix}/{letter}/standardized_conv2d/kernel'] = (
            p[f'conv{i}']['kernel'])
        flat[f'{prefix}/{letter}/group_norm/gamma'] = p[f'gn{i}']['scale']
        flat[f'{prefix}/{letter}/group_norm/beta'] = p[f'gn{i}']['bias']
      if 'conv_proj' in p:
        flat[f'{prefix}/a/proj/standardized_conv2d/kernel'] = (
            p['conv_proj']['kernel'])
  return {k: np.asarray(v) for k, v in flat.items()}


def tiny_bit(num_classes=10, **overrides):
  return models.create_model('BiT-R50x1', num_classes, **{**TINY, **overrides})


def test_pre_activation_units_share_the_hybrids_names():
  params = jax.eval_shape(tiny_bit().init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))['params']
  assert set(params) == {'conv_root', 'block1', 'block2', 'norm_pre_head',
                         'head'}
  first, second = params['block2']['unit1'], params['block2']['unit2']
  assert set(first) == {'conv1', 'conv2', 'conv3', 'conv_proj', 'gn1', 'gn2',
                        'gn3'}  # no gn_proj, no gn_root: pre-activation
  assert 'conv_proj' not in second
  # gn1 normalises the unit's input (256 wide out of block1), gn3 the 3x3's.
  assert first['gn1']['scale'].shape == (256,)
  assert first['gn3']['scale'].shape == (128,)
  assert params['head']['kernel'].shape == (512, 10)


def test_any_image_size_from_the_output_stride_up():
  model = tiny_bit()
  params = names.random_params(model, 32)
  for size in ((32, 32), (40, 56), (97, 33)):
    assert model.apply({'params': params}, jnp.zeros((2, *size, 3))).shape == (
        2, 10)
  with pytest.raises(ValueError, match='smaller than the ResNet'):
    model.apply({'params': params}, jnp.zeros((1, 4, 32, 3)))  # stride 8
  with pytest.raises(ValueError, match='resnet_layers'):
    tiny_bit(resnet_layers=())
  with pytest.raises(ValueError, match="'hidden_size'.*BiT-R50x1 \\(BiT\\)"):
    tiny_bit(hidden_size=64)


@pytest.mark.parametrize('norm_shape', ['(C,)', '(1, 1, 1, C)'])
def test_published_npz_loads_with_the_logits_of_its_params(tmp_path,
                                                           norm_shape):
  model = tiny_bit(resnet_width=2)
  params = names.random_params(model, 64)
  flat = published_layout(params)
  if norm_shape != '(C,)':
    flat = {k: v.reshape(1, 1, 1, -1) if 'group_norm' in k else v
            for k, v in flat.items()}
  np.savez(tmp_path / 'BiT-M-R50x2.npz', **flat)
  source = sources.from_npz(tmp_path / 'BiT-M-R50x2.npz', 'BiT-R50x1',
                            image_size=(64, 64))
  assert source.model.resnet_layers == (1, 2)
  assert source.model.resnet_width == 2
  x = np.random.default_rng(0).uniform(-1, 1, (2, 64, 64, 3)).astype(
      np.float32)
  np.testing.assert_allclose(
      source.model.apply({'params': source.params}, x),
      model.apply({'params': params}, x), rtol=1e-5, atol=1e-6)
  # And we write exactly that layout (what timm's BiT loader reads).
  checkpoint.save_npz(tmp_path / 'ours.npz', params)
  written = dict(np.load(tmp_path / 'ours.npz'))
  assert sorted(written) == sorted(published_layout(params))
  for key, value in published_layout(params).items():
    np.testing.assert_array_equal(written[key], value)


def test_bad_bit_files_are_one_clear_error(tmp_path):
  params = names.random_params(tiny_bit(), 64)
  flat = published_layout(params)
  np.savez(tmp_path / 'bit.npz', **flat)
  with pytest.raises(ValueError, match='holds a BiT ResNet but ViT-B_16 is a '
                     'ViT: pass the --model_name'):
    sources.from_npz(tmp_path / 'bit.npz', 'ViT-B_16')
  renamed = dict(flat)
  renamed['resnet/block1/unit01/d/standardized_conv2d/kernel'] = renamed.pop(
      'resnet/block1/unit01/c/standardized_conv2d/kernel')
  np.savez(tmp_path / 'renamed.npz', **renamed)
  with pytest.raises(ValueError, match="unit01/d/.* is not a name of BiT"):
    checkpoint.load_npz(tmp_path / 'renamed.npz')
  # A file of another depth: every missing unit listed, in one error.
  with pytest.raises(ValueError, match=r'missing from the checkpoint \(9\)'):
    checkpoint.load_pretrained(tmp_path / 'bit.npz', names.random_params(
        tiny_bit(resnet_layers=(1, 3)), 64), tiny_bit(resnet_layers=(1, 3)))


def bit_config(data_dir, **overrides):
  return config_lib.with_overrides(pretrain.get_config('cifar10_bit'), {
      'model.resnet_layers': TINY['resnet_layers'], 'data_dir': data_dir,
      'train_split': 'train[:2%]', 'eval_split': 'test[:200]',
      'batch_size': 16, 'eval_batch_size': 40, 'total_steps': 4,
      'log_every': 1, 'checkpoint_every': 4, **overrides})


def test_trained_exported_fine_tuned_and_refused_by_inspect(
    tfds_data_dir, imagenet_samples, tmp_path):
  result = trainer.train_and_evaluate(bit_config(tfds_data_dir),
                                      tmp_path / 'run')
  assert np.isfinite(result['train_loss'])
  trained = sources.load(tmp_path / 'run')
  card = sources.write_export(trained, tmp_path / 'out', 'bit')
  exported = sources.load(card)
  assert isinstance(exported.model, models.BiT)
  x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype(
      np.float32)
  want = sources.classifier(trained).logits(x)
  np.testing.assert_allclose(sources.classifier(exported).logits(x), want,
                             rtol=1e-5, atol=1e-5)
  # The StableHLO, run without the model code.
  np.testing.assert_allclose(serving_classifier.from_export(card).logits(x),
                             want, rtol=1e-4, atol=1e-5)
  # Fine-tuned from the export at another resolution: only the head adapts.
  config = bit_config(tfds_data_dir, image_size=48, total_steps=2,
                      **{'pretrained.path': str(card)})
  trainer.train_and_evaluate(config, tmp_path / 'finetune')
  record = json.loads((tmp_path / 'finetune' / 'adaptation.json'
                       ).read_text())
  assert record['head'] == {'classes': [10, 10], 're_initialised': True}
  assert 'position_embedding_grid' not in record
  inspected = subprocess.run(
      [sys.executable, '-m', 'vit_jax.inspect', f'--model={card}',
       f'--output={tmp_path / "figures"}',
       str(sorted(imagenet_samples.glob('*.JPEG'))[0])],
      cwd=runs.REPO, capture_output=True, text=True, timeout=120)
  assert inspected.returncode == 2
  assert 'are of Vision Transformers' in inspected.stderr
  assert not (tmp_path / 'figures').exists()
