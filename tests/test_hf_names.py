"""Hugging Face transformers' ViT names both ways (vit_jax.interop.hf):
exact round trips; files built with the published names and PyTorch layouts
giving the logits of an independent numpy forward pass written from
transformers' modeling_vit.py; configs, preprocessors and refusals."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy import special

from vit_jax import models
from vit_jax.checkpoint import arrays
from vit_jax.interop import hf
from vit_jax.serving import images

TINY = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2,
            patch_size=8)


def make(num_classes=10, **options):
  return models.create_model('ViT-Ti_16', num_classes, **{**TINY, **options})


def random_params(model, size=32, seed=0):
  """Initialised params with noise on every leaf (zero-initialised heads and
  biases would hide a transposition)."""
  params = jax.jit(model.init)(jax.random.key(seed),
                               jnp.zeros((1, size, size, 3)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: np.asarray(p) + rng.normal(
      0, 0.1, p.shape).astype(np.float32), params)


@pytest.mark.parametrize('options', [
    dict(), dict(patch_size=4, num_heads=4, num_layers=3),
    dict(num_classes=0), dict(activation='gelu')])
def test_round_trip_is_exact(options):
  model = make(**options)
  params = random_params(model)
  state = hf.to_hf(params, model)
  d = model.hidden_size
  p = model.patch_size[0]
  assert state['vit.encoder.layer.0.attention.attention.query.weight'].shape \
      == (d, d)
  assert state['vit.embeddings.patch_embeddings.projection.weight'].shape == (
      d, 3, p, p)
  assert state['vit.encoder.layer.0.intermediate.dense.weight'].shape == (
      64, d)
  assert ('classifier.weight' in state) == bool(model.num_classes)
  assert all(v.flags['C_CONTIGUOUS'] and v.dtype == np.float32
             for v in state.values())
  back = hf.from_hf(state, model)
  flat, flat_back = arrays.flatten(params), arrays.flatten(back)
  assert set(flat) == set(flat_back)
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_back[key], err_msg=key)


def published_state(rng, d=32, layers=2, mlp=64, patch=8, tokens=16,
                    classes=10, prefix='vit.'):
  """ViTForImageClassification's keys and torch shapes, from modeling_vit.py
  (ViTModel's when prefix is '' and classes 0)."""
  r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  e = prefix + 'embeddings.'
  s = {e + 'cls_token': r(1, 1, d),
       e + 'position_embeddings': r(1, tokens + 1, d),
       e + 'patch_embeddings.projection.weight': r(d, 3, patch, patch),
       e + 'patch_embeddings.projection.bias': r(d),
       prefix + 'layernorm.weight': 1 + r(d), prefix + 'layernorm.bias': r(d)}
  if classes:
    s.update({'classifier.weight': r(classes, d),
              'classifier.bias': r(classes)})
  for i in range(layers):
    b = f'{prefix}encoder.layer.{i}.'
    for n in ('query', 'key', 'value'):
      s.update({f'{b}attention.attention.{n}.weight': r(d, d),
                f'{b}attention.attention.{n}.bias': r(d)})
    s.update({b + 'attention.output.dense.weight': r(d, d),
              b + 'attention.output.dense.bias': r(d),
              b + 'intermediate.dense.weight': r(mlp, d),
              b + 'intermediate.dense.bias': r(mlp),
              b + 'output.dense.weight': r(d, mlp),
              b + 'output.dense.bias': r(d)})
    for n in ('layernorm_before', 'layernorm_after'):
      s.update({f'{b}{n}.weight': 1 + r(d), f'{b}{n}.bias': r(d)})
  return s


def reference_forward(s, x, heads, act, prefix='vit.', eps=1e-6):
  """transformers' ViT in float64 numpy from the torch-layout arrays `s`:
  x NCHW -> logits (or, without a classifier, the final class token)."""
  s = {k: v.astype(np.float64) for k, v in s.items()}
  e = prefix + 'embeddings.'
  w = s[e + 'patch_embeddings.projection.weight']
  d, _, ph, pw = w.shape
  b, c, hgt, wid = x.shape
  patches = x.reshape(b, c, hgt // ph, ph, wid // pw, pw)
  t = np.einsum('bcipjq,dcpq->bijd', patches, w).reshape(b, -1, d)
  t = t + s[e + 'patch_embeddings.projection.bias']
  t = np.concatenate([np.repeat(s[e + 'cls_token'], b, 0), t], 1)
  t = t + s[e + 'position_embeddings']

  def norm(v, name):
    mu, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
    return (v - mu) / np.sqrt(var + eps) * s[name + '.weight'] + s[
        name + '.bias']

  def linear(v, name):
    return v @ s[name + '.weight'].T + s[name + '.bias']

  gelu = {'gelu': lambda v: 0.5 * v * (1 + special.erf(v / np.sqrt(2))),
          'gelu_pytorch_tanh': lambda v: 0.5 * v * (1 + np.tanh(
              np.sqrt(2 / np.pi) * (v + 0.044715 * v ** 3))),
          }[act]
  i = 0
  while f'{prefix}encoder.layer.{i}.layernorm_before.weight' in s:
    l = f'{prefix}encoder.layer.{i}.'
    y = norm(t, l + 'layernorm_before')
    split = lambda v: v.reshape(b, -1, heads, d // heads).transpose(0, 2, 1, 3)
    q, k, v = (split(linear(y, f'{l}attention.attention.{n}'))
               for n in ('query', 'key', 'value'))
    a = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
    a = np.exp(a - a.max(-1, keepdims=True))
    a = a / a.sum(-1, keepdims=True)
    ctx = (a @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    t = t + linear(ctx, l + 'attention.output.dense')
    y = gelu(linear(norm(t, l + 'layernorm_after'), l + 'intermediate.dense'))
    t = t + linear(y, l + 'output.dense')
    i += 1
  token = norm(t, prefix + 'layernorm')[:, 0]
  return linear(token, 'classifier') if 'classifier.weight' in s else token


def config(act='gelu', **changes):
  return {'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
          'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
          'intermediate_size': 64, 'hidden_act': act, 'image_size': 32,
          'patch_size': 8, 'num_channels': 3, 'qkv_bias': True,
          'layer_norm_eps': 1e-6,
          'id2label': {str(i): f'c{i}' for i in range(10)}, **changes}


def pixels(seed=1, size=32):
  return np.random.default_rng(seed).uniform(
      -1, 1, (2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize('act', ['gelu', 'gelu_pytorch_tanh'])
def test_published_file_loads_with_its_logits(tmp_path, act):
  state = published_state(np.random.default_rng(0))
  safetensors.numpy.save_file(state, tmp_path / 'model.safetensors')
  loaded = safetensors.numpy.load_file(tmp_path / 'model.safetensors')
  options, size = hf.model_options(json.loads(json.dumps(config(act))))
  assert size == (32, 32)
  model = models.VisionTransformer(**options)
  params = hf.from_hf(loaded, model)
  x = pixels()
  logits = np.asarray(model.apply({'params': params}, x))
  expected = reference_forward(state, x.transpose(0, 3, 1, 2).astype(
      np.float64), heads=2, act=act)
  assert logits.shape == (2, 10)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
  assert hf.label_names(config(act)) == [f'c{i}' for i in range(10)]


def test_vit_model_without_prefix_gives_its_class_token():
  """ViTModel saved alone: no 'vit.' prefix, no classifier, a pooler."""
  rng = np.random.default_rng(3)
  state = published_state(rng, classes=0, prefix='')
  state['pooler.dense.weight'] = rng.normal(size=(32, 32)).astype(np.float32)
  state['pooler.dense.bias'] = np.zeros(32, np.float32)
  options, _ = hf.model_options(config(architectures=['ViTModel']))
  assert options['num_classes'] == 0
  model = models.VisionTransformer(**options)
  x = pixels(seed=4)
  features = np.asarray(model.apply({'params': hf.from_hf(state, model)}, x))
  expected = reference_forward(state, x.transpose(0, 3, 1, 2).astype(
      np.float64), heads=2, act='gelu', prefix='')
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-5)


def test_newer_in_memory_names_are_read():
  state = published_state(np.random.default_rng(0))
  renamed = {}
  for k, v in state.items():
    k = k.replace('encoder.layer.', 'layers.')
    for old, new in (('attention.attention.query', 'attention.q_proj'),
                     ('attention.attention.key', 'attention.k_proj'),
                     ('attention.attention.value', 'attention.v_proj'),
                     ('attention.output.dense', 'attention.o_proj'),
                     ('intermediate.dense', 'mlp.fc1'),
                     ('output.dense', 'mlp.fc2')):
      k = k.replace(old, new)
    renamed[k] = v
  assert 'vit.layers.1.mlp.fc2.weight' in renamed
  model = models.VisionTransformer(**hf.model_options(config())[0])
  jax.tree.map(np.testing.assert_array_equal, hf.from_hf(state, model),
               hf.from_hf(renamed, model))


def test_bfloat16_params_keep_their_dtype():
  model = make()
  params = jax.tree.map(lambda p: p.astype(jnp.bfloat16),
                        random_params(model))
  state = hf.to_hf(params, model)
  assert {v.dtype for v in state.values()} == {np.dtype(jnp.bfloat16)}
  back = arrays.flatten(hf.from_hf(state, model))
  for key, value in arrays.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(value, np.float32),
                                  np.asarray(back[key], np.float32))


@pytest.mark.parametrize('options,size,labels', [
    (dict(), (32, 32), [f'n{i}' for i in range(10)]),
    (dict(patch_size=4, num_heads=4, num_layers=3, activation='gelu'),
     (32, 48), None),
    (dict(num_classes=0), (16, 16), None)])
def test_config_round_trip(options, size, labels):
  model = make(**options)
  written = json.loads(json.dumps(hf.hf_config(model, size, labels)))
  assert written['architectures'] == (
      ['ViTForImageClassification'] if model.num_classes else ['ViTModel'])
  assert written['hidden_act'] == ('gelu' if model.activation == 'gelu'
                                   else 'gelu_pytorch_tanh')
  assert written['layer_norm_eps'] == 1e-6 and written['qkv_bias'] is True
  read, read_size = hf.model_options(written)
  assert read_size == size
  back = models.VisionTransformer(**read)
  for field in ('num_classes', 'patch_size', 'hidden_size', 'num_layers',
                'num_heads', 'mlp_dim', 'classifier', 'activation',
                'representation_size', 'resnet_layers', 'num_registers',
                'posemb_prefix', 'layerscale', 'fc_norm'):
    assert getattr(back, field) == getattr(model, field), field
  assert hf.label_names(written) == labels
  if model.num_classes:
    with pytest.raises(ValueError, match='3 label names'):
      hf.hf_config(model, size, ['a', 'b', 'c'])


def test_label_names_order_by_id_and_generic_ones_are_none():
  assert hf.label_names({'id2label': {'10': 'k', '2': 'c', '0': 'a', '1': 'b',
                                      **{str(i): f'x{i}'
                                         for i in range(3, 10)}}})[:3] == [
                                             'a', 'b', 'c']
  assert hf.label_names({'id2label': {'1': 'LABEL_1', '0': 'LABEL_0'}}) is None
  assert hf.label_names({}) is None


@pytest.mark.parametrize('interpolation', ['pil_bilinear', 'pil_bicubic'])
def test_preprocessor_config_round_trip(interpolation):
  prep = images.Preprocessing(interpolation=interpolation,
                              mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
  written = json.loads(json.dumps(hf.preprocessor_config(prep, (32, 48))))
  assert written['size'] == {'height': 32, 'width': 48}
  assert written['resample'] == {'pil_bilinear': 2, 'pil_bicubic': 3}[
      interpolation]
  assert hf.preprocessing_from(written, (32, 48)) == prep
  default = hf.preprocessing_from(None, (32, 32))
  assert (default.mean, default.std, default.interpolation) == (
      (0.5,) * 3, (0.5,) * 3, 'pil_bilinear')


def test_crop_protocol_is_dropped_with_a_warning(caplog):
  prep = images.Preprocessing(resize='resize_crop', interpolation='pil_bicubic')
  with caplog.at_level('WARNING'):
    written = hf.preprocessor_config(prep, (32, 32))
  assert 'cannot crop' in caplog.text
  assert hf.preprocessing_from(written, (32, 32)).resize == 'resize'


def test_preprocessor_rescale_and_normalize_give_the_same_inputs():
  """(x * r - mean) / std as ViTImageProcessor computes it, for any rescale
  and with normalisation off, equals our (x / 255 - mean) / std."""
  x = np.arange(0, 256, 5, dtype=np.float64)[:, None]
  for c in ({'do_rescale': False, 'image_mean': [127.5] * 3,
             'image_std': [127.5] * 3},
            {'rescale_factor': 1 / 127.5, 'image_mean': [1, 1, 1],
             'image_std': [1, 1, 1]},
            {'do_normalize': False}):
    r = c.get('rescale_factor', 1 / 255) if c.get('do_rescale', True) else 1
    mean = np.array(c.get('image_mean', [0] * 3), np.float64)
    std = np.array(c.get('image_std', [1] * 3), np.float64)
    p = hf.preprocessing_from(c, (32, 32))
    np.testing.assert_allclose((x / 255 - p.mean) / p.std,
                               (x * r - mean) / std, atol=1e-12)


@pytest.mark.parametrize('options,named', [
    (dict(classifier='gap'), "classifier='gap'"),
    (dict(classifier='map'), "classifier='map'"),
    (dict(representation_size=16), 'representation_size=16'),
    (dict(resnet_layers=(1, 1), patch_size=1), 'resnet_layers=(1, 1)'),
    (dict(num_registers=2), 'num_registers=2'),
    (dict(layerscale=0.1), 'layerscale=0.1'),
    (dict(classifier='gap', fc_norm=True), 'fc_norm=True'),
    (dict(posemb_prefix=False), 'posemb_prefix=False'),
    (dict(patch_size=(8, 4)), 'patch_size=(8, 4)')])
def test_inexpressible_models_refused_in_one_line(options, named):
  model = make(**options)
  for call in (lambda: hf.check_expressible(model),
               lambda: hf.hf_config(model, (32, 32), None),
               lambda: hf.to_hf({}, model)):
    with pytest.raises(ValueError) as err:
      call()
    message = str(err.value)
    assert '\n' not in message and named in message, message
    assert 'has no Hugging Face ViT equivalent' in message


@pytest.mark.parametrize('changes,named', [
    (dict(model_type='swin'), "model_type 'swin' is not a ViT"),
    (dict(hidden_act='quick_gelu'), "hidden_act='quick_gelu'"),
    (dict(qkv_bias=False), 'qkv_bias=False'),
    (dict(num_channels=1), 'num_channels=1')])
def test_unsupported_configs_named_in_one_line(changes, named):
  with pytest.raises(ValueError, match=named) as err:
    hf.model_options(config(**changes))
  assert '\n' not in str(err.value)


def test_mismatched_state_lists_missing_unexpected_and_misshaped():
  model = models.VisionTransformer(**hf.model_options(config())[0])
  state = published_state(np.random.default_rng(0))
  del state['vit.encoder.layer.1.output.dense.bias']
  state['vit.encoder.layer.2.output.dense.bias'] = np.zeros(32, np.float32)
  state['classifier.weight'] = np.zeros((5, 32), np.float32)
  with pytest.raises(ValueError) as err:
    hf.from_hf(state, model)
  message = str(err.value)
  assert 'Transformer/encoderblock_1/MlpBlock_0/Dense_1/bias' in message
  assert 'encoder.layer.2.output.dense.bias' in message
  assert 'classifier.weight (5, 32), expected (10, 32)' in message
