"""Real parity with timm and transformers, where they are installed
(`pip install -e ".[parity]"`; skipped with the reason where they are not):
our exports loaded by them give our logits, and their randomly initialised
models, saved in their own formats, load into ours with their logits."""
import dataclasses
import json

import numpy as np
import pytest

from vit_jax import models
from vit_jax import sources
from vit_jax.sources import base

import test_pytorch_sources as pytorch_tests
import test_timm_names as names

torch = pytest.importorskip('torch', reason='torch is not installed (the '
                            '[parity] extra)')

TOLERANCE = 1e-4  # relative error of the logits, float32 both sides


def relative_error(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def torch_logits(model, x_nhwc: np.ndarray) -> np.ndarray:
  model.eval()
  with torch.no_grad():
    out = model(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2).copy()))
  return (out.logits if hasattr(out, 'logits') else out).numpy()


def load_by_card(out, fmt: str, monkeypatch):
  """Runs the card's `loading` call for `fmt` in the export folder, as a
  user would paste it."""
  card = json.loads((out / 'tiny.card.json').read_text())
  monkeypatch.chdir(out)
  namespace = {}
  exec(card['loading'][fmt], namespace)  # pylint: disable=exec-used
  return namespace['model']


@pytest.mark.parametrize('options', [
    dict(), dict(classifier='gap', num_registers=2, fc_norm=True,
                 posemb_prefix=False, layerscale=0.1),
    dict(classifier='map')])
def test_timm_loads_our_export_with_our_logits(tmp_path, monkeypatch,
                                               options):
  pytest.importorskip('timm', reason='timm is not installed')
  source = pytorch_tests.tiny_source(**options)
  sources.write_export(source, tmp_path / 'out', 'tiny', formats=('timm',))
  model = load_by_card(tmp_path / 'out', 'timm', monkeypatch)
  x = pytorch_tests.pixels()
  assert relative_error(torch_logits(model, x),
                        pytorch_tests.logits(source, x)) < TOLERANCE


def test_timm_loads_our_hybrid_export_with_our_logits(tmp_path, monkeypatch):
  pytest.importorskip('timm', reason='timm is not installed')
  model = models.create_model('R26+ViT-S_32', 10, num_layers=1,
                              **base.INFERENCE_OPTIONS)
  source = dataclasses.replace(pytorch_tests.tiny_source(), model=model,
                               model_name='R26+ViT-S_32',
                               params=names.random_params(model, 64),
                               image_size=(64, 64))
  sources.write_export(source, tmp_path / 'out', 'tiny', formats=('timm',))
  model = load_by_card(tmp_path / 'out', 'timm', monkeypatch)
  x = pytorch_tests.pixels(size=64)
  assert relative_error(torch_logits(model, x),
                        pytorch_tests.logits(source, x)) < TOLERANCE


def test_transformers_loads_our_export_with_our_logits(tmp_path, monkeypatch):
  pytest.importorskip('transformers', reason='transformers is not installed')
  source = pytorch_tests.tiny_source()
  sources.write_export(source, tmp_path / 'out', 'tiny', formats=('hf',))
  model = load_by_card(tmp_path / 'out', 'hf', monkeypatch)
  x = pytorch_tests.pixels()
  assert relative_error(torch_logits(model, x),
                        pytorch_tests.logits(source, x)) < TOLERANCE


def test_a_timm_model_loads_into_ours_with_its_logits(tmp_path):
  timm = pytest.importorskip('timm', reason='timm is not installed')
  from safetensors.torch import save_file  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  args = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
              num_classes=7, reg_tokens=1, init_values=0.5)
  model = timm.create_model('vit_tiny_patch16_224', pretrained=False, **args)
  folder = tmp_path / 'timm'
  folder.mkdir()
  save_file(model.state_dict(), folder / 'model.safetensors')
  (folder / 'config.json').write_text(json.dumps({
      'architecture': 'vit_tiny_patch16_224', 'num_classes': 7,
      'model_args': args,
      'pretrained_cfg': {'input_size': [3, 32, 32]}}))
  ours = sources.load(folder)
  x = pytorch_tests.pixels()
  assert relative_error(pytorch_tests.logits(ours, x),
                        torch_logits(model, x)) < TOLERANCE


def test_a_transformers_model_loads_into_ours_with_its_logits(tmp_path):
  transformers = pytest.importorskip('transformers',
                                     reason='transformers is not installed')
  torch.manual_seed(0)
  config = transformers.ViTConfig(
      hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
      intermediate_size=96, image_size=32, patch_size=8, num_labels=7,
      layer_norm_eps=1e-6)
  model = transformers.ViTForImageClassification(config)
  model.save_pretrained(tmp_path / 'hf')
  ours = sources.load(tmp_path / 'hf')
  x = pytorch_tests.pixels()
  assert relative_error(pytorch_tests.logits(ours, x),
                        torch_logits(model, x)) < TOLERANCE


@pytest.mark.parametrize('resnet_layers,width,size', [
    ((1, 2, 1, 1), 1, 64), ((2, 1), 2, 48)])
def test_timm_bit_reads_our_npz_with_our_logits(tmp_path, resnet_layers,
                                                width, size):
  """Our BiT ResNet-v2 written as BiT's published .npz, read by timm's BiT
  loader into timm's ResNetV2 built as its resnetv2_*_bit models are."""
  import functools
  timm = pytest.importorskip('timm', reason='timm is not installed')
  from vit_jax import checkpoint
  model = models.create_model('BiT-R50x1', 10, resnet_layers=resnet_layers,
                              resnet_width=width)
  params = names.random_params(model, size)
  checkpoint.save_npz(tmp_path / 'bit.npz', params)
  theirs = timm.models.resnetv2.ResNetV2(
      layers=list(resnet_layers), width_factor=width, num_classes=10,
      stem_type='fixed', conv_layer=functools.partial(
          timm.layers.StdConv2d, eps=1e-8))
  theirs.load_pretrained(str(tmp_path / 'bit.npz'))
  x = pytorch_tests.pixels(size=size)
  ours = np.asarray(model.apply({'params': params}, x))
  assert relative_error(torch_logits(theirs, x), ours) < TOLERANCE
