"""Hugging Face transformers' ViT checkpoints where a model is taken: a
folder with published names gives the logits of an independent numpy forward
pass, with its labels and preprocessing; exports reload exactly and name the
call; inexpressible models are refused before anything is written. (The
names themselves: tests/test_hf_names.py.)"""
import json

import numpy as np
import pytest
import safetensors.numpy

from vit_jax import sources
from vit_jax.interop import hf

import test_pytorch_sources as pytorch_tests
import test_hf_names as names


CONFIG = {'architectures': ['ViTForImageClassification'], 'model_type': 'vit',
          'hidden_size': 32, 'num_hidden_layers': 2, 'num_attention_heads': 2,
          'intermediate_size': 64, 'hidden_act': 'gelu', 'image_size': 32,
          'patch_size': 8, 'num_channels': 3, 'qkv_bias': True,
          'id2label': {str(i): f'c{i}' for i in range(10)}}


def hf_folder(folder, state=None, config=CONFIG, preprocessor=None):
  folder.mkdir(parents=True)
  state = state or names.published_state(np.random.default_rng(0))
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
      names.reference_forward(state, x.transpose(0, 3, 1, 2), 2, 'gelu'), rtol=1e-4, atol=1e-4)


def test_export_to_hf_reloads_exactly_and_names_the_call(tmp_path):
  source = pytorch_tests.tiny_source()
  card_path = sources.write_export(source, tmp_path / 'out', 'tiny',
                                   formats=('hf',))
  card = json.loads(card_path.read_text())
  assert card['loading']['hf'] == (
      'from transformers import ViTForImageClassification; '
      "model = ViTForImageClassification.from_pretrained('tiny.hf')")
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
  state = names.published_state(np.random.default_rng(0))
  del state['vit.encoder.layer.1.output.dense.bias']
  hf_folder(tmp_path / 'broken', state)
  with pytest.raises(ValueError, match=r'(?s)missing.*encoderblock_1/'
                     r'MlpBlock_0/Dense_1/bias'):
    sources.load(tmp_path / 'broken')
