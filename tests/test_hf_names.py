"""Hugging Face transformers' ViT names both ways: exact round trips, files
built with the published names giving the logits of an independent numpy
forward pass, configs, exports and refusals."""
import json

import jax
import numpy as np
import pytest
import safetensors.numpy

from vit_jax import models
from vit_jax import sources
from vit_jax.checkpoint import arrays
from vit_jax.interop import hf
from vit_jax.serving import images

import test_pytorch_sources as pytorch_tests
import test_timm_names as names


@pytest.mark.parametrize('options', [
    dict(), dict(patch_size=4, num_heads=4, num_layers=3),
    dict(num_classes=0), dict(activation='gelu')])
def test_round_trip_is_exact(options):
  model = names.make(**options)
  params = names.random_params(model)
  state = hf.to_hf(params, model)
  assert state['vit.encoder.layer.0.attention.attention.query.weight'].shape \
      == (32, 32)
  back = hf.from_hf(state, model)
  flat, flat_back = arrays.flatten(params), arrays.flatten(back)
  assert set(flat) == set(flat_back)
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_back[key], err_msg=key)


def published_state(rng, d=32, layers=2, mlp=64, patch=8, grid=16,
                    classes=10, prefix='vit.'):
  """ViTForImageClassification's keys and shapes, from its modeling code."""
  r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  e = prefix + 'embeddings.'
  s = {e + 'cls_token': r(1, 1, d), e + 'position_embeddings': r(1, grid + 1, d),
       e + 'patch_embeddings.projection.weight': r(d, 3, patch, patch),
       e + 'patch_embeddings.projection.bias': r(d),
       prefix + 'layernorm.weight': 1 + r(d), prefix + 'layernorm.bias': r(d),
       'classifier.weight': r(classes, d), 'classifier.bias': r(classes)}
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
              b + 'output.dense.bias': r(d),
              b + 'layernorm_before.weight': 1 + r(d),
              b + 'layernorm_before.bias': r(d),
              b + 'layernorm_after.weight': 1 + r(d),
              b + 'layernorm_after.bias': r(d)})
  return s


def as_reference_names(s):
  """The same arrays under the numpy reference forward's (timm's) names."""
  e = 'vit.embeddings.'
  out = {'cls_token': s[e + 'cls_token'],
         'pos_embed': s[e + 'position_embeddings'],
         'patch_embed.proj.weight': s[e + 'patch_embeddings.projection.weight'],
         'patch_embed.proj.bias': s[e + 'patch_embeddings.projection.bias'],
         'norm.weight': s['vit.layernorm.weight'],
         'norm.bias': s['vit.layernorm.bias'],
         'head.weight': s['classifier.weight'],
         'head.bias': s['classifier.bias']}
  i = 0
  while f'vit.encoder.layer.{i}.layernorm_before.weight' in s:
    b, t = f'vit.encoder.layer.{i}.', f'blocks.{i}.'
    qkv = [f'{b}attention.attention.{n}' for n in ('query', 'key', 'value')]
    out[t + 'attn.qkv.weight'] = np.concatenate([s[q + '.weight'] for q in qkv])
    out[t + 'attn.qkv.bias'] = np.concatenate([s[q + '.bias'] for q in qkv])
    for theirs, ref in (('attention.output.dense', 'attn.proj'),
                        ('intermediate.dense', 'mlp.fc1'),
                        ('output.dense', 'mlp.fc2'),
                        ('layernorm_before', 'norm1'),
                        ('layernorm_after', 'norm2')):
      for leaf in ('weight', 'bias'):
        out[f'{t}{ref}.{leaf}'] = s[f'{b}{theirs}.{leaf}']
    i += 1
  return out


CONFIG = {'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
          'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
          'intermediate_size': 64, 'hidden_act': 'gelu', 'image_size': 32,
          'patch_size': 8, 'num_channels': 3, 'qkv_bias': True,
          'id2label': {str(i): f'c{i}' for i in range(10)}}


def hf_folder(folder, state=None, config=CONFIG, preprocessor=None):
  folder.mkdir(parents=True)
  state = state or published_state(np.random.default_rng(0))
  safetensors.numpy.save_file(state, folder / 'model.safetensors')
  (folder / 'config.json').write_text(json.dumps(config))
  if preprocessor:
    (folder / 'preprocessor_config.json').write_text(json.dumps(preprocessor))
  return state


def test_published_folder_loads_with_its_logits_and_protocol(tmp_path):
  state = hf_folder(tmp_path / 'vit', preprocessor={
      'resample': 3, 'image_mean': [0.485, 0.456, 0.406],
      'image_std': [0.229, 0.224, 0.225], 'size': {'height': 32,
                                                   'width': 32}})
  source = sources.load(tmp_path / 'vit')
  assert source.origin['kind'] == 'hf'
  assert source.label_names == [f'c{i}' for i in range(10)]
  assert source.preprocessing.interpolation == 'pil_bicubic'
  assert source.preprocessing.std == (0.229, 0.224, 0.225)
  x = pytorch_tests.pixels()
  np.testing.assert_allclose(
      pytorch_tests.logits(source, x),
      names.timm_forward(as_reference_names(state), x.transpose(0, 3, 1, 2),
                         2, 'token'), rtol=1e-4, atol=1e-4)


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
  options, _ = hf.model_options(CONFIG)
  model = models.VisionTransformer(**options)
  old, new = hf.from_hf(state, model), hf.from_hf(renamed, model)
  jax.tree.map(np.testing.assert_array_equal, old, new)


def test_export_to_hf_reloads_exactly_and_names_the_call(tmp_path):
  source = pytorch_tests.tiny_source()
  card_path = sources.write_export(source, tmp_path / 'out', 'tiny',
                                   formats=('hf',))
  card = json.loads(card_path.read_text())
  assert card['loading']['hf'] == (
      'from transformers import ViTForImageClassification; '
      "ViTForImageClassification.from_pretrained('tiny.hf')")
  folder = tmp_path / 'out' / 'tiny.hf'
  config = json.loads((folder / 'config.json').read_text())
  assert config['hidden_act'] == 'gelu_pytorch_tanh'
  assert config['id2label']['3'] == 'l3'
  back = sources.load(folder)
  x = pytorch_tests.pixels()
  np.testing.assert_array_equal(pytorch_tests.logits(back, x),
                                pytorch_tests.logits(source, x))


@pytest.mark.parametrize('options,match', [
    (dict(classifier='gap'), "classifier='gap'"),
    (dict(representation_size=16), 'pre-logits'),
    (dict(num_registers=2), 'register tokens'),
    (dict(layerscale=0.1), 'LayerScale'),
])
def test_inexpressible_models_refused_in_one_line(tmp_path, options, match):
  source = pytorch_tests.tiny_source(**options)
  with pytest.raises(ValueError, match=match) as err:
    sources.write_export(source, tmp_path / 'out', 'tiny', formats=('hf',))
  assert '\n' not in str(err.value) and 'no Hugging Face' in str(err.value)
  assert not (tmp_path / 'out').exists()


def test_other_model_types_and_options_are_named(tmp_path):
  with pytest.raises(ValueError, match="model_type 'swin' is not a ViT"):
    hf.model_options({'model_type': 'swin'})
  with pytest.raises(ValueError, match="hidden_act='quick_gelu'"):
    hf.model_options({**CONFIG, 'hidden_act': 'quick_gelu'})
  state = published_state(np.random.default_rng(0))
  del state['vit.encoder.layer.1.output.dense.bias']
  hf_folder(tmp_path / 'broken', state)
  with pytest.raises(ValueError, match=r'(?s)missing.*encoderblock_1/'
                     r'MlpBlock_0/Dense_1/bias'):
    sources.load(tmp_path / 'broken')


def test_preprocessor_config_round_trip():
  prep = images.Preprocessing(interpolation='pil_bicubic',
                              mean=(0.1, 0.2, 0.3), std=(0.4, 0.5, 0.6))
  back = hf.preprocessing_from(hf.preprocessor_config(prep, (32, 32)),
                               (32, 32))
  assert back == prep
  assert hf.preprocessing_from(None, (32, 32)).mean == (0.5, 0.5, 0.5)
