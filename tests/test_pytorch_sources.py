"""timm and Hugging Face checkpoints wherever a model is taken: folders,
bare .safetensors, Hub ids from an offline cache; exports to both formats;
pickles refused."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import safetensors.numpy
from PIL import Image

from vit_jax import models
from vit_jax import sources
from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.sources import base

import test_timm_names as names  # the published-name builders and forward

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = {'architecture': 'vit_tiny_patch8_32', 'num_classes': 10,
          'label_names': [f'class_{i}' for i in range(10)],
          'model_args': {'num_heads': 2},
          'pretrained_cfg': {'input_size': [3, 32, 32], 'crop_pct': 0.9,
                             'interpolation': 'bicubic',
                             'mean': [0.485, 0.456, 0.406],
                             'std': [0.229, 0.224, 0.225]}}


def timm_folder(folder: pathlib.Path) -> dict:
  folder.mkdir(parents=True)
  state = names.published_state(np.random.default_rng(0))
  safetensors.numpy.save_file(state, folder / 'model.safetensors')
  (folder / 'config.json').write_text(json.dumps(CONFIG))
  return state


def pixels(n=2, size=32, seed=1) -> np.ndarray:
  return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3)
                                             ).astype(np.float32)


def logits(source: base.Source, x: np.ndarray) -> np.ndarray:
  return np.asarray(source.model.apply({'params': source.params}, x))


def test_timm_folder_loads_with_its_config(tmp_path):
  state = timm_folder(tmp_path / 'vit')
  source = sources.load(tmp_path / 'vit')
  assert source.origin['kind'] == 'timm'
  assert source.origin['architecture'] == 'vit_tiny_patch8_32'
  assert source.image_size == (32, 32)
  assert source.label_names == CONFIG['label_names']
  assert source.preprocessing.interpolation == 'pil_bicubic'
  assert source.preprocessing.crop_fraction == 0.9
  assert source.preprocessing.mean == (0.485, 0.456, 0.406)
  x = pixels()
  np.testing.assert_allclose(
      logits(source, x),
      names.timm_forward(state, x.transpose(0, 3, 1, 2), 2, 'token'),
      rtol=1e-4, atol=1e-4)


def test_bare_safetensors_needs_and_takes_the_architecture(tmp_path):
  state = names.published_state(np.random.default_rng(0), d=48, mlp=96)
  path = tmp_path / 'weights.safetensors'
  safetensors.numpy.save_file(state, path)
  assert sources.kind_of(path) == 'timm'
  with pytest.raises(ValueError, match='--model_name'):
    sources.load(path)
  # Widths from the file, heads from the name (timm's tiny: 3), resolution
  # from the name's suffix.
  source = sources.load(path, model_name='vit_tiny_patch8_32')
  assert (source.model.num_heads, source.model.hidden_size) == (3, 48)
  x = pixels()
  np.testing.assert_allclose(
      logits(source, x),
      names.timm_forward(state, x.transpose(0, 3, 1, 2), 3, 'token'),
      rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('file', ['pytorch_model.bin', 'model.pth'])
def test_pickles_are_refused_with_the_conversion(tmp_path, file):
  (tmp_path / file).write_bytes(b'\x80\x04not really')
  with pytest.raises(ValueError, match=r'pickle.*safetensors') as err:
    sources.load(tmp_path / file)
  assert '\n' not in str(err.value)
  (tmp_path / 'config.json').write_text(json.dumps(CONFIG))
  with pytest.raises(ValueError, match='pickle'):
    sources.load(tmp_path)


def test_swin_folder_is_one_clear_error(tmp_path):
  folder = tmp_path / 'swin'
  folder.mkdir()
  safetensors.numpy.save_file(
      {'layers.0.blocks.0.attn.qkv.weight': np.zeros((3, 1), np.float32)},
      folder / 'model.safetensors')
  (folder / 'config.json').write_text(json.dumps(
      {'architecture': 'swin_base_patch4_window7_224', 'num_classes': 1000}))
  with pytest.raises(ValueError, match=r'not a timm VisionTransformer.*swin'):
    sources.load(folder)


def tiny_source(**options) -> base.Source:
  model = models.create_model('ViT-Ti_16', 10, **{
      **names.TINY, **options, **base.INFERENCE_OPTIONS})
  return base.Source(model=model, model_name='ViT-Ti_16',
                     params=names.random_params(model), image_size=(32, 32),
                     label_names=[f'l{i}' for i in range(10)],
                     preprocessing=images.Preprocessing(),
                     step=None, origin={'kind': 'npz', 'path': 'tiny.npz'})


@pytest.mark.parametrize('options', [
    dict(), dict(classifier='gap', num_registers=2, fc_norm=True,
                 posemb_prefix=False, layerscale=0.1)])
def test_timm_export_reloads_exactly_and_names_the_call(tmp_path, options):
  source = tiny_source(**options)
  card_path = sources.write_export(source, tmp_path / 'out', 'tiny',
                                   formats=('timm',))
  card = json.loads(card_path.read_text())
  assert set(card['files']) == {'timm', 'timm_config'}
  assert 'timm.create_model' in card['loading']['timm']
  assert ("pretrained_cfg_overlay=dict(cfg['pretrained_cfg'], "
          "file='tiny.timm/model.safetensors')") in card['loading']['timm']
  folder = tmp_path / 'out' / 'tiny.timm'
  config = json.loads((folder / 'config.json').read_text())
  assert config['model_args']['act_layer'] == 'gelu_tanh'
  back = sources.load(folder)
  assert back.model.activation == 'gelu_tanh'
  x = pixels()
  np.testing.assert_array_equal(logits(back, x), logits(source, x))
  for entry in card['files'].values():
    assert card_lib.file_sha256(tmp_path / 'out' / entry['path']) == (
        entry['sha256'])


def test_export_refuses_what_timm_cannot_hold_before_writing(tmp_path):
  source = tiny_source(representation_size=16)
  with pytest.raises(ValueError, match='pre-logits.*no timm equivalent'):
    sources.write_export(source, tmp_path / 'out', 'tiny',
                         formats=('npz', 'timm'))
  assert not (tmp_path / 'out').exists()


def _hub_cache(root: pathlib.Path, repo_id: str, files: dict) -> None:
  """huggingface_hub's cache layout: refs/main names a snapshot folder."""
  repo = root / ('models--' + repo_id.replace('/', '--'))
  revision = 'a' * 40
  (repo / 'refs').mkdir(parents=True)
  (repo / 'refs' / 'main').write_text(revision)
  snapshot = repo / 'snapshots' / revision
  snapshot.mkdir(parents=True)
  for name, write in files.items():
    write(snapshot / name)


def test_hub_id_from_an_offline_cache_through_predict(tmp_path):
  pytest.importorskip('huggingface_hub',
                      reason='the [hub] extra (huggingface_hub) is absent')
  state = names.published_state(np.random.default_rng(0))
  _hub_cache(tmp_path / 'hub', 'timm/vit_tiny_patch8_32.test', {
      'model.safetensors': lambda p: safetensors.numpy.save_file(state, p),
      'config.json': lambda p: p.write_text(json.dumps(CONFIG))})
  image = tmp_path / 'cat.png'
  Image.fromarray(np.random.default_rng(0).integers(
      0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
  env = {**os.environ, 'HF_HUB_OFFLINE': '1',
         'HF_HUB_CACHE': str(tmp_path / 'hub'), 'JAX_PLATFORMS': 'cpu'}
  run = lambda model: subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--model={model}',
       '--top_k=1', str(image)], cwd=REPO, env=env, capture_output=True,
      text=True, timeout=300)
  result = run('hf-hub:timm/vit_tiny_patch8_32.test')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'class_' in result.stdout
  missing = run('hf-hub:timm/not_in_cache')
  assert missing.returncode != 0
  assert 'not found in the local cache' in missing.stderr
