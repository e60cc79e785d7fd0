"""Checkpoints: .npz layouts and export, fine-tuning adaptation, position-
embedding interpolation, Orbax training state across meshes, bad input."""
import functools
import importlib.util
import logging
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
import numpy as np
import optax
import pytest
import scipy.ndimage

from vit_jax import checkpoint
from vit_jax.checkpoint import arrays
from vit_jax import models
from vit_jax.checkpoint import posemb as posemb_lib
from vit_jax.runs import state_checkpoint

_WORKER_PATH = pathlib.Path(__file__).with_name('checkpoint_worker.py')
_spec = importlib.util.spec_from_file_location('checkpoint_worker', _WORKER_PATH)
worker = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(worker)

TINY = worker.TINY
POSEMB = 'Transformer/posembed_input/pos_embedding'
# What the official files call the children of an encoder block (pre-linen
# flax numbered submodules across types), written out independently of the
# code under test.
PRE_LINEN = {'LayerNorm_0': 'LayerNorm_0',
             'MultiHeadDotProductAttention_0': 'MultiHeadDotProductAttention_1',
             'LayerNorm_1': 'LayerNorm_2', 'MlpBlock_0': 'MlpBlock_3'}


# ---- helpers ----------------------------------------------------------------

def make_model(name='ViT-Ti_16', num_classes=10, **overrides):
  return models.create_model(name, num_classes, **{**TINY, **overrides})


def init_params(model, size=(32, 32), seed=0):
  """Random params of `model` at `size` pixels, as numpy arrays.

  Shapes from eval_shape (no compilation: fast on 2 CPU cores), values random
  everywhere: the zero-initialised head would make all logits equal, and
  identical LayerNorm inits would hide swapped names.
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *size, 3)))['params']
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda path, x: (rng.normal(0, 0.1, x.shape)
                       + (jax.tree_util.keystr(path).endswith("'scale']")))
      .astype(x.dtype), shapes)


def images(size=(32, 32), n=2, seed=0):
  return jax.random.uniform(jax.random.key(seed), (n, *size, 3),
                            minval=-1, maxval=1)


@functools.cache
def _jitted_apply(model):
  return jax.jit(lambda params, x: model.apply({'params': params}, x,
                                               train=False))


def logits(model, params, size=(32, 32), n=2):
  return np.asarray(_jitted_apply(model)(params, images(size, n)))


def flat(tree):
  return arrays.flatten(tree)


def assert_trees_equal(a, b):
  fa, fb = flat(a), flat(b)
  assert sorted(fa) == sorted(fb)
  for key in fa:
    assert np.asarray(fa[key]).dtype == np.asarray(fb[key]).dtype, key
    np.testing.assert_array_equal(np.asarray(fa[key]), np.asarray(fb[key]),
                                  err_msg=key)


def to_original_file(params, prefix='', gn_4d=False):
  """Google's original layout, built from the key list of the issue."""
  out = {}
  for key, value in flat(params).items():
    parts = key.split('/')
    if len(parts) > 2 and parts[1].startswith('encoderblock_'):
      parts[2] = PRE_LINEN[parts[2]]
    if gn_4d and len(parts) > 1 and parts[-2].startswith('gn'):
      value = np.asarray(value).reshape(1, 1, 1, -1)
    out[prefix + '/'.join(parts)] = np.asarray(value)
  return out


def to_big_vision_file(params, stacked=False):
  """big_vision's layout: params/ prefix, top-level pos_embedding without a
  class slot (the class token gets its position term folded in), linen
  numbering, optionally scan-stacked blocks, optimizer state beside."""
  f = {k: np.asarray(v) for k, v in flat(params).items()}
  pe = f.pop(POSEMB)
  if 'cls' in f:  # token models; 'gap' ones have no class slot at all
    f['cls'] = f['cls'] + pe[:, :1]
    pe = pe[:, 1:]
  f['pos_embedding'] = pe
  if stacked:
    f = flat(models.stack_encoder_blocks(arrays.unflatten(f)))
  out = {'params/' + k: np.asarray(v) for k, v in f.items()}
  out['opt/state/count'] = np.int32(3)  # must be ignored
  return out


@pytest.fixture(scope='module')
def vit():
  model = make_model()
  return model, init_params(model)


@pytest.fixture(scope='module')
def hybrid():
  model = make_model('R26+ViT-S_32', resnet_layers=(1, 1), patch_size=1)
  return model, init_params(model)


# ---- npz round trips and export format --------------------------------------

@pytest.mark.parametrize('which', ['vit', 'hybrid'])
def test_npz_round_trip(which, request, tmp_path):
  model, params = request.getfixturevalue(which)
  path = tmp_path / 'export.npz'
  checkpoint.save_npz(path, params)
  # The file is Google's original layout, key for key (what timm and
  # Google's vision_transformer read).
  with np.load(path) as raw:
    assert sorted(raw.files) == sorted(to_original_file(params))
    assert 'Transformer/encoderblock_1/MlpBlock_3/Dense_1/kernel' in raw.files
  loaded = checkpoint.load_npz(path)
  assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


def test_npz_round_trip_scan_layout(vit, tmp_path):
  _, unrolled = vit
  model = make_model(scan_layers=True)
  params = jax.tree.map(np.asarray, models.stack_encoder_blocks(unrolled))
  path = tmp_path / 'scan.npz'
  checkpoint.save_npz(path, params)
  with np.load(path) as raw:  # exported unrolled: Google's code has no scan
    assert sorted(raw.files) == sorted(to_original_file(unrolled))
  assert_trees_equal(checkpoint.load_npz(path), unrolled)
  init = init_params(model, seed=5)
  loaded = checkpoint.load_pretrained(path, init, model, adapt=())
  assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


def test_npz_bfloat16(vit, tmp_path):
  model, params = vit
  path = tmp_path / 'bf16.npz'
  checkpoint.save_npz(path, params, bfloat16=True)
  with np.load(path) as raw:
    assert raw['embedding/kernel'].dtype == np.dtype('V2')  # numpy has no bf16
  loaded = checkpoint.load_npz(path)
  expected = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
  assert_trees_equal(loaded, expected)
  # Into a float32 model: cast back, logits close to the float32 ones.
  restored = checkpoint.load_pretrained(path, params, adapt=())
  assert flat(restored)['head/kernel'].dtype == np.float32
  np.testing.assert_allclose(logits(model, restored), logits(model, params),
                             atol=0.1, rtol=0.05)


# ---- official layouts ---------------------------------------------------------

@pytest.mark.parametrize('layout', ['original', 'original_opt_target',
                                    'big_vision', 'big_vision_stacked',
                                    'big_vision_gap'])
def test_official_layouts_give_same_logits(layout, vit, tmp_path):
  model, params = vit
  if layout.endswith('gap'):
    model = make_model(classifier='gap')
    params = init_params(model, seed=4)
  if layout.startswith('original'):
    prefix = 'opt/target/' if layout.endswith('opt_target') else ''
    arrays = to_original_file(params, prefix)
  else:
    arrays = to_big_vision_file(params, stacked=layout.endswith('stacked'))
  path = tmp_path / f'{layout}.npz'
  np.savez(path, **arrays)
  loaded = checkpoint.load_pretrained(path, init_params(model, seed=3), model,
                                      adapt=())
  np.testing.assert_allclose(logits(model, loaded), logits(model, params),
                             rtol=1e-5, atol=1e-5)
  if layout.startswith('original'):  # same arrays, only renamed
    assert_trees_equal(checkpoint.load_npz(path), params)


def test_big_vision_stacked_into_scan_model(vit, tmp_path):
  _, params = vit
  path = tmp_path / 'bv.npz'
  np.savez(path, **to_big_vision_file(params, stacked=True))
  assert 'encoderblock' in checkpoint.load_npz(path)['Transformer']  # as stored
  scan_model = make_model(scan_layers=True)
  loaded = checkpoint.load_pretrained(path, init_params(scan_model), adapt=())
  np.testing.assert_allclose(logits(scan_model, loaded),
                             logits(make_model(), params), rtol=1e-5, atol=1e-5)


def test_original_hybrid_with_4d_groupnorm(hybrid, tmp_path):
  model, params = hybrid
  path = tmp_path / 'r26.npz'
  arrays = to_original_file(params, 'opt/target/', gn_4d=True)
  assert arrays['opt/target/gn_root/scale'].shape[:3] == (1, 1, 1)
  np.savez(path, **arrays)
  loaded = checkpoint.load_npz(path)
  assert_trees_equal(loaded, params)
  np.testing.assert_array_equal(logits(model, loaded), logits(model, params))


# ---- position-embedding interpolation ----------------------------------------

@pytest.mark.parametrize('method', ['bilinear', 'bicubic'])
def test_interpolate_identity(method):
  pe = np.random.RandomState(0).randn(1, 1 + 12, 8).astype(np.float32)
  out = posemb_lib.interpolate_posemb(pe, (3, 4), num_prefix_tokens=1,
                                      old_grid=(3, 4), method=method)
  np.testing.assert_array_equal(out, pe)


@pytest.mark.parametrize('old,new,prefix', [
    ((3, 3), (5, 5), 1), ((4, 4), (2, 2), 1), ((3, 5), (7, 2), 0),
    ((2, 6), (6, 3), 1), ((1, 4), (3, 4), 0), ((7, 7), (12, 12), 1)])
def test_bilinear_equals_scipy_zoom(old, new, prefix):
  pe = np.random.RandomState(1).randn(1, prefix + old[0] * old[1], 6)
  pe = pe.astype(np.float32)
  out = posemb_lib.interpolate_posemb(pe, new, num_prefix_tokens=prefix,
                                      old_grid=old)
  # Google's fine-tuning code, verbatim in spirit.
  grid = pe[0, prefix:].reshape(*old, -1)
  zoomed = scipy.ndimage.zoom(grid, (new[0] / old[0], new[1] / old[1], 1),
                              order=1)
  assert out.shape == (1, prefix + new[0] * new[1], 6)
  np.testing.assert_array_equal(out[:, :prefix], pe[:, :prefix])
  np.testing.assert_allclose(out[0, prefix:].reshape(zoomed.shape), zoomed,
                             rtol=1e-6, atol=1e-6)


def _aa_bicubic_matrix(n_in, n_out, a=-0.5):
  """PIL's / PyTorch's antialiased bicubic weights (timm's resampling),
  written from the algorithm: half-pixel centres, kernel widened by the
  downscale factor, weights renormalised over in-range taps."""
  def cubic(x):
    x = abs(x)
    if x < 1:
      return ((a + 2) * x - (a + 3)) * x * x + 1
    return (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
  scale = n_in / n_out
  stretch = max(scale, 1.0)
  w = np.array([[cubic((i + 0.5 - (o + 0.5) * scale) / stretch)
                 for i in range(n_in)] for o in range(n_out)])
  return w / w.sum(axis=1, keepdims=True)


@pytest.mark.parametrize('old,new', [((8, 8), (3, 3)), ((3, 5), (7, 4)),
                                     ((6, 4), (4, 9))])
def test_bicubic_antialiased_matches_timm_algorithm(old, new):
  pe = np.random.RandomState(2).randn(1, 1 + old[0] * old[1], 5)
  pe = pe.astype(np.float32)
  out = posemb_lib.interpolate_posemb(pe, new, num_prefix_tokens=1,
                                      old_grid=old, method='bicubic')
  grid = pe[0, 1:].reshape(*old, -1).astype(np.float64)
  ref = np.einsum('Hh,Ww,hwd->HWd', _aa_bicubic_matrix(old[0], new[0]),
                  _aa_bicubic_matrix(old[1], new[1]), grid)
  np.testing.assert_array_equal(out[:, :1], pe[:, :1])
  np.testing.assert_allclose(out[0, 1:].reshape(ref.shape), ref, atol=1e-5)


def test_interpolate_rejects_bad_grids():
  pe = np.zeros((1, 1 + 8, 4), np.float32)
  with pytest.raises(ValueError, match='8 patch tokens.*not a square'):
    posemb_lib.interpolate_posemb(pe, (4, 4), num_prefix_tokens=1)
  with pytest.raises(ValueError, match=r'old_grid=\(3, 3\) needs 9'):
    posemb_lib.interpolate_posemb(pe, (4, 4), num_prefix_tokens=1,
                                  old_grid=(3, 3))
  with pytest.raises(ValueError, match='Unknown position-embedding'):
    posemb_lib.interpolate_posemb(pe, (4, 4), num_prefix_tokens=1,
                                  old_grid=(2, 4), method='nearest')


def test_non_square_grids_in_load_pretrained(tmp_path):
  model = make_model()
  # Pretrained at 16x32 px (2x4 patches), fine-tuned at 24x40 (3x5).
  source = init_params(model, size=(16, 32))
  path = tmp_path / 'wide.npz'
  checkpoint.save_npz(path, source)
  target = init_params(model, size=(24, 40), seed=1)
  loaded = checkpoint.load_pretrained(path, target, model, old_grid=(2, 4),
                                      new_grid=(3, 5))
  grid = source['Transformer']['posembed_input']['pos_embedding'][0, 1:]
  zoomed = scipy.ndimage.zoom(grid.reshape(2, 4, -1), (3 / 2, 5 / 4, 1),
                              order=1)
  pe = loaded['Transformer']['posembed_input']['pos_embedding']
  np.testing.assert_allclose(pe[0, 1:].reshape(zoomed.shape), zoomed,
                             atol=1e-6)
  assert np.isfinite(logits(model, loaded, size=(24, 40))).all()


def test_finetune_at_384_from_224_checkpoint(tmp_path):
  kw = dict(patch_size=16)
  pretrained_model = make_model(**kw)
  pretrained = init_params(pretrained_model, size=(224, 224))
  path = tmp_path / 'vit_224.npz'
  checkpoint.save_npz(path, pretrained)
  model = make_model(num_classes=5, **kw)
  init = init_params(model, size=(384, 384), seed=1)
  params = checkpoint.load_pretrained(path, init, model)  # default adaptations
  pe_old = pretrained['Transformer']['posembed_input']['pos_embedding']
  pe_new = params['Transformer']['posembed_input']['pos_embedding']
  assert pe_new.shape == (1, 1 + 24 * 24, 64)
  np.testing.assert_array_equal(pe_new[:, 0], pe_old[:, 0])  # class slot kept
  zoomed = scipy.ndimage.zoom(pe_old[0, 1:].reshape(14, 14, -1),
                              (24 / 14, 24 / 14, 1), order=1)
  np.testing.assert_allclose(pe_new[0, 1:], zoomed.reshape(576, -1), atol=1e-6)
  np.testing.assert_array_equal(params['head']['kernel'],
                                init['head']['kernel'])  # re-initialised
  np.testing.assert_array_equal(params['embedding']['kernel'],
                                pretrained['embedding']['kernel'])
  out = logits(model, params, size=(384, 384), n=1)
  assert out.shape == (1, 5) and np.isfinite(out).all()
  bicubic = checkpoint.load_pretrained(path, init, model,
                                       posemb_method='bicubic')
  pe_bicubic = bicubic['Transformer']['posembed_input']['pos_embedding']
  assert pe_bicubic.shape == pe_new.shape
  assert not np.allclose(pe_bicubic, pe_new)


# ---- adapting heads -----------------------------------------------------------

def test_new_classes_reinitialise_head(vit, tmp_path):
  _, params = vit
  path = tmp_path / 'c10.npz'
  checkpoint.save_npz(path, params)
  model = make_model(num_classes=3)
  init = init_params(model, seed=9)
  loaded = checkpoint.load_pretrained(path, init, model)
  assert_trees_equal(loaded['head'], init['head'])
  rest = lambda t: {k: v for k, v in flat(t).items() if not k.startswith('head/')}
  assert_trees_equal(rest(loaded), rest(params))
  assert logits(model, loaded).shape == (2, 3)
  with pytest.raises(ValueError) as err:
    checkpoint.load_pretrained(path, init, model, adapt=())
  message = str(err.value)
  assert str(path) in message
  assert 'head/kernel: checkpoint (64, 10) vs model (64, 3)' in message
  assert "adapt=(..., 'head')" in message


def test_pre_logits_dropped_or_kept(tmp_path):
  source_model = make_model(representation_size=32)
  source = init_params(source_model)
  path = tmp_path / 'rep.npz'
  checkpoint.save_npz(path, source)
  # Drop-head variant: the new model has no pre_logits.
  plain = make_model(num_classes=4)
  loaded = checkpoint.load_pretrained(path, init_params(plain), plain)
  assert 'pre_logits' not in loaded
  assert logits(plain, loaded).shape == (2, 4)
  # Same representation size: pre_logits kept, only the head is new.
  same = make_model(num_classes=4, representation_size=32)
  loaded = checkpoint.load_pretrained(path, init_params(same, seed=2), same)
  assert_trees_equal(loaded['pre_logits'], source['pre_logits'])
  # Not asked to adapt: one error naming the file and the keys.
  with pytest.raises(ValueError, match=r'(?s)rep\.npz.*unexpected.*'
                     r'pre_logits/bias.*pre_logits/kernel.*pre_logits'):
    checkpoint.load_pretrained(path, init_params(plain), adapt=('head',))


# ---- bad input ----------------------------------------------------------------

def test_truncated_corrupt_and_foreign_files(vit, tmp_path):
  _, params = vit
  good = tmp_path / 'good.npz'
  checkpoint.save_npz(good, params)
  data = good.read_bytes()
  truncated = tmp_path / 'truncated.npz'
  truncated.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'truncated\.npz.*truncated, corrupt'):
    checkpoint.load_npz(truncated)
  corrupt = tmp_path / 'corrupt.npz'
  middle = len(data) // 2
  corrupt.write_bytes(data[:middle] + bytes(64) + data[middle + 64:])
  with pytest.raises(ValueError, match=r"corrupt\.npz.*truncated, corrupt"):
    checkpoint.load_npz(corrupt)
  text = tmp_path / 'notes.npz'
  text.write_text('not a checkpoint\n')
  with pytest.raises(ValueError, match=r'notes\.npz'):
    checkpoint.load_npz(text)
  single = tmp_path / 'single.npy'
  np.save(single, np.zeros(3))
  with pytest.raises(ValueError, match=r'single\.npy holds a single array'):
    checkpoint.load_npz(single)
  with pytest.raises(FileNotFoundError):
    checkpoint.load_npz(tmp_path / 'missing.npz')


def test_other_architecture_is_one_clear_error(vit, tmp_path):
  _, params = vit
  path = tmp_path / 'two_layers.npz'
  checkpoint.save_npz(path, params)
  model = make_model(num_layers=3, mlp_dim=96)
  with pytest.raises(ValueError) as err:
    checkpoint.load_pretrained(path, init_params(model), model)
  message = str(err.value)
  assert message.startswith(f'Checkpoint {path} does not fit the model')
  assert 'missing from the checkpoint (16)' in message
  assert 'Transformer/encoderblock_2/MlpBlock_0/Dense_0/kernel' in message
  assert ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: checkpoint '
          '(64, 128) vs model (64, 96)') in message


def test_non_square_to_square_without_interpolation(tmp_path):
  model = make_model()
  path = tmp_path / 'wide.npz'
  checkpoint.save_npz(path, init_params(model, size=(16, 32)))  # 2x4 grid
  init = init_params(model)  # 4x4 grid
  with pytest.raises(ValueError) as err:
    checkpoint.load_pretrained(path, init, model, adapt=('head',))
  message = str(err.value)
  assert str(path) in message
  assert f'{POSEMB}: checkpoint (1, 9, 64) vs model (1, 17, 64)' in message
  assert "adapt=(..., 'posemb')" in message
  # Asked to interpolate, but 8 patches are no square: say which grid to pass.
  with pytest.raises(ValueError, match=r'(?s)wide\.npz.*\(1, 9, 64\).*'
                     r'8 patch tokens, which is not a square'):
    checkpoint.load_pretrained(path, init, model)


def test_model_config_must_match_init_params(vit):
  _, params = vit
  with pytest.raises(ValueError, match='do not match model_config'):
    checkpoint.load_pretrained(params, params, make_model(classifier='gap'))


# ---- Orbax training state -----------------------------------------------------

def _mesh(num_devices):
  return Mesh(np.array(jax.devices()[:num_devices]), ('data',))


def _assert_state_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.dtype == w.dtype and g.shape == w.shape
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


@pytest.mark.parametrize('save_on,restore_on', [(8, 1), (8, 4), (1, 4)])
def test_orbax_restore_onto_other_meshes(save_on, restore_on, tmp_path):
  state = worker.make_state(_mesh(save_on))
  assert state['params']['embedding']['kernel'].sharding.mesh.size == save_on
  with state_checkpoint.StateCheckpointer(tmp_path / 'ckpt') as ckpt:
    assert ckpt.save(7, state, {'data_position': 123, 'config': {'lr': 0.1}})
  with state_checkpoint.StateCheckpointer(tmp_path / 'ckpt') as ckpt:
    mesh = _mesh(restore_on)
    restored, meta = ckpt.restore(worker.abstract_state(mesh))
  _assert_state_equal(restored, state)
  assert meta == {'data_position': 123, 'config': {'lr': 0.1}}
  assert isinstance(restored['opt_state'][1][0], optax.ScaleByAdamState)
  for leaf in jax.tree.leaves(restored):
    assert leaf.sharding.mesh.devices.size == restore_on


def test_orbax_restore_in_processes_with_1_and_4_devices(tmp_path):
  state = worker.make_state(_mesh(8))
  with state_checkpoint.StateCheckpointer(tmp_path / 'ckpt') as ckpt:
    ckpt.save(7, state, {'data_position': 55})
  expected = tmp_path / 'expected.npz'
  np.savez(expected, **worker.flat_leaves(state))
  env = {**os.environ, 'PYTHONPATH': str(pathlib.Path(__file__).parents[1])}
  for devices in (1, 4):
    run = subprocess.run(
        [sys.executable, str(_WORKER_PATH), str(tmp_path / 'ckpt'),
         str(expected), str(devices)], env=env, capture_output=True,
        text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'OK {devices} 55' in run.stdout


def _small_state(value):
  return {'w': jnp.full((4, 2), value, jnp.float32),
          'step': jnp.asarray(value, jnp.int32)}


def test_keeps_last_n_saves_async(tmp_path):
  ckpt = state_checkpoint.StateCheckpointer(tmp_path, max_to_keep=2)
  for step in range(1, 5):
    assert ckpt.save(step, _small_state(step), {'step': step})
    # While the background write runs, only committed steps are listed.
    in_flight = list(tmp_path.glob(f'{step}.orbax-checkpoint-tmp*'))
    if in_flight:
      assert ckpt.latest_step() != step
  ckpt.wait_until_finished()
  assert ckpt.all_steps() == [3, 4] and ckpt.latest_step() == 4
  assert not ckpt.save(4, _small_state(9), {'step': 9})  # never overwritten
  state, meta = ckpt.restore(_small_state(0))
  _assert_state_equal(state, _small_state(4))
  assert meta == {'step': 4}
  state, meta = ckpt.restore(_small_state(0), step=3)
  assert meta == {'step': 3}
  ckpt.close()


def test_a_save_waiting_on_the_previous_one_is_said_once(
    tmp_path, caplog, monkeypatch):
  # Any wait counts as slow here; Orbax's own line would repeat at every save.
  monkeypatch.setattr(state_checkpoint, 'SLOW_SAVE_SECONDS', 0.0)
  with state_checkpoint.StateCheckpointer(tmp_path) as ckpt:
    with caplog.at_level(logging.WARNING, logger=state_checkpoint.__name__):
      for step in range(1, 4):
        assert ckpt.save(step, _small_state(step), {'step': step})
  said = [r.getMessage() for r in caplog.records
          if r.name == state_checkpoint.__name__]
  assert len(said) == 1, said
  assert 'Step 2 waited' in said[0] and 'checkpoint 1' in said[0]
  assert 'checkpoint_every' in said[0]


def test_async_save_copies_before_returning(tmp_path):
  """The trainer donates the state to the next step right after save()."""
  state = {'w': jnp.arange(1 << 20, dtype=jnp.float32).reshape(256, -1)}
  expected = np.asarray(state['w'])
  with state_checkpoint.StateCheckpointer(tmp_path) as ckpt:
    assert ckpt.save(1, state, {'step': 1})
    state['w'].delete()  # what buffer donation does
    if list(tmp_path.glob('1.orbax-checkpoint-tmp*')):  # still being written
      assert ckpt.latest_step() is None
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 1
    restored, _ = ckpt.restore({'w': jax.ShapeDtypeStruct((256, 4096),
                                                          jnp.float32)})
  np.testing.assert_array_equal(np.asarray(restored['w']), expected)


def test_half_written_checkpoint_is_never_exposed(tmp_path):
  with state_checkpoint.StateCheckpointer(tmp_path) as ckpt:
    ckpt.save(1, _small_state(1), {'step': 1})
  # A crash mid-save leaves Orbax's temporary directory behind.
  partial = tmp_path / '2.orbax-checkpoint-tmp-1700000000'
  (partial / 'state').mkdir(parents=True)
  (partial / 'state' / 'manifest.ocdbt').write_bytes(b'\0' * 10)
  with state_checkpoint.StateCheckpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [1]
    _, meta = ckpt.restore(_small_state(0))
    assert meta == {'step': 1}
    ckpt.save(2, _small_state(2), {'step': 2})
  # Garbage of a killed run: removed in the background, at the latest
  # before the first save.
  assert not partial.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2']


def _damage(step_dir: pathlib.Path):
  """Truncates every array data file, as a full disk or a bad copy would."""
  files = [p for p in step_dir.rglob('*') if p.is_file() and p.parent.name == 'd']
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[:5])


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
  with state_checkpoint.StateCheckpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _small_state(1), {'step': 1})
    ckpt.save(2, _small_state(2), {'step': 2})
  _damage(tmp_path / '2')
  ckpt = state_checkpoint.StateCheckpointer(tmp_path, async_save=False)
  with pytest.raises(ValueError, match=f'{tmp_path}/2 unreadable'):
    ckpt.restore(_small_state(0), step=2)
  with caplog.at_level(logging.WARNING, logger=state_checkpoint.__name__):
    state, meta = ckpt.restore(_small_state(0))
  assert meta == {'step': 1}
  _assert_state_equal(state, _small_state(1))
  assert 'Checkpoint step 2 is unreadable' in caplog.text
  # The resumed run saves step 2 again: the unreadable one is set aside.
  assert ckpt.save(2, _small_state(20), {'step': 20})
  assert ckpt.all_steps() == [1, 2]
  assert (tmp_path / '2.unreadable').is_dir()
  state, meta = ckpt.restore(_small_state(0))
  assert meta == {'step': 20}
  ckpt.close()


def test_restore_reports_tree_mismatch(tmp_path):
  with state_checkpoint.StateCheckpointer(tmp_path, async_save=False) as ckpt:
    ckpt.save(1, _small_state(1), {'step': 1})
    ckpt.save(2, _small_state(2), {'step': 2})
    wrong = {'w': jnp.zeros((3, 2)), 'extra': jnp.zeros(2)}
    with pytest.raises(ValueError) as err:
      ckpt.restore(wrong)  # no silent fall-back to step 1 either
  message = str(err.value)
  assert f'{tmp_path}/2 does not match' in message
  assert 'requested but not on disk (1):\n    extra' in message
  assert 'on disk but not requested (1):\n    step' in message
  assert 'w: on disk (4, 2) vs requested (3, 2)' in message


def test_save_rejects_non_json_meta_and_restore_needs_a_checkpoint(tmp_path):
  with state_checkpoint.StateCheckpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match=r"meta\['config'\] is not JSON"):
      ckpt.save(1, _small_state(1), {'config': object()})
    assert ckpt.latest_step() is None
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
      ckpt.restore(_small_state(0))
