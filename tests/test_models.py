"""Model zoo: parameter counts, output shapes, numerics options, bad input."""
import subprocess
import sys

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from vit_jax.models import layers
from vit_jax import models

# Parameter counts at 224px, 1000 classes (the paper's and Google's numbers).
PARAM_COUNTS = {
    'ViT-Ti_16': 5_717_416, 'ViT-S_16': 22_050_664, 'ViT-S_32': 22_878_952,
    'ViT-B_16': 86_567_656, 'ViT-B_8': 86_576_872, 'ViT-B_32': 88_224_232,
    'ViT-L_16': 304_326_632, 'ViT-L_32': 306_535_400,
    'ViT-H_14': 632_045_800, 'R50+ViT-B_16': 98_659_112,
    'R26+ViT-S_32': 36_431_912, 'R26+ViT-B_32': 101_383_976,
    'R50+ViT-L_32': 328_994_856, 'R+ViT-Ti_16': 6_337_704,
    # BiT ResNet-v2 at 1000 classes: the published models' counts (BiT's
    # big_transfer code; timm's resnetv2_*_bit count the same).
    'BiT-R50x1': 25_549_352, 'BiT-R50x3': 217_319_080,
    'BiT-R101x1': 44_541_480, 'BiT-R101x3': 387_934_888,
    'BiT-R152x2': 236_335_208, 'BiT-R152x4': 936_533_224,
}
TINY = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2,
            patch_size=8)


def tiny_model(num_classes=10, **overrides) -> models.VisionTransformer:
  return models.create_model('ViT-Ti_16', num_classes, **{**TINY, **overrides})


def images(shape=(2, 32, 32, 3), seed=0) -> jax.Array:
  return jax.random.uniform(jax.random.key(seed), shape, minval=-1, maxval=1)


def init_randomized(model, x, seed=0):
  """Params with every leaf random: the zero-initialised head would hide bugs."""
  params = jax.jit(model.init)(jax.random.key(seed), x)['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
      for leaf, k in zip(leaves, keys)])


def test_registry_lists_every_counted_variant():
  assert set(models.MODELS) == set(PARAM_COUNTS)


@pytest.mark.parametrize('name', sorted(PARAM_COUNTS))
def test_param_count(name):
  assert models.count_params(models.create_model(name, 1000)) == PARAM_COUNTS[name]


def test_param_tree_names_match_google_checkpoints():
  model = models.create_model('R26+ViT-S_32', 10, num_layers=2,
                              resnet_layers=(1, 1), representation_size=16)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 64, 64, 3)))['params']
  top = set(params)
  assert top == {'conv_root', 'gn_root', 'block1', 'block2', 'embedding', 'cls',
                 'Transformer', 'pre_logits', 'head'}
  assert set(params['block2']['unit1']) == {
      'conv1', 'conv2', 'conv3', 'conv_proj', 'gn1', 'gn2', 'gn3', 'gn_proj'}
  block = params['Transformer']['encoderblock_1']
  assert set(block) == {'LayerNorm_0', 'MultiHeadDotProductAttention_0',
                        'LayerNorm_1', 'MlpBlock_0'}
  attn = block['MultiHeadDotProductAttention_0']
  assert attn['query']['kernel'].shape == (384, 6, 64)
  assert attn['out']['kernel'].shape == (6, 64, 384)
  assert set(block['MlpBlock_0']) == {'Dense_0', 'Dense_1'}
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 8 * 8 + 1, 384)  # 64px / (stem stride 8 * patch 1) = 8 per side


@pytest.mark.parametrize('classifier,expected', [
    ('token', (2, 10)), ('gap', (2, 10)),
    ('unpooled', (2, 16, 10)), ('token_unpooled', (2, 17, 10))])
def test_output_shapes_per_classifier(classifier, expected):
  model = tiny_model(classifier=classifier)
  x = images()
  out = model.apply({'params': init_randomized(model, x)}, x)
  assert out.shape == expected and out.dtype == jnp.float32
  assert bool(jnp.isfinite(out).all())


def test_features_without_head_and_representation_layer():
  x = images()
  features = tiny_model(num_classes=0)
  variables = features.init(jax.random.key(0), x)
  assert 'head' not in variables['params']
  assert features.apply(variables, x).shape == (2, 32)
  pre = tiny_model(representation_size=24)
  params = init_randomized(pre, x)
  assert params['pre_logits']['kernel'].shape == (32, 24)
  assert pre.apply({'params': params}, x).shape == (2, 10)


def test_non_square_input():
  model = tiny_model()
  x = images((3, 32, 56, 3))
  params = init_randomized(model, x)
  pos = params['Transformer']['posembed_input']['pos_embedding']
  assert pos.shape == (1, 4 * 7 + 1, 32)
  assert model.apply({'params': params}, x).shape == (3, 10)


def test_hybrid_forward():
  model = models.create_model('R26+ViT-S_32', 5, num_layers=1, hidden_size=32,
                              mlp_dim=64, num_heads=2, resnet_layers=(1, 1))
  x = images((2, 32, 48, 3))
  params = init_randomized(model, x)
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 4 * 6 + 1, 32)
  out = jax.jit(model.apply)({'params': params}, x)
  assert out.shape == (2, 5) and bool(jnp.isfinite(out).all())


def _dot_operand_dtypes(jaxpr) -> set:
  dtypes = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('dot_general', 'conv_general_dilated'):
      dtypes.update(str(v.aval.dtype) for v in eqn.invars)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      dtypes |= _dot_operand_dtypes(sub)
  return dtypes


@pytest.mark.parametrize('scan', [False, True])
def test_bfloat16_compute_reaches_every_matmul(scan):
  model = models.create_model('R26+ViT-S_32', 10, num_layers=2, hidden_size=32,
                              mlp_dim=64, num_heads=2, resnet_layers=(1,),
                              scan_layers=scan)
  x = images()
  params = init_randomized(model, x)
  bf16 = model.clone(dtype=jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda p: bf16.apply({'params': p}, x))(params)
  assert _dot_operand_dtypes(jaxpr.jaxpr) == {'bfloat16'}
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  ref = jax.jit(model.apply)({'params': params}, x)
  out = jax.jit(bf16.apply)({'params': params}, x)
  assert out.dtype == jnp.float32 and bool(jnp.isfinite(out).all())
  np.testing.assert_allclose(out, ref, atol=0.05 * float(jnp.abs(ref).max()))


def test_scan_equals_unrolled_with_converted_params():
  model = tiny_model(num_layers=3)
  x = images()
  params = init_randomized(model, x)
  scanned = model.clone(scan_layers=True)
  stacked = models.stack_encoder_blocks(params)
  assert stacked['Transformer']['encoderblock']['MlpBlock_0']['Dense_0'][
      'kernel'].shape == (3, 32, 64)
  shapes = jax.eval_shape(scanned.init, jax.random.key(0), x)['params']
  assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(
      lambda a: a.shape, stacked)
  ref = model.apply({'params': params}, x)
  np.testing.assert_allclose(scanned.apply({'params': stacked}, x), ref,
                             rtol=1e-5, atol=1e-5)
  back = models.unstack_encoder_blocks(stacked)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize('policy', ['full', 'dots', 'dots_no_batch'])
def test_remat_matches_reference_output_and_gradient(policy):
  model = tiny_model()
  x = images()
  params = init_randomized(model, x)

  def loss(m, p):
    return jnp.sum(m.apply({'params': p}, x) ** 2)

  ref_loss, ref_grad = jax.value_and_grad(lambda p: loss(model, p))(params)
  remat = model.clone(remat_policy=policy)
  out_loss, out_grad = jax.value_and_grad(lambda p: loss(remat, p))(params)
  np.testing.assert_allclose(out_loss, ref_loss, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-6),
               out_grad, ref_grad)


def test_xla_attention_matches_jax_reference():
  """Our head-major formulation is the same function, gradients included."""
  model = tiny_model(num_layers=1)
  x = images()
  params = init_randomized(model, x)
  attn_params = params['Transformer']['encoderblock_0'][
      'MultiHeadDotProductAttention_0']
  attn = layers.MultiHeadDotProductAttention(num_heads=2)
  tokens = jax.random.normal(jax.random.key(5), (2, 17, 32))

  def ours(p, t):
    return attn.apply({'params': p}, t, True)

  def reference(p, t):
    proj = lambda n: jnp.einsum('btd,dhk->bthk', t, p[n]['kernel']
                                ) + p[n]['bias']
    y = jax.nn.dot_product_attention(proj('query'), proj('key'), proj('value'),
                                     implementation='xla')
    return jnp.einsum('bthk,hkd->btd', y, p['out']['kernel']) + p['out']['bias']

  np.testing.assert_allclose(ours(attn_params, tokens),
                             reference(attn_params, tokens),
                             rtol=1e-5, atol=1e-5)
  grad = lambda f: jax.grad(lambda p, t: jnp.sum(f(p, t) ** 2),
                            argnums=(0, 1))(attn_params, tokens)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               grad(ours), grad(reference))


# Options of timm's ViT families at B/16, 1000 classes: DeiT III (LayerScale,
# position embedding of the patches only), registers with average pooling and
# fc_norm, SigLIP-style attention pooling (no class token).
FAMILY_COUNTS = [
    (dict(layerscale=1e-6, posemb_prefix=False), 86_585_320),
    (dict(classifier='gap', num_registers=4, posemb_prefix=False,
          fc_norm=True), 86_569_192),
    (dict(classifier='map'), 93_653_224),
]


@pytest.mark.parametrize('options,count', FAMILY_COUNTS)
def test_timm_family_options_param_counts(options, count):
  # 768 per LayerScale (2 a block), per register and per position slot; MAP:
  # probe + attention (4 x 768^2 + biases) + LayerNorm + MLP.
  model = models.create_model('ViT-B_16', 1000, **options)
  assert models.count_params(model) == count


def test_layerscale_of_one_is_the_plain_block():
  x = images()
  scaled = tiny_model(layerscale=1.0)
  params = init_randomized(scaled, x)
  blocks = params['Transformer']
  assert blocks['encoderblock_0']['LayerScale_1']['scale'].shape == (32,)
  ones = jax.tree_util.tree_map_with_path(
      lambda path, v: jnp.ones_like(v) if 'LayerScale' in str(path) else v,
      params)
  plain = jax.tree_util.tree_map(lambda v: v, ones)
  for block in plain['Transformer'].values():
    if isinstance(block, dict):
      block.pop('LayerScale_0', None), block.pop('LayerScale_1', None)
  np.testing.assert_allclose(scaled.apply({'params': ones}, x),
                             tiny_model().apply({'params': plain}, x),
                             rtol=1e-5, atol=1e-5)
  assert not np.allclose(scaled.apply({'params': params}, x),
                         scaled.apply({'params': ones}, x), atol=1e-3)


def test_registers_without_position_embedding_slots():
  """posemb_prefix=False is the same as zero position embedding for the class
  token and registers (timm's no_embed_class)."""
  x = images()
  skip = tiny_model(num_registers=3, posemb_prefix=False)
  params = init_randomized(skip, x)
  assert params['reg'].shape == (1, 3, 32)
  posemb = params['Transformer']['posembed_input']['pos_embedding']
  assert posemb.shape == (1, 16, 32)
  padded = jax.tree.map(lambda v: v, params)
  padded['Transformer']['posembed_input']['pos_embedding'] = jnp.concatenate(
      [jnp.zeros((1, 4, 32)), posemb], axis=1)
  np.testing.assert_allclose(skip.apply({'params': params}, x),
                             tiny_model(num_registers=3).apply(
                                 {'params': padded}, x),
                             rtol=1e-5, atol=1e-5)


def test_average_pooling_skips_class_and_register_tokens():
  x = images()
  gap = tiny_model(num_classes=0, classifier='gap', num_registers=2)
  params = init_randomized(gap, x)
  tokens = tiny_model(num_classes=0, classifier='unpooled',
                      num_registers=2).apply({'params': params}, x)
  assert tokens.shape == (2, 2 + 16, 32)
  np.testing.assert_allclose(gap.apply({'params': params}, x),
                             tokens[:, 2:].mean(axis=1), rtol=1e-5, atol=1e-5)
  normed = tiny_model(num_classes=0, classifier='gap', num_registers=2,
                      fc_norm=True)
  params = init_randomized(normed, x)
  assert 'encoder_norm' not in params['Transformer'] and 'fc_norm' in params


def test_map_head_matches_reference():
  head = layers.MAPHead(num_heads=2, mlp_dim=64)
  tokens = jax.random.normal(jax.random.key(3), (2, 17, 32))
  params = init_randomized(head, tokens)
  assert set(params) == {'probe', 'MultiHeadDotProductAttention_0',
                         'LayerNorm_0', 'MlpBlock_0'}
  p = params['MultiHeadDotProductAttention_0']
  proj = lambda n, t: jnp.einsum('btd,dhk->bthk', t, p[n]['kernel']
                                 ) + p[n]['bias']
  probe = jnp.tile(params['probe'], (2, 1, 1))
  logits = jnp.einsum('bqhk,bthk->bhqt', proj('query', probe),
                      proj('key', tokens)) / np.sqrt(16)
  y = jnp.einsum('bhqt,bthk->bqhk', jax.nn.softmax(logits),
                 proj('value', tokens))
  y = jnp.einsum('bqhk,hkd->bqd', y, p['out']['kernel']) + p['out']['bias']
  ln, mlp = params['LayerNorm_0'], params['MlpBlock_0']
  mean, var = y.mean(-1, keepdims=True), y.var(-1, keepdims=True)
  h = (y - mean) / jnp.sqrt(var + 1e-6) * ln['scale'] + ln['bias']
  h = jax.nn.gelu(h @ mlp['Dense_0']['kernel'] + mlp['Dense_0']['bias'])
  y = y + h @ mlp['Dense_1']['kernel'] + mlp['Dense_1']['bias']
  np.testing.assert_allclose(head.apply({'params': params}, tokens),
                             y[:, 0], rtol=1e-4, atol=1e-5)
  model = tiny_model(classifier='map')
  assert tiny_model(classifier='map').apply(
      {'params': init_randomized(model, images())}, images()).shape == (2, 10)


def test_cudnn_attention_falls_back_on_cpu_with_message():
  model = tiny_model()
  x = images()
  params = init_randomized(model, x)
  ref = model.apply({'params': params}, x)
  with pytest.warns(UserWarning, match=r"'cudnn' unavailable .*'cpu' backend"):
    out = model.clone(attention_impl='cudnn').apply({'params': params}, x)
  np.testing.assert_array_equal(out, ref)


def test_stochastic_depth_and_dropout_only_in_training():
  model = tiny_model(stochastic_depth=0.5, dropout_rate=0.1)
  x = images((8, 32, 32, 3))
  params = init_randomized(model, x)
  ref = tiny_model().apply({'params': params}, x)
  np.testing.assert_array_equal(model.apply({'params': params}, x), ref)
  train = lambda seed: model.apply({'params': params}, x, train=True,
                                   rngs={'dropout': jax.random.key(seed)})
  np.testing.assert_array_equal(train(1), train(1))
  assert not np.allclose(train(1), train(2))
  assert not np.allclose(train(1), ref)


@pytest.mark.parametrize('scan,remat', [(True, 'none'), (False, 'full'),
                                        (True, 'dots')])
def test_training_without_randomness_needs_no_dropout_rng(scan, remat):
  # Under scan or remat the drop-path rate is traced; off must still mean off.
  model = tiny_model(scan_layers=scan, remat_policy=remat)
  x = images()
  params = model.init(jax.random.key(0), x)['params']
  np.testing.assert_allclose(model.apply({'params': params}, x, train=True),
                             model.apply({'params': params}, x), atol=1e-6)


def test_attention_weights_are_sown_for_inspection():
  model = tiny_model()
  x = images()
  params = init_randomized(model, x)
  _, state = model.apply({'params': params}, x, mutable=['intermediates'])
  weights = state['intermediates']['Transformer']['encoderblock_1'][
      'MultiHeadDotProductAttention_0']['attention_weights'][0]
  assert weights.shape == (2, 2, 17, 17)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize('shape,match', [
    ((2, 30, 32, 3), r'Image size 30x32 is not divisible .* 8x8'),
    ((2, 32, 32, 1), r'got shape \(2, 32, 32, 1\)'),
    ((32, 32, 3), r'got shape \(32, 32, 3\)'),
])
def test_bad_input_shape(shape, match):
  with pytest.raises(ValueError, match=match):
    tiny_model().init(jax.random.key(0), jnp.zeros(shape))


def test_hybrid_input_must_be_divisible_by_stem_stride_times_patch():
  model = models.create_model('R50+ViT-B_16', 10)
  with pytest.raises(ValueError, match=r'200x200 .* 16x16 pixels per token'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 200, 200, 3)))


def test_resolution_mismatch_with_params_is_explained():
  model = tiny_model()
  params = model.init(jax.random.key(0), images())['params']
  with pytest.raises(ValueError, match=r'position embedding has shape '
                     r'\(1, 17, 32\) .* 65 tokens'):
    model.apply({'params': params}, images((1, 64, 64, 3)))


def test_unknown_model_name_lists_close_matches():
  with pytest.raises(ValueError, match=r"Unknown model name 'ViT-B16'.*"
                     r"Did you mean 'ViT-B_16'"):
    models.create_model('ViT-B16', 10)


@pytest.mark.parametrize('overrides,match', [
    (dict(clasifier='gap'), r"'clasifier' \(did you mean 'classifier'\?\)"),
    (dict(classifier='cls'), r"classifier='cls' .* 'token', 'gap'"),
    (dict(attention_impl='flash'), r"attention_impl='flash' .* 'xla', 'cudnn'"),
    (dict(remat_policy='some'), r"remat_policy='some'"),
    (dict(num_heads=5), r'hidden_size=192 is not divisible by num_heads=5'),
    (dict(fc_norm=True), r"fc_norm .* needs classifier 'gap' or 'map'"),
    (dict(num_registers=-1), r'num_registers=-1 must be an integer >= 0'),
    (dict(activation='relu'), r"activation='relu' is not supported.*gelu"),
])
def test_bad_options(overrides, match):
  with pytest.raises(ValueError, match=match):
    models.create_model('ViT-Ti_16', 10, **overrides)


def test_importing_models_does_not_import_tensorflow():
  code = ('import sys, vit_jax.models; '
          'assert "tensorflow" not in sys.modules, "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], check=True)
