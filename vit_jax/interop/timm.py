"""timm's VisionTransformer: its parameter names and config.json, both ways.

timm (`timm.models.vision_transformer`) names a ViT's weights in PyTorch
layouts: a fused `qkv` (rows q, k, v), Linear weights (out, in), convolutions
OIHW. `to_timm` / `from_timm` convert our linen tree to and from that flat
state dict exactly (a transpose or reshape per array, nothing rounded);
`model_options` reads an architecture back from a state dict and its
config.json, `timm_config` writes the config.json of timm's hub layout.
Hybrids are timm's registered ResNetV2 ones (`vit_base_r50_s16_384`, ...).
timm builds a model with exact GELU unless told `act_layer='gelu_tanh'`;
both are recorded and read back (`activation`).
"""
from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from vit_jax.base import errors
from vit_jax.checkpoint import arrays
from vit_jax.interop import fields
from vit_jax.models import resnet
from vit_jax.serving import images

# timm's size words -> heads (timm's own constructors; widths come from the
# weights' shapes, heads cannot).
HEADS = {'tiny': 3, 'small': 6, 'base': 12, 'medium': 8, 'betwixt': 10,
         'large': 16, 'huge': 16, 'giant': 16, 'gigantic': 16}
_SIZES = {192: 'tiny', 384: 'small', 768: 'base', 1024: 'large', 1280: 'huge'}
# Our hybrids (resnet_layers, patch, width) -> timm's registered names.
HYBRIDS = {((), 8, 192): 'vit_tiny_r_s16_p8', ((2, 2, 2, 2), 1, 384):
           'vit_small_r26_s32', ((2, 2, 2, 2), 1, 768): 'vit_base_r26_s32',
           ((3, 4, 9), 1, 768): 'vit_base_r50_s16',
           ((3, 4, 6, 3), 1, 1024): 'vit_large_r50_s32'}
_STEM = 'patch_embed.backbone.'
# timm's plain ViT entries at 224 px (timm 1.0.31's registry).
_REGISTERED = {'vit_tiny_patch16_224', 'vit_small_patch16_224',
               'vit_small_patch32_224', 'vit_base_patch8_224',
               'vit_base_patch16_224', 'vit_base_patch32_224',
               'vit_large_patch16_224', 'vit_large_patch32_224',
               'vit_huge_patch14_224'}


def _dense(k):
  return k.T


def _qkv_out(k):  # (D, heads, head_dim) -> (heads * head_dim, D)
  return k.reshape(k.shape[0], -1).T


def _conv(k):  # HWIO -> OIHW
  return k.transpose(3, 2, 0, 1)


def _names(model: Any, flat: Mapping[str, Any]) -> list[tuple[str, str, str]]:
  """(our key, timm key, conversion) for every array of `flat`; the
  attention's q/k/v go separately ('qkv' rows are assembled by the caller)."""
  pairs = []
  def module(ours, theirs, kind='dense'):
    for leaf, torch_leaf in (('kernel', 'weight'), ('scale', 'weight'),
                             ('bias', 'bias')):
      if f'{ours}/{leaf}' in flat:
        bias = 'bias' if kind == 'qkv' else 'same'  # (heads, head_dim)
        pairs.append((f'{ours}/{leaf}', f'{theirs}.{torch_leaf}',
                      kind if leaf == 'kernel' else bias))
  module('embedding', 'patch_embed.proj', 'conv')
  for ours, theirs in (('cls', 'cls_token'), ('reg', 'reg_token'),
                       ('Transformer/posembed_input/pos_embedding',
                        'pos_embed'), ('MAPHead_0/probe', 'attn_pool.latent')):
    if ours in flat:
      pairs.append((ours, theirs, 'same'))
  if 'conv_root/kernel' in flat:
    module('conv_root', _STEM + 'stem.conv', 'conv')
    module('gn_root', _STEM + 'stem.norm')
    for key in flat:
      unit = re.match(r'^block(\d+)/unit(\d+)/(conv|gn)(\d|_proj)/kernel$',
                      key.replace('/scale', '/kernel'))
      if unit and unit[3] == 'conv':
        s, b, n = int(unit[1]) - 1, int(unit[2]) - 1, unit[4]
        theirs = f'{_STEM}stages.{s}.blocks.{b}.'
        mine = f'block{s + 1}/unit{b + 1}/'
        conv, norm = (('downsample.conv', 'downsample.norm') if n == '_proj'
                      else (f'conv{n}', f'norm{n}'))
        module(mine + f'conv{n}', theirs + conv, 'conv')
        module(mine + f'gn{n}', theirs + norm)
  for i in range(model.num_layers):
    mine, theirs = f'Transformer/encoderblock_{i}/', f'blocks.{i}.'
    module(mine + 'LayerNorm_0', theirs + 'norm1')
    module(mine + 'MultiHeadDotProductAttention_0/out', theirs + 'attn.proj',
           'out')
    module(mine + 'LayerNorm_1', theirs + 'norm2')
    module(mine + 'MlpBlock_0/Dense_0', theirs + 'mlp.fc1')
    module(mine + 'MlpBlock_0/Dense_1', theirs + 'mlp.fc2')
    for n in (0, 1):
      if f'{mine}LayerScale_{n}/scale' in flat:
        pairs.append((f'{mine}LayerScale_{n}/scale', f'{theirs}ls{n + 1}.gamma',
                      'same'))
  head = 'MAPHead_0/'
  module(head + 'MultiHeadDotProductAttention_0/query', 'attn_pool.q', 'qkv')
  module(head + 'MultiHeadDotProductAttention_0/out', 'attn_pool.proj', 'out')
  module(head + 'LayerNorm_0', 'attn_pool.norm')
  module(head + 'MlpBlock_0/Dense_0', 'attn_pool.mlp.fc1')
  module(head + 'MlpBlock_0/Dense_1', 'attn_pool.mlp.fc2')
  module('Transformer/encoder_norm', 'norm')
  module('fc_norm', 'fc_norm')
  module('pre_logits', 'pre_logits.fc')  # timm's old representation layer
  module('head', 'head')
  return pairs


_TO_TORCH = {'same': lambda v: v, 'bias': lambda v: v.reshape(-1),
             'dense': _dense, 'conv': _conv,
             'qkv': _qkv_out, 'out': lambda k: k.reshape(-1, k.shape[-1]).T}


def _fused(model: Any) -> list[tuple[str, str, tuple[str, ...]]]:
  """(timm key, our prefix, parts) of the fused projections."""
  fused = [(f'blocks.{i}.attn.qkv', f'Transformer/encoderblock_{i}/'
            'MultiHeadDotProductAttention_0/', ('query', 'key', 'value'))
           for i in range(model.num_layers)]
  if model.classifier == 'map':
    fused.append(('attn_pool.kv', 'MAPHead_0/MultiHeadDotProductAttention_0/',
                  ('key', 'value')))
  return fused


def to_timm(params: Mapping[str, Any], model: Any) -> dict[str, np.ndarray]:
  """Our (unrolled) params of `model` -> timm's state dict, numpy arrays."""
  flat = {k: np.asarray(v) for k, v in arrays.flatten(params).items()}
  state = {theirs: np.ascontiguousarray(_TO_TORCH[kind](flat[ours]))
           for ours, theirs, kind in _names(model, flat)}
  for theirs, prefix, parts in _fused(model):
    state[theirs + '.weight'] = np.concatenate(
        [_qkv_out(flat[f'{prefix}{p}/kernel']) for p in parts])
    state[theirs + '.bias'] = np.concatenate(
        [flat[f'{prefix}{p}/bias'].reshape(-1) for p in parts])
  return state


def from_timm(state: Mapping[str, Any], init: Mapping[str, Any], model: Any,
              source: str = 'timm checkpoint') -> dict[str, Any]:
  """timm's state dict -> our params shaped like `init` (the model's own
  params or their shapes); one ValueError lists every key that differs."""
  shapes = {k: tuple(np.shape(v)) for k, v in arrays.flatten(init).items()}
  state = {k: np.asarray(v) for k, v in state.items()}
  flat, used, problems = {}, set(), []
  for ours, theirs, kind in _names(model, shapes):
    if theirs not in state:
      continue
    used.add(theirs)
    value, shape = state[theirs], shapes[ours]
    if kind == 'dense':
      value = value.T
    elif kind == 'conv':
      value = value.transpose(2, 3, 1, 0)
    elif kind in ('qkv', 'out'):
      value = value.T.reshape(shape)
    elif kind == 'bias' and value.size == np.prod(shape):
      value = value.reshape(shape)
    flat[ours] = value
  for theirs, prefix, parts in _fused(model):
    if theirs + '.weight' not in state or theirs + '.bias' not in state:
      continue
    used.update((theirs + '.weight', theirs + '.bias'))
    for part, w, b in zip(parts, np.split(state[theirs + '.weight'],
                                          len(parts)),
                          np.split(state[theirs + '.bias'], len(parts))):
      key = f'{prefix}{part}/'
      flat[key + 'kernel'] = w.T.reshape(shapes[key + 'kernel'])
      flat[key + 'bias'] = b.reshape(shapes[key + 'bias'])
  problems = [f'{k}: file {flat[k].shape} vs model {shapes[k]}'
              for k in flat if flat[k].shape != shapes[k]]
  missing = sorted(set(shapes) - set(flat))
  unexpected = sorted(set(state) - used)
  if problems or missing or unexpected:
    raise ValueError(
        f'{source} does not fit {architecture_name(model, None, strict=False)}'
        ':' + errors.listing('unexpected (no place for them in vit_jax\'s '
                             'ViT)', unexpected, 10)
        + errors.listing('missing from the file (our names)', missing, 10)
        + errors.listing('shapes that differ', problems, 10))
  return arrays.unflatten(flat)


def unsupported(model: Any) -> str | None:
  """Why timm cannot build `model`, or None."""
  if model.representation_size is not None:
    return ('has a pre-logits layer (representation_size), which timm '
            'dropped from its ViT')
  if model.resnet_layers is not None and (
      _hybrid_key(model) not in HYBRIDS or model.resnet_width != 1
      or model.num_heads != HEADS[_SIZES.get(model.hidden_size, 'base')]):
    return ('is a ResNet hybrid that is none of timm\'s registered ones '
            f'({", ".join(sorted(HYBRIDS.values()))})')
  if model.classifier in ('unpooled', 'token_unpooled'):
    return f'returns every token (classifier={model.classifier!r})'
  if model.patch_size[0] != model.patch_size[1]:
    return f'has non-square patches {model.patch_size}'
  return None


def _hybrid_key(model: Any) -> tuple:
  return (tuple(model.resnet_layers), model.patch_size[0], model.hidden_size)


def architecture_name(model: Any, image_size: tuple[int, int] | None, *,
                      strict: bool = True) -> str:
  """timm's registered architecture `model` is built from, with the kwargs
  of `model_args` (widths, depth, heads, patch, img_size, options): the
  224-px entry of its size and patch (e.g. vit_base_patch16_224), a
  registered hybrid, or vit_base_patch16_224 for other shapes. `image_size`
  only matters through model_args' img_size: timm knows no name for most
  sizes (timm 1.0.31 has no vit_base_patch8_32, say)."""
  del image_size  # in model_args
  reason = unsupported(model)
  if reason and strict:
    raise ValueError(f'This model {reason}: it has no timm equivalent; '
                     'export npz or safetensors instead.')
  if model.resnet_layers is not None and _hybrid_key(model) in HYBRIDS:
    return f'{HYBRIDS[_hybrid_key(model)]}_224'
  name = (f'vit_{_SIZES.get(model.hidden_size)}_patch{model.patch_size[0]}'
          '_224')
  return name if name in _REGISTERED else 'vit_base_patch16_224'


def model_args(model: Any, image_size: tuple[int, int]) -> dict[str, Any]:
  """timm VisionTransformer kwargs that make its architecture `model`."""
  args = {'img_size': list(image_size), 'num_classes': model.num_classes,
          'global_pool': {'token': 'token', 'gap': 'avg', 'map': 'map'}[
              model.classifier],
          'class_token': model.classifier == 'token',
          'act_layer': 'gelu_tanh' if model.activation == 'gelu_tanh'
          else 'gelu'}
  # Widths and depth for hybrids too: their registered entries fix only
  # the stem, and kwargs override the rest (a 1-layer R26+S/32 stays 1).
  args.update(embed_dim=model.hidden_size, depth=model.num_layers,
              num_heads=model.num_heads,
              mlp_ratio=model.mlp_dim / model.hidden_size)
  if model.resnet_layers is None:
    args['patch_size'] = model.patch_size[0]
  if model.num_registers:
    args['reg_tokens'] = model.num_registers
  if not model.posemb_prefix and model.num_prefix_tokens:
    args['no_embed_class'] = True
  if model.layerscale is not None:
    args['init_values'] = model.layerscale
  if model.classifier in ('gap', 'map'):
    args['fc_norm'] = bool(model.fc_norm)
  return args


def timm_config(model: Any, image_size: tuple[int, int],
                label_names: list[str] | None,
                preprocessing: images.Preprocessing) -> dict[str, Any]:
  """config.json of timm's hub layout (what `timm.create_model('hf-hub:...')`
  and `load_model_config_from_hf` read)."""
  interpolation = {'pil_bicubic': 'bicubic'}.get(preprocessing.interpolation,
                                                 'bilinear')
  config = {
      'architecture': architecture_name(model, image_size),
      'num_classes': model.num_classes,
      'num_features': model.hidden_size,
      'global_pool': model_args(model, image_size)['global_pool'],
      'model_args': model_args(model, image_size),
      'pretrained_cfg': {
          'input_size': [3, *image_size], 'fixed_input_size': True,
          'interpolation': interpolation,
          # 'squash': both sides to the size, as our 'resize'.
          'crop_pct': (preprocessing.crop_fraction
                       if preprocessing.resize == 'resize_crop' else 1.0),
          'crop_mode': ('center' if preprocessing.resize == 'resize_crop'
                        else 'squash'), 'mean': list(preprocessing.mean),
          'std': list(preprocessing.std), 'num_classes': model.num_classes,
          'first_conv': 'patch_embed.proj', 'classifier': 'head'}}
  if label_names:
    config['label_names'] = list(label_names)
  return config


def preprocessing_from(config: Mapping[str, Any]) -> images.Preprocessing:
  """The eval transform a timm config.json's pretrained_cfg describes."""
  cfg = config.get('pretrained_cfg') or {}
  crop = float(cfg.get('crop_pct') or 0.875)  # timm's default
  squash = cfg.get('crop_mode') == 'squash' and crop >= 1
  return images.Preprocessing(
      # timm's 'center': shorter side to size / crop_pct, then the centre.
      resize='resize' if squash else 'resize_crop',
      crop_fraction=min(crop, 1.0),
      interpolation=('pil_bicubic' if cfg.get('interpolation') == 'bicubic'
                     else 'pil_bilinear'),
      mean=tuple(cfg.get('mean', (0.485, 0.456, 0.406))),
      std=tuple(cfg.get('std', (0.229, 0.224, 0.225))))


def _image_size(config: Mapping[str, Any], architecture: str
                ) -> tuple[int, int] | None:
  for part, name in (('model_args', 'img_size'),
                     ('pretrained_cfg', 'input_size')):  # [3, height, width]
    section = config.get(part) or {}
    if section.get(name):
      return fields.size(section, name, None)
  end = re.search(r'_(\d{3})(\.|$)', architecture)
  return (int(end[1]),) * 2 if end else None


def model_options(state: Mapping[str, Any], config: Mapping[str, Any],
                  source: str) -> tuple[dict[str, Any], tuple[int, int] | None]:
  """(VisionTransformer fields, image size or None) of a timm checkpoint:
  widths and options from the arrays' shapes, heads, pooling and activation
  from the config (its architecture name and model_args)."""
  architecture = str(config.get('architecture', ''))
  args = dict(config.get('model_args') or {})
  if 'blocks.0.attn.qkv.weight' not in state or 'pos_embed' not in state:
    raise ValueError(
        f'{source} is not a timm VisionTransformer checkpoint (architecture '
        f'{architecture or "not named"}): it has no blocks.0.attn.qkv / '
        f'pos_embed (it has {", ".join(sorted(state)[:4])}, ...). vit_jax '
        "reads timm's vit_* models.")
  shape = lambda k: tuple(np.shape(state[k]))
  hidden = shape('pos_embed')[-1]
  size = next((w for w in HEADS if f'_{w}_' in f'_{architecture}_'), None)
  heads = args.get('num_heads') or HEADS.get(size or _SIZES.get(hidden, ''))
  if not heads:
    raise ValueError(f'{source}: the number of attention heads of '
                     f'architecture {architecture!r} is unknown; give it in '
                     "config.json's model_args as num_heads.")
  options = {
      'hidden_size': hidden,
      'num_heads': fields.integer(args, 'num_heads', heads, 1, hidden,
                                  heads),
      'num_layers': len({k.split('.')[1] for k in state
                         if k.startswith('blocks.')}),
      'mlp_dim': shape('blocks.0.mlp.fc1.weight')[0],
      'num_classes': shape('head.weight')[0] if 'head.weight' in state else 0,
      'num_registers': shape('reg_token')[1] if 'reg_token' in state else 0,
      'layerscale': (float(args.get('init_values') or 1e-5)
                     if 'blocks.0.ls1.gamma' in state else None),
      'fc_norm': 'fc_norm.weight' in state,
      'activation': ('gelu_tanh' if args.get('act_layer') in (
          'gelu_tanh', 'gelu_pytorch_tanh') else 'gelu'),
      'representation_size': (shape('pre_logits.fc.weight')[0]
                              if 'pre_logits.fc.weight' in state else None)}
  if args.get('act_layer') not in (None, 'gelu', 'gelu_tanh',
                                   'gelu_pytorch_tanh'):
    raise ValueError(f'{source}: activation {args["act_layer"]!r} is not '
                     "supported; vit_jax's ViT has 'gelu' and 'gelu_tanh'.")
  pool = config.get('global_pool') or args.get('global_pool')
  if 'cls_token' in state:
    options['classifier'] = 'token'
  else:
    options['classifier'] = ('map' if 'attn_pool.latent' in state
                             or pool == 'map' else 'gap')
  if any(k.startswith(_STEM) for k in state):
    stages = {}
    for k in state:
      block = re.match(re.escape(_STEM) + r'stages\.(\d+)\.blocks\.(\d+)\.', k)
      if block:
        stages[int(block[1])] = max(stages.get(int(block[1]), 0),
                                    int(block[2]) + 1)
    options['resnet_layers'] = tuple(stages[s] for s in sorted(stages))
    options['resnet_width'] = 1
  image_size = _image_size(config, architecture)
  patch = shape('patch_embed.proj.weight')[-2:]
  options['patch_size'] = tuple(patch)
  prefix = int('cls_token' in state) + options['num_registers']
  tokens = shape('pos_embed')[1]
  if prefix and tokens == _grid_tokens(options, image_size, tokens - prefix):
    options['posemb_prefix'] = False  # timm's no_embed_class
  return options, image_size


def _grid_tokens(options: Mapping[str, Any], image_size, default: int) -> int:
  """Patch tokens at image_size (a hybrid's stem strides further)."""
  if not image_size:
    return default
  stride = options['patch_size'][0]
  if 'resnet_layers' in options:
    stride *= resnet.stem_stride(options['resnet_layers'])
  return (image_size[0] // stride) * (image_size[1] // stride)
