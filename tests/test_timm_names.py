"""timm's ViT names both ways: exact round trips, and files built with timm's
published names and PyTorch layouts giving the logits of an independent
numpy forward pass written from timm's VisionTransformer."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy import special

from vit_jax import models
from vit_jax.checkpoint import arrays
from vit_jax.interop import timm
from vit_jax.serving import images

TINY = dict(num_layers=2, hidden_size=32, mlp_dim=64, num_heads=2,
            patch_size=8)
VARIANTS = {
    'token': dict(),
    'patch4_3layers': dict(patch_size=4, num_heads=4, num_layers=3),
    'pre_logits': dict(representation_size=24),
    'features': dict(num_classes=0),
    'deit3': dict(layerscale=1e-6, posemb_prefix=False),
    'reg_gap_fc_norm': dict(classifier='gap', num_registers=4,
                            posemb_prefix=False, fc_norm=True),
    'gap': dict(classifier='gap'),
    'map': dict(classifier='map'),
    'hybrid_r26': dict(resnet_layers=(1, 1), patch_size=1),
    'hybrid_stem_only': dict(resnet_layers=(), patch_size=2),
}


def make(num_classes=10, **options):
  return models.create_model('ViT-Ti_16', options.pop('num_classes',
                                                      num_classes),
                             **{**TINY, **options})


def random_params(model, size=32, seed=0):
  x = jnp.zeros((1, size, size, 3))
  params = jax.jit(model.init)(jax.random.key(seed), x)['params']
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.map(np.asarray, jax.tree.unflatten(tree, [
      leaf + 0.1 * jax.random.normal(k, leaf.shape)
      for leaf, k in zip(leaves, keys)]))


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_round_trip_is_exact(variant):
  model = make(**VARIANTS[variant])
  size = 64 if model.resnet_layers is not None else 32
  params = random_params(model, size)
  state = timm.to_timm(params, model)
  assert all(isinstance(v, np.ndarray) for v in state.values())
  back = timm.from_timm(state, params, model)
  flat, flat_back = arrays.flatten(params), arrays.flatten(back)
  assert set(flat) == set(flat_back)
  for key in flat:
    np.testing.assert_array_equal(flat[key], flat_back[key], err_msg=key)
  # What the published names look like.
  assert state['blocks.0.attn.qkv.weight'].shape == (96, 32)
  assert state['patch_embed.proj.weight'].shape[:2] == (
      32, 3 if model.resnet_layers is None else
      state['patch_embed.proj.weight'].shape[1])


def _layer_norm(x, w, b):
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * w + b


def _attention(q_in, kv_in, q_w, q_b, k_w, k_b, v_w, v_b, heads):
  def split(t):
    return t.reshape(*t.shape[:2], heads, -1).transpose(0, 2, 1, 3)
  q, k, v = (split(t @ w.T + b) for t, w, b in (
      (q_in, q_w, q_b), (kv_in, k_w, k_b), (kv_in, v_w, v_b)))
  weights = special.softmax(q @ k.transpose(0, 1, 3, 2)
                            / np.sqrt(q.shape[-1]), axis=-1)
  y = (weights @ v).transpose(0, 2, 1, 3)
  return y.reshape(*y.shape[:2], -1)


def _mlp(x, s, prefix):
  gelu = lambda t: 0.5 * t * (1 + special.erf(t / np.sqrt(2)))  # nn.GELU
  h = gelu(x @ s[prefix + 'fc1.weight'].T + s[prefix + 'fc1.bias'])
  return h @ s[prefix + 'fc2.weight'].T + s[prefix + 'fc2.bias']


def timm_forward(s, x_nchw, heads, pool):
  """timm's VisionTransformer.forward (eval), from its source, in numpy."""
  w = s['patch_embed.proj.weight']
  d, _, p, _ = w.shape
  n, c, h, wd = x_nchw.shape
  patches = x_nchw.reshape(n, c, h // p, p, wd // p, p).transpose(
      0, 2, 4, 1, 3, 5).reshape(n, (h // p) * (wd // p), c * p * p)
  x = patches @ w.reshape(d, -1).T + s['patch_embed.proj.bias']
  prefix = [np.broadcast_to(s[k], (n, *s[k].shape[1:]))
            for k in ('cls_token', 'reg_token') if k in s]
  if s['pos_embed'].shape[1] == x.shape[1]:  # no_embed_class
    x = np.concatenate(prefix + [x + s['pos_embed']], axis=1)
  else:
    x = np.concatenate(prefix + [x], axis=1) + s['pos_embed']
  i = 0
  while f'blocks.{i}.norm1.weight' in s:
    b = f'blocks.{i}.'
    y = _layer_norm(x, s[b + 'norm1.weight'], s[b + 'norm1.bias'])
    qw, kw, vw = np.split(s[b + 'attn.qkv.weight'], 3)
    qb, kb, vb = np.split(s[b + 'attn.qkv.bias'], 3)
    y = _attention(y, y, qw, qb, kw, kb, vw, vb, heads)
    y = y @ s[b + 'attn.proj.weight'].T + s[b + 'attn.proj.bias']
    x = x + y * s.get(b + 'ls1.gamma', 1)
    y = _mlp(_layer_norm(x, s[b + 'norm2.weight'], s[b + 'norm2.bias']), s,
             b + 'mlp.')
    x = x + y * s.get(b + 'ls2.gamma', 1)
    i += 1
  if 'norm.weight' in s:
    x = _layer_norm(x, s['norm.weight'], s['norm.bias'])
  if pool == 'token':
    x = x[:, 0]
  elif pool == 'avg':
    x = x[:, len(prefix) and sum(t.shape[1] for t in prefix):].mean(1)
  else:  # 'map': AttentionPoolLatent over all tokens
    latent = np.broadcast_to(s['attn_pool.latent'], (n, 1, d))
    kw, vw = np.split(s['attn_pool.kv.weight'], 2)
    kb, vb = np.split(s['attn_pool.kv.bias'], 2)
    y = _attention(latent, x, s['attn_pool.q.weight'], s['attn_pool.q.bias'],
                   kw, kb, vw, vb, heads)
    y = y @ s['attn_pool.proj.weight'].T + s['attn_pool.proj.bias']
    y = y + _mlp(_layer_norm(y, s['attn_pool.norm.weight'],
                             s['attn_pool.norm.bias']), s, 'attn_pool.mlp.')
    x = y[:, 0]
  if 'fc_norm.weight' in s:
    x = _layer_norm(x, s['fc_norm.weight'], s['fc_norm.bias'])
  return x @ s['head.weight'].T + s['head.bias']


def published_state(rng, heads=2, d=32, layers=2, mlp=64, patch=8, grid=16,
                    classes=10, cls=True, registers=0, embed_class=True,
                    layerscale=False, fc_norm=False, attn_pool=False):
  """A state dict with timm's key names and shapes, as its VisionTransformer
  defines them (not produced by our converter)."""
  r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)
  prefix = int(cls) + registers
  s = {'patch_embed.proj.weight': r(d, 3, patch, patch),
       'patch_embed.proj.bias': r(d),
       'pos_embed': r(1, grid + (prefix if embed_class else 0), d),
       'head.weight': r(classes, d), 'head.bias': r(classes)}
  if cls:
    s['cls_token'] = r(1, 1, d)
  if registers:
    s['reg_token'] = r(1, registers, d)
  for i in range(layers):
    b = f'blocks.{i}.'
    s.update({b + 'norm1.weight': 1 + r(d), b + 'norm1.bias': r(d),
              b + 'attn.qkv.weight': r(3 * d, d), b + 'attn.qkv.bias': r(3 * d),
              b + 'attn.proj.weight': r(d, d), b + 'attn.proj.bias': r(d),
              b + 'norm2.weight': 1 + r(d), b + 'norm2.bias': r(d),
              b + 'mlp.fc1.weight': r(mlp, d), b + 'mlp.fc1.bias': r(mlp),
              b + 'mlp.fc2.weight': r(d, mlp), b + 'mlp.fc2.bias': r(d)})
    if layerscale:
      s.update({b + 'ls1.gamma': r(d), b + 'ls2.gamma': r(d)})
  norm = 'fc_norm' if fc_norm else 'norm'
  s.update({norm + '.weight': 1 + r(d), norm + '.bias': r(d)})
  if attn_pool:
    s.update({'attn_pool.latent': r(1, 1, d), 'attn_pool.q.weight': r(d, d),
              'attn_pool.q.bias': r(d), 'attn_pool.kv.weight': r(2 * d, d),
              'attn_pool.kv.bias': r(2 * d), 'attn_pool.proj.weight': r(d, d),
              'attn_pool.proj.bias': r(d), 'attn_pool.norm.weight': 1 + r(d),
              'attn_pool.norm.bias': r(d), 'attn_pool.mlp.fc1.weight':
              r(mlp, d), 'attn_pool.mlp.fc1.bias': r(mlp),
              'attn_pool.mlp.fc2.weight': r(d, mlp),
              'attn_pool.mlp.fc2.bias': r(d)})
  return s


PUBLISHED = {
    # vit_*_patch*_* (augreg, orig_in21k_ft): class token, token pooling.
    'vit': (dict(), {'architecture': 'vit_tiny_patch8_32'}, 'token'),
    # deit3_*: LayerScale, no_embed_class.
    'deit3': (dict(layerscale=True, embed_class=False),
              {'architecture': 'deit3_small_patch8_32'}, 'token'),
    # vit_*_reg4_gap_*: registers, average pooling, fc_norm.
    'reg_gap': (dict(cls=False, registers=4, embed_class=False,
                     fc_norm=True),
                {'architecture': 'vit_medium_patch8_reg4_gap_32',
                 'global_pool': 'avg', 'model_args': {'num_heads': 2}},
                'avg'),
    # SigLIP-style: no class token, attention pooling.
    'map': (dict(cls=False, attn_pool=True),
            {'architecture': 'vit_base_patch8_siglip_32',
             'global_pool': 'map', 'model_args': {'num_heads': 2}}, 'map'),
}


@pytest.mark.parametrize('family', sorted(PUBLISHED))
def test_published_names_load_with_their_logits(tmp_path, family):
  kwargs, config, pool = PUBLISHED[family]
  state = published_state(np.random.default_rng(0), **kwargs)
  path = tmp_path / 'model.safetensors'
  safetensors.numpy.save_file(state, path)
  state = safetensors.numpy.load_file(path)
  config = {**config, 'num_classes': 10,
            'pretrained_cfg': {'input_size': [3, 32, 32]}}
  if family in ('vit', 'deit3'):
    config['model_args'] = {'num_heads': 2}
  options, image_size = timm.model_options(state, config, str(path))
  assert image_size == (32, 32) and options['activation'] == 'gelu'
  model = models.VisionTransformer(**options)
  init = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)))['params']
  params = timm.from_timm(state, init, model, str(path))
  x = np.random.default_rng(1).uniform(-1, 1, (2, 32, 32, 3)).astype(
      np.float32)
  ours = model.apply({'params': params}, x)
  theirs = timm_forward(state, x.transpose(0, 3, 1, 2), heads=2, pool=pool)
  np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4)


def test_config_round_trip_gives_the_architecture():
  model = make(classifier='gap', num_registers=2, fc_norm=True,
               posemb_prefix=False, layerscale=0.1)
  params = random_params(model)
  config = timm.timm_config(model, (32, 32), ['a'] * 10,
                            images.Preprocessing('resize_crop', 0.9,
                                                 'pil_bicubic'))
  assert config['architecture'] == 'vit_base_patch16_224'  # + model_args
  assert config['model_args']['act_layer'] == 'gelu_tanh'
  options, size = timm.model_options(timm.to_timm(params, model), config, 'x')
  assert size == (32, 32)
  rebuilt = models.VisionTransformer(**options)
  for field in ('hidden_size', 'num_heads', 'num_layers', 'mlp_dim',
                'classifier', 'num_registers', 'fc_norm', 'posemb_prefix',
                'layerscale', 'activation', 'patch_size', 'num_classes'):
    assert getattr(rebuilt, field) == getattr(model, field), field
  prep = timm.preprocessing_from(config)
  assert (prep.resize, prep.crop_fraction, prep.interpolation) == (
      'resize_crop', 0.9, 'pil_bicubic')
  squash = timm.preprocessing_from(timm.timm_config(
      model, (32, 32), None, images.Preprocessing()))
  assert squash.resize == 'resize'


def test_hybrid_architecture_names():
  model = models.create_model('R50+ViT-B_16', 10)
  assert timm.architecture_name(model, (384, 384)) == 'vit_base_r50_s16_224'
  assert timm.model_args(model, (384, 384))['img_size'] == [384, 384]
  # A registered hybrid fixes its stem; our depth and widths still travel,
  # since timm's entry would otherwise build its own 12 layers.
  shallow = models.create_model('R26+ViT-S_32', 10, num_layers=1)
  args = timm.model_args(shallow, (64, 64))
  assert timm.architecture_name(shallow, (64, 64)) == 'vit_small_r26_s32_224'
  assert (args['depth'], args['embed_dim'], args['num_heads']) == (1, 384, 6)
  assert 'patch_size' not in args  # the stem's stride, not a kwarg


@pytest.mark.parametrize('options,match', [
    (dict(representation_size=16), 'pre-logits'),
    (dict(resnet_layers=(1, 1), patch_size=1), 'ResNet hybrid'),
    (dict(classifier='unpooled'), 'every token'),
])
def test_inexpressible_models_refused_in_one_line(options, match):
  with pytest.raises(ValueError, match=match) as err:
    timm.timm_config(make(**options), (32, 32), None, images.Preprocessing())
  assert '\n' not in str(err.value)


def test_not_a_vit_is_named():
  swin = {'layers.0.blocks.0.attn.qkv.weight': np.zeros((3, 1)),
          'patch_embed.proj.weight': np.zeros((1, 3, 4, 4))}
  with pytest.raises(ValueError, match=r"not a timm VisionTransformer.*"
                     r"swin_base_patch4_window7_224"):
    timm.model_options(swin, {'architecture': 'swin_base_patch4_window7_224'},
                       'swin.safetensors')


def test_parameters_without_a_place_are_listed():
  state = published_state(np.random.default_rng(0))
  state['norm_pre.weight'] = np.ones(32, np.float32)  # CLIP's pre-norm
  config = {'architecture': 'vit_tiny_patch8_32',
            'model_args': {'num_heads': 2}}
  options, _ = timm.model_options(state, config, 'clip.safetensors')
  model = models.VisionTransformer(**options)
  init = jax.eval_shape(model.init, jax.random.key(0),
                        jnp.zeros((1, 32, 32, 3)))['params']
  with pytest.raises(ValueError, match=r'(?s)clip\.safetensors does not fit.*'
                     r'no place for them.*norm_pre\.weight'):
    timm.from_timm(state, init, model, 'clip.safetensors')
