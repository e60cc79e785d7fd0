"""cuDNN attention at every token count (vit_jax/models/attention.py).

CPU tests (always run): the padding and masking that make odd token counts
acceptable to cuDNN give plain attention's numbers, forward and gradient,
run with implementation='xla'; the module routes to it and warns, naming
the case, where cuDNN cannot serve.

GPU compile tests: the train step's gradient of every zoo model compiled for
an H100 (deviceless, `jax.experimental.topologies`) holds cuDNN's fused
attention custom calls. They need JAX's CUDA plugin (`pip install
"jax[cuda12]"`), not a GPU, and skip without it. `python tests/
test_attention.py` prints the full (model, resolution, head) table.
"""
import os
import sys
import time
import warnings

if __name__ == '__main__':  # the table: same setup as the test session
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
      __file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import attention
from vit_jax.models import layers
from vit_jax.models import registry
from vit_jax.models import vit
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.planning import gpus


def _qkv(q_len, kv_len, dtype, heads=2, head_dim=32, batch=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(ks[0], (batch, q_len, heads, head_dim), dtype)
  k = jax.random.normal(ks[1], (batch, kv_len, heads, head_dim), dtype)
  v = jax.random.normal(ks[2], (batch, kv_len, heads, head_dim), dtype)
  cotangent = jax.random.normal(ks[3], q.shape, jnp.float32)
  return (q, k, v), cotangent


def _value_and_grads(fn, qkv, cotangent):
  """fn's output and the gradient of <fn(q, k, v), cotangent> w.r.t. q, k, v."""
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return fn(*qkv), jax.grad(loss, (0, 1, 2))(*qkv)


def _plain(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation='xla')


def _padded(q, k, v):
  return attention.padded_dot_product_attention(q, k, v, implementation='xla')


# Token counts of the zoo: ViT-B/16 at 224 px with a class token (197), the
# MAP probe (1 query) over them, 4 registers (201), H/14 (257), /14 at 518 px
# with `gap` (1369), and small odd/even mixes.
LENGTHS = [(197, 197), (1, 197), (201, 201), (257, 257), (1, 1370),
           (5, 3), (4, 7)]


def test_padded_length():
  assert [attention.padded_length(n) for n in (1, 2, 197, 198)] == [
      2, 2, 198, 198]
  assert attention.padded_length(197, 64) == 256


@pytest.mark.parametrize('q_len,kv_len', LENGTHS)
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_padding_gives_plain_attention(q_len, kv_len, dtype):
  """Forward and gradient as unpadded attention. Only the reduction order
  of XLA's kernels may differ (shapes change), so up to a few ulps."""
  qkv, cotangent = _qkv(q_len, kv_len, dtype)
  ref, ref_grads = _value_and_grads(_plain, qkv, cotangent)
  out, grads = _value_and_grads(_padded, qkv, cotangent)
  assert out.shape == ref.shape and out.dtype == ref.dtype
  tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(
      rtol=1e-2, atol=1e-3)
  np.testing.assert_allclose(np.float32(out), np.float32(ref), **tol)
  for g, r in zip(grads, ref_grads):
    assert g.shape == r.shape
    np.testing.assert_allclose(np.float32(g), np.float32(r), **tol)


@pytest.mark.parametrize('q_len,kv_len', [(197, 197), (1, 197), (5, 3)])
def test_padding_exact_in_float64(q_len, kv_len):
  """In float64 the reduction-order noise falls below 1e-14: what is left
  of any difference is the padding logic's, and there is none."""
  with jax.enable_x64(True):
    qkv, cotangent = _qkv(q_len, kv_len, jnp.float64)
    cotangent = cotangent.astype(jnp.float64)
    ref, ref_grads = _value_and_grads(_plain, qkv, cotangent)
    out, grads = _value_and_grads(_padded, qkv, cotangent)
    assert out.dtype == jnp.float64
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-14)
    for g, r in zip(grads, ref_grads):
      np.testing.assert_allclose(g, r, rtol=0, atol=1e-13)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_padding_is_masked_exactly(dtype):
  """Padded keys get probability exactly 0 and padded rows gradient exactly 0:
  garbage in the padding changes no bit of the output or of the gradient
  of the real tokens. (What `padded_dot_product_attention` hands cuDNN.)"""
  (q, k, v), _ = _qkv(197, 197, dtype)
  lengths = jnp.full((2,), 197, jnp.int32)

  def attend(pad_value, q, k, v):
    pad = lambda x: jnp.concatenate(
        [x, jnp.full((2, 1, *x.shape[2:]), pad_value, x.dtype)], axis=1)
    y = jax.nn.dot_product_attention(
        pad(q), pad(k), pad(v), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation='xla')
    return y[:, :197]

  zero = attend(0.0, q, k, v)
  for garbage in (1e4, -3e3):
    np.testing.assert_array_equal(attend(garbage, q, k, v), zero)
  loss = lambda pad_value: (lambda *a: jnp.sum(
      attend(pad_value, *a).astype(jnp.float32)))
  g0 = jax.grad(loss(0.0), (0, 1, 2))(q, k, v)
  g1 = jax.grad(loss(1e4), (0, 1, 2))(q, k, v)
  for a, b in zip(g0, g1):
    np.testing.assert_array_equal(a, b)
  # The padded rows themselves get no gradient.
  def padded_loss(qp, kp, vp):
    y = jax.nn.dot_product_attention(
        qp, kp, vp, query_seq_lengths=lengths, key_value_seq_lengths=lengths,
        implementation='xla')
    return jnp.sum(y[:, :197].astype(jnp.float32))
  pad = lambda x: jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0)))
  grads = jax.grad(padded_loss, (0, 1, 2))(pad(q), pad(k), pad(v))
  for g in grads:
    assert not np.any(np.asarray(g[:, 197:], np.float32))


def test_even_lengths_pass_through_unpadded():
  (q, k, v), _ = _qkv(196, 196, jnp.bfloat16)
  jaxpr = str(jax.make_jaxpr(_padded)(q, k, v))
  assert 'pad' not in jaxpr
  np.testing.assert_array_equal(_padded(q, k, v), _plain(q, k, v))


def test_padding_under_a_batch_split_mesh():
  """Under the train step's mesh the sequence lengths are split over the
  batch like q (one per example on each device); same numbers."""
  mesh = mesh_lib.create_mesh()
  (q, k, v), cotangent = _qkv(197, 197, jnp.float32, batch=8)
  split = jax.device_put((q, k, v), mesh_lib.batch_sharding(mesh))
  ref, ref_grads = _value_and_grads(_plain, (q, k, v), cotangent)
  out, grads = jax.jit(mesh_lib.on_mesh(
      lambda *a: _value_and_grads(_padded, a, cotangent), mesh))(*split)
  np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(g, r, rtol=1e-6, atol=1e-6)


def _route_cudnn_to_xla(monkeypatch):
  """The module's cuDNN route (padding, masking, slicing) with XLA's kernel,
  so that it runs on the CPU."""
  monkeypatch.setattr(attention, 'cudnn_unavailable_reason',
                      lambda *a, **k: None)
  real = attention.padded_dot_product_attention
  monkeypatch.setattr(
      attention, 'padded_dot_product_attention',
      lambda q, k, v, implementation='cudnn', **kw: real(
          q, k, v, implementation='xla', **kw))


@pytest.mark.parametrize('q_len,kv_len', [(197, 197), (196, 196), (1, 197)])
def test_module_cudnn_route_matches_xla_attention(monkeypatch, q_len, kv_len):
  """MultiHeadDotProductAttention: the cuDNN route (its padding run on XLA)
  gives the 'xla' implementation's output and parameter gradients, same
  parameter names."""
  x = jax.random.normal(jax.random.key(1), (2, q_len, 48))
  keys = jax.random.normal(jax.random.key(2), (2, kv_len, 48))
  module = layers.MultiHeadDotProductAttention(num_heads=3)
  params = module.init(jax.random.key(0), x, True, keys=keys)
  _route_cudnn_to_xla(monkeypatch)
  cudnn = module.clone(implementation='cudnn')
  assert jax.tree.structure(cudnn.init(jax.random.key(0), x, True,
                                       keys=keys)) == jax.tree.structure(params)
  def run(m):
    loss = lambda p: jnp.sum(jnp.sin(m.apply(p, x, True, keys=keys)))
    return m.apply(params, x, True, keys=keys), jax.grad(loss)(params)
  (ref, ref_grads), (out, grads) = run(module), run(cudnn)
  np.testing.assert_allclose(out, ref, rtol=2e-5, atol=2e-6)
  # Two float32 computations (the module's 'xla' path scales q first):
  # rounding relative to the gradients' scale. (The key bias's gradient is
  # 0 up to rounding: softmax ignores it.)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(ref_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(
      a, b, rtol=2e-5, atol=1e-6 * scale), grads, ref_grads)


def test_map_head_takes_the_attention_implementation(monkeypatch):
  """MAPHead(attention_impl='cudnn') sends its probe (1 query, padded to 2)
  down the cuDNN route; same parameters, same numbers."""
  x = jax.random.normal(jax.random.key(1), (2, 197, 48))
  head = layers.MAPHead(num_heads=3, mlp_dim=96)
  params = head.init(jax.random.key(0), x)
  calls = []
  _route_cudnn_to_xla(monkeypatch)
  routed = attention.padded_dot_product_attention
  monkeypatch.setattr(attention, 'padded_dot_product_attention',
                      lambda q, k, v, **kw: calls.append(
                          (q.shape, k.shape)) or routed(q, k, v, **kw))
  out = head.clone(attention_impl='cudnn').apply(params, x)
  assert calls == [((2, 1, 3, 16), (2, 197, 3, 16))]
  np.testing.assert_allclose(out, head.apply(params, x), rtol=2e-5, atol=2e-6)


def test_cpu_warning_names_the_case():
  x = jnp.ones((2, 197, 48), jnp.bfloat16)
  module = layers.MultiHeadDotProductAttention(
      num_heads=3, implementation='cudnn', dtype=jnp.bfloat16)
  with pytest.warns(UserWarning, match=(
      r"'cudnn' unavailable for 197 queries self-attention, 3 heads of 16, "
      r"batch 2, bfloat16 \(the 'cpu' backend has no cuDNN\)")):
    module.init(jax.random.key(0), x, True)


def _gpu_abstract_mesh():
  device = jax.sharding.AbstractDevice(
      device_kind='NVIDIA H100 80GB HBM3', num_cores=132, platform='gpu')
  return jax.sharding.AbstractMesh((1,), ('data',), abstract_device=device)


def test_compile_target_follows_the_mesh_not_the_process_backend():
  assert attention.compile_target() == (jax.default_backend(), None)
  with jax.sharding.use_abstract_mesh(_gpu_abstract_mesh()):
    assert attention.compile_target() == ('gpu', 'NVIDIA H100 80GB HBM3')


def test_reasons_for_a_gpu_target():
  """For a GPU mesh: the cases cuDNN cannot take are named, before any
  compile; the zoo's are all accepted (given the CUDA plugin)."""
  reason = attention.cudnn_unavailable_reason
  with jax.sharding.use_abstract_mesh(_gpu_abstract_mesh()):
    assert 'bfloat16/float16, not float32' in reason(
        (8, 197, 12, 64), (8, 197, 12, 64), jnp.float32)
    assert 'dropout' in reason((8, 197, 12, 64), (8, 197, 12, 64),
                               jnp.bfloat16, dropout=True)
    if attention._cudnn_version() is None:
      assert 'jax[cuda12]' in reason((8, 197, 12, 64), (8, 197, 12, 64),
                                     jnp.bfloat16)
      return
    assert 'head dim 20' in reason((8, 197, 12, 20), (8, 197, 12, 20),
                                   jnp.bfloat16)
    assert 'head dim' in reason((8, 197, 2, 512), (8, 197, 2, 512),
                                jnp.bfloat16)
    for q_len, kv_len in LENGTHS:
      for head_dim in (64, 80):  # Ti/S/B/L and H
        assert reason((8, q_len, 12, head_dim), (8, kv_len, 12, head_dim),
                      jnp.bfloat16) is None, (q_len, kv_len, head_dim)


# ---- Compiled for an H100 (deviceless) -------------------------------------

FMHA_FWD = 'custom_call_target="__cudnn$fmhaSoftmax"'
FMHA_BWD = 'custom_call_target="__cudnn$fmhaSoftmaxBackward"'


def _has_cuda_plugin() -> bool:
  try:
    import jax_cuda12_plugin  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return False
  return True


needs_cuda_plugin = pytest.mark.skipif(
    not _has_cuda_plugin(),
    reason='compiling for an H100 without one needs JAX\'s CUDA plugin '
           '(pip install "jax[cuda12]"); jax_cuda12_plugin is not installed')


def h100_devices(count: int = 8) -> list[jax.Device]:
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc(
      platform='cuda', target_config=gpus.gpu('h100').target_config(),
      topology=f'1x1x{count}').devices)


def compile_train_gradient(name: str, image_size: int, classifier: str,
                           num_registers: int = 0, num_layers: int | None = 2,
                           batch: int = 8, devices=None):
  """The loss gradient of `name` (bfloat16, cuDNN attention) compiled for
  `devices` (8 H100s), batch split over them, under the mesh as the train
  step traces. Returns (compiled HLO text, compile seconds, warnings)."""
  config = registry.get_model_config(name)
  patch = config['patch_size'][0]
  if image_size % patch:  # 518 px: the /14 models of DINOv2's resolution
    patch = 14 if image_size % 14 == 0 else 16
  config.update(patch_size=(patch, patch))
  if num_layers:  # attention shapes do not depend on depth
    config['num_layers'] = num_layers
  model = vit.VisionTransformer(
      num_classes=1000, classifier=classifier, num_registers=num_registers,
      dtype=jnp.bfloat16, attention_impl='cudnn', scan_layers=True, **config)
  mesh = mesh_lib.create_mesh(devices=devices or h100_devices())
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3),
                                jnp.float32,
                                sharding=mesh_lib.batch_sharding(mesh))
  params = jax.eval_shape(
      lambda: model.clone(attention_impl='xla').init(
          jax.random.key(0), jnp.zeros(images.shape)))['params']
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(
      p.shape, p.dtype, sharding=mesh_lib.replicated(mesh)), params)

  def loss(params, images):
    logits = model.apply({'params': params}, images, train=True)
    return -jnp.mean(jax.nn.log_softmax(logits)[:, 0])

  start = time.perf_counter()
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    lowered = jax.jit(mesh_lib.on_mesh(jax.grad(loss), mesh)).lower(
        params, images)
  compiled = lowered.compile()
  seconds = time.perf_counter() - start
  return compiled.as_text(), seconds, [str(w.message) for w in caught]


def _tokens(name, image_size, classifier, num_registers):
  patch = registry.get_model_config(name)['patch_size'][0]
  if image_size % patch:
    patch = 14 if image_size % 14 == 0 else 16
  return ((image_size // patch) ** 2 + num_registers
          + (classifier == 'token'))


CASES = [  # (model, px, classifier, registers): odd and even token counts
    ('ViT-B_16', 224, 'token', 0),  # 197, the case that raised
    ('ViT-B_16', 224, 'gap', 0),  # 196
    ('ViT-B_16', 224, 'map', 0),  # probe 1 over 196
    ('ViT-S_16', 384, 'token', 4),  # 581
    ('ViT-H_14', 224, 'token', 0),  # 257, head dim 80
    ('ViT-L_16', 518, 'gap', 0),  # 1369 (patch 14)
    ('ViT-Ti_16', 518, 'map', 4),  # probe 1 over 1373
]


@needs_cuda_plugin
@pytest.mark.parametrize('name,size,classifier,registers', CASES)
def test_train_gradient_compiles_with_cudnn_for_h100(name, size, classifier,
                                                     registers):
  text, _, caught = compile_train_gradient(name, size, classifier, registers)
  assert not [w for w in caught if 'cudnn' in w], caught
  heads = 1 + (classifier == 'map')  # scanned encoder body (+ MAP head)
  assert text.count(FMHA_FWD) == heads, _tokens(name, size, classifier,
                                                 registers)
  assert text.count(FMHA_BWD) == heads


@needs_cuda_plugin
def test_unservable_case_warns_before_compiling():
  """float32 compute: a warning naming the case, XLA attention, no
  NotImplementedError from JAX and no cuDNN call."""
  devices = h100_devices()
  mesh = mesh_lib.create_mesh(devices=devices)
  x = jax.ShapeDtypeStruct((8, 197, 192), jnp.float32,
                           sharding=mesh_lib.batch_sharding(mesh))
  module = layers.MultiHeadDotProductAttention(3, implementation='cudnn')
  params = jax.eval_shape(lambda: module.clone(implementation='xla').init(
      jax.random.key(0), jnp.zeros(x.shape), True))
  loss = lambda p, x: jnp.sum(module.apply(p, x, True))
  with pytest.warns(UserWarning, match=r'197 queries self-attention.*float32'):
    lowered = jax.jit(mesh_lib.on_mesh(jax.grad(loss), mesh)).lower(params, x)
  assert FMHA_FWD not in lowered.compile().as_text()


def _table():
  """Markdown table of every (model, px, head) case: cuDNN calls, compile s."""
  models = ['ViT-Ti_16', 'ViT-S_16', 'ViT-B_16', 'ViT-L_16', 'ViT-H_14']
  heads = [('token', 0), ('gap', 0), ('token', 4), ('gap', 4), ('map', 0)]
  depth = os.environ.get('ATTENTION_TABLE_LAYERS')
  depth = int(depth) if depth else None  # None: the model's full depth
  print('| model | px | head | tokens | cuDNN fwd/bwd calls | compile s |'
        ' warnings |')
  print('|---|---|---|---|---|---|---|')
  devices = h100_devices()
  for name in models:
    for size in (224, 384, 518):
      for classifier, registers in heads:
        head = classifier + (f'+{registers} reg' if registers else '')
        try:
          text, seconds, caught = compile_train_gradient(
              name, size, classifier, registers, num_layers=depth,
              devices=devices)
          calls = f'{text.count(FMHA_FWD)}/{text.count(FMHA_BWD)}'
          note = '; '.join(w for w in caught if 'cudnn' in w) or '-'
        except Exception as e:  # pylint: disable=broad-except
          calls, seconds, note = 'ERROR', 0.0, f'{type(e).__name__}: {e}'[:120]
        print(f'| {name} | {size} | {head} | '
              f'{_tokens(name, size, classifier, registers)} | {calls} | '
              f'{seconds:.1f} | {note} |', flush=True)


if __name__ == '__main__':
  _table()
