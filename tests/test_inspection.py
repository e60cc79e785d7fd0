"""Inspection: hand-built attention and embeddings with known answers, and
the `python -m vit_jax.inspect` CLI on tiny models (token, gap, hybrid)."""
import itertools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import pretrain
from vit_jax import checkpoint
from vit_jax.evaluation import inspection
from vit_jax import sources
from vit_jax.sources import export
from vit_jax import models
from vit_jax.training import trainer as train

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = dict(hidden_size=32, num_layers=2, num_heads=2, mlp_dim=64)


def softmax_weights(layers, batch, heads, tokens, seed=0):
  logits = np.random.default_rng(seed).normal(
      size=(layers, batch, heads, tokens, tokens)) * 3
  e = np.exp(logits)
  return e / e.sum(-1, keepdims=True)


def attend_to(tokens, pairs):
  """One head whose query i attends only to key j for (i, j) in pairs, else
  to itself; shape [1 batch, 1 head, T, T]."""
  a = np.eye(tokens)
  for i, j in pairs:
    a[i] = np.eye(tokens)[j]
  return a[None, None]


# ---- attention rollout ----------------------------------------------------

def test_rollout_rows_sum_to_one():
  w = softmax_weights(3, 2, 4, 10)
  np.testing.assert_allclose(inspection.rollout_matrix(w).sum(-1), 1,
                             atol=1e-12)
  for prefix in (0, 1):
    row = inspection.attention_rollout(list(w), prefix)  # a per-layer list too
    assert row.shape == (2, 10)
    np.testing.assert_allclose(row.sum(-1), 1, atol=1e-12)


def test_rollout_of_uniform_attention_is_half_residual_half_uniform():
  t = 5
  w = np.full((1, 1, 1, t, t), 1 / t)
  token = inspection.attention_rollout(w, num_prefix_tokens=1)[0]
  np.testing.assert_allclose(token, 0.5 / t + 0.5 * np.eye(t)[0])
  # gap: the mean over all output rows, here uniform.
  np.testing.assert_allclose(inspection.attention_rollout(w, 0)[0],
                             np.full(t, 1 / t))


def test_rollout_multiplies_layers_from_the_output_down():
  # Layer 1: token 0 reads token 1; layer 2: token 1 reads token 2. The output
  # token 0 reads layer-1 token 0 only, so token 2 must not reach it.
  w = np.stack([attend_to(3, [(0, 1)]), attend_to(3, [(1, 2)])])
  np.testing.assert_allclose(inspection.attention_rollout(w, 1)[0],
                             [0.5, 0.5, 0.0])
  # Reversed: token 0 reads 1 (layer 2), which read 2 (layer 1).
  np.testing.assert_allclose(inspection.attention_rollout(w[::-1], 1)[0],
                             [0.5, 0.25, 0.25])


def test_to_grid_and_per_layer_maps_drop_the_class_token():
  w = softmax_weights(2, 3, 2, 1 + 6)
  maps = inspection.to_grid(inspection.layer_attention(w, 1), (2, 3), 1)
  assert maps.shape == (2, 3, 2, 3)
  np.testing.assert_allclose(maps[1, 2].ravel(), w[1, 2, :, 0, 1:].mean(0))
  with pytest.raises(ValueError, match='grid'):
    inspection.to_grid(np.zeros((3, 7)), (2, 2), 1)


# ---- position-embedding similarity ----------------------------------------

def test_posemb_similarity_has_unit_diagonal_and_is_symmetric():
  pe = np.random.default_rng(0).normal(size=(1, 1 + 12, 16))
  sim = inspection.posemb_similarity(pe, (3, 4), num_prefix_tokens=1)
  assert sim.shape == (3, 4, 3, 4)
  flat = sim.reshape(12, 12)
  np.testing.assert_allclose(np.diag(flat), 1, atol=1e-12)
  np.testing.assert_array_equal(flat, flat.T)
  assert np.all(np.abs(flat) <= 1 + 1e-12)
  with pytest.raises(ValueError, match='patch slots'):
    inspection.posemb_similarity(pe, (3, 4), num_prefix_tokens=0)


def test_posemb_encoding_coordinates_gives_distance_decaying_similarity():
  # Each position's embedding: Gaussian bumps at its (row, col) on a fine grid
  # of centres reaching past the borders, so it encodes the coordinates.
  grid, sigma = (5, 7), 1.0
  cy, cx = np.meshgrid(np.arange(-4, 9, 0.5), np.arange(-4, 11, 0.5),
                       indexing='ij')
  pos = np.array(list(itertools.product(range(grid[0]), range(grid[1]))))
  d2 = ((pos[:, 0, None] - cy.ravel()) ** 2 +
        (pos[:, 1, None] - cx.ravel()) ** 2)
  pe = np.exp(-d2 / (2 * sigma**2))[None]
  # Through a model's parameter slot, with a class token in front.
  pe = np.concatenate([np.ones((1, 1, pe.shape[-1])), pe], axis=1)
  sim = inspection.posemb_similarity(pe, grid, 1).reshape(len(pos), len(pos))
  dist = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
  for i in range(len(pos)):  # for every reference: farther -> less similar
    order = np.argsort(dist[i], kind='stable')
    d, s = dist[i][order], sim[i][order]
    farther = d[1:] > d[:-1] + 1e-9
    assert np.all(s[1:][farther] < s[:-1][farther]), i
  # And the same offset gives the same similarity away from the borders.
  np.testing.assert_allclose(sim[0, 1], sim[15, 16], rtol=1e-6)


# ---- embedding filters ----------------------------------------------------

def test_embedding_filters_pca_finds_the_planted_components():
  p = 4
  rng = np.random.default_rng(0)
  u, v = np.linalg.qr(rng.normal(size=(p * p * 3, 2)))[0].T
  a, b = np.array([3., -3, 0, 0]), np.array([0., 0, 1, -1])
  filters = 0.7 + a[:, None] * u + b[:, None] * v  # (D=4, p*p*3)
  kernel = filters.T.reshape(p, p, 3, 4)
  comps, var = inspection.embedding_filters_pca(kernel, n=28)
  assert comps.shape == (4, p, p, 3)  # no more components than filters
  np.testing.assert_allclose(var[:2], [0.9, 0.1], atol=1e-12)
  np.testing.assert_allclose(var[2:], 0, atol=1e-12)
  for got, want in zip(comps[:2], (u, v)):
    want = want * np.sign(want[np.abs(want).argmax()])  # documented sign
    np.testing.assert_allclose(got.ravel(), want, atol=1e-10)


def test_hybrid_kernel_has_no_rgb_filters():
  with pytest.raises(ValueError, match='Hybrid models embed ResNet features'):
    inspection.embedding_filters_pca(np.zeros((1, 1, 64, 32)))


# ---- mean attention distance ----------------------------------------------

def test_attention_distance_self_is_zero_uniform_is_mean_pairwise():
  grid, px = (3, 5), (4, 8)  # non-square grid, non-square pixels per token
  t = 1 + 15
  own = np.broadcast_to(np.eye(t), (2, 1, t, t))  # [batch, head, T, T]
  uniform = np.full((2, 1, t, t), 1 / t)  # includes the class token
  w = np.concatenate([own, uniform], axis=1)[None].repeat(3, 0)  # 3 layers
  dist = inspection.mean_attention_distance(w, grid, px, num_prefix_tokens=1)
  cells = [(r * 4, c * 8) for r in range(3) for c in range(5)]
  pairwise = np.mean([np.hypot(a[0] - b[0], a[1] - b[1])
                      for a in cells for b in cells])
  assert dist.shape == (3, 2)
  np.testing.assert_allclose(dist[:, 0], 0, atol=1e-12)
  np.testing.assert_allclose(dist[:, 1], pairwise, rtol=1e-12)


def test_attention_distance_of_looking_at_one_corner():
  grid = (2, 3)
  w = np.zeros((1, 1, 1, 6, 6))
  w[..., 0] = 1  # gap model (no prefix): every patch looks at the top-left
  dist = inspection.mean_attention_distance(w, grid, 16, num_prefix_tokens=0)
  want = np.mean([16 * np.hypot(r, c) for r in range(2) for c in range(3)])
  np.testing.assert_allclose(dist, [[want]])


# ---- running a model ------------------------------------------------------

@pytest.mark.parametrize('classifier', ['token', 'gap'])
def test_collect_attention_is_the_same_unrolled_and_scanned(classifier):
  model = models.create_model('ViT-Ti_16', 10, patch_size=8,
                              classifier=classifier, **TINY)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 24, 3), minval=-1)
  params = model.init(jax.random.key(0), images)['params']
  w, logits = inspection.collect_attention(model, params, images)
  t = 6 + inspection.num_prefix_tokens(model)
  assert w.shape == (2, 2, 2, t, t) and logits.shape == (2, 10)
  np.testing.assert_allclose(w.sum(-1), 1, atol=1e-5)
  scanned = model.clone(scan_layers=True)
  w2, _ = inspection.collect_attention(
      scanned, models.stack_encoder_blocks(params), images)
  np.testing.assert_allclose(w2, w, atol=1e-6)


# ---- the CLI --------------------------------------------------------------

def run_cli(*args, returncode=0) -> subprocess.CompletedProcess:
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'XLA_FLAGS': ''}
  proc = subprocess.run([sys.executable, '-m', 'vit_jax.inspect', *args],
                        cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == returncode, proc.stderr[-3000:]
  return proc


def test_cli_help_and_usage_errors(tmp_path):
  assert '--per_layer' in run_cli('--help', returncode=0).stdout
  proc = run_cli('--output=/tmp/never_written', returncode=2)
  assert proc.stderr.startswith('error: --model is required.')
  proc = run_cli(f'--model={tmp_path}', f'--output={tmp_path / "out"}',
                 returncode=2)
  assert proc.stderr.startswith(f'error: --model={tmp_path} is neither a '
                                'training workdir')
  assert 'Traceback' not in proc.stderr


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
  """Five small photos of varied sizes and modes (RGB, grayscale)."""
  from PIL import Image
  folder = tmp_path_factory.mktemp('photos')
  rng = np.random.default_rng(0)
  for k, (h, w) in enumerate([(40, 60), (64, 48), (33, 71), (50, 50),
                              (20, 90)]):
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    im = Image.fromarray(pixels).convert('L' if k == 1 else 'RGB')
    im.save(folder / f'p{k}.{"png" if k % 2 else "jpg"}')
  return folder


ALL_PNGS = {'attention_rollout.png', 'attention_per_layer.png',
            'posemb_similarity.png', 'embedding_filters.png',
            'attention_distance.png'}


@pytest.mark.parametrize('name,fields,pngs', [
    ('ViT-Ti_16', dict(patch_size=8), ALL_PNGS),
    ('ViT-Ti_16', dict(patch_size=8, classifier='gap'), ALL_PNGS),
    ('R+ViT-Ti_16', dict(patch_size=2),  # stem stride 4: 8 px per token
     ALL_PNGS - {'embedding_filters.png'}),
])
def test_cli_on_a_tiny_random_model_writes_every_figure(
    name, fields, pngs, photos, tmp_path):
  model = models.create_model(name, 10, **TINY, **fields)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 48, 3)))['params']
  checkpoint.save_npz(tmp_path / 'params.npz', params)
  out = tmp_path / 'out'
  proc = run_cli(f'--model={tmp_path}', f'--model_name={name}',
                 '--image_size=32,48', str(photos), f'--output={out}',
                 '--per_layer', '--batch_size=2', '--num_show=3')
  assert {p.name for p in out.glob('*.png')} == pngs
  arrays = np.load(out / 'arrays.npz')
  prefix = inspection.num_prefix_tokens(model)
  assert tuple(arrays['grid']) == (4, 6)
  assert arrays['rollout'].shape == (5, 4, 6)
  assert arrays['per_layer'].shape == (2, 5, 4, 6)
  assert arrays['attention_distance'].shape == (2, 2)
  assert arrays['posemb_similarity'].shape == (4, 6, 4, 6)
  assert arrays['logits'].shape == (5, 10)
  # With a class token the map leaves some mass on it; without, none.
  mass = arrays['rollout'].sum(axis=(1, 2))
  assert np.all(mass < 1) if prefix else np.allclose(mass, 1, atol=1e-5)
  if name.startswith('R+'):
    assert 'embedding_filters' not in arrays.files
    assert 'no RGB filters' in proc.stderr
  else:
    assert arrays['embedding_filters'].shape == (28, 8, 8, 3)


def test_cli_from_a_trained_workdir_on_real_photos(tfds_data_dir,
                                                   imagenet_samples, tmp_path):
  config = pretrain.get_config('cifar10_quick')
  config.update(dict(data_dir=tfds_data_dir, train_split='train[:1%]',
                     eval_split='test[:80]', batch_size=16,
                     eval_batch_size=40, total_steps=2, log_every=1,
                     checkpoint_every=2))
  config.model.update(dict(TINY, patch_size=8, scan_layers=True))
  train.train_and_evaluate(config, tmp_path / 'work')
  out = tmp_path / 'out'
  run_cli(f'--model={tmp_path / "work"}', str(imagenet_samples),
          '--max_images=12', '--image_size=32,64', f'--output={out}')
  arrays = np.load(out / 'arrays.npz')
  assert arrays['rollout'].shape == (12, 4, 8)  # posemb resized 4x4 -> 4x8
  assert 'per_layer' not in arrays.files
  assert {p.name for p in out.glob('*.png')} == ALL_PNGS - {
      'attention_per_layer.png'}


def test_cli_from_an_export_reports_bad_photos_and_goes_on(photos, tmp_path):
  model = models.create_model('ViT-Ti_16', 10, patch_size=8, **TINY)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))['params']
  checkpoint.save_npz(tmp_path / 'tiny.npz', params)
  labels = tmp_path / 'labels.txt'
  labels.write_text(''.join(f'thing{i}\n' for i in range(10)))
  export.write_export(sources.from_npz(tmp_path / 'tiny.npz', 'ViT-Ti_16',
                                       labels=labels),
                      tmp_path / 'export', 'tiny', formats=('npz',))
  broken = tmp_path / 'broken.png'
  broken.write_bytes(b'\x89PNG\r\n not really')
  out = tmp_path / 'out'
  proc = run_cli(f'--model={tmp_path / "export"}', str(photos), str(broken),
                 f'--output={out}', returncode=1)
  assert f'error: {broken}: ' in proc.stderr
  assert 'error: 1 of 6 image file(s) could not be read.' in proc.stderr
  arrays = np.load(out / 'arrays.npz')
  assert arrays['rollout'].shape == (5, 4, 4)  # the five good photos
  assert str(broken) not in arrays['image_files']
  assert (out / 'attention_rollout.png').exists()
