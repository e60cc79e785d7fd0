"""Hugging Face transformers' ViT names and configs, both ways, in numpy.

`ViTModel` / `ViTForImageClassification` store a ViT as `vit.embeddings.*`,
`vit.encoder.layer.{i}.*`, `vit.layernorm`, `classifier` in PyTorch layouts
(Linear weights (out, in), the patch convolution OIHW). `to_hf` / `from_hf`
convert our linen tree to and from that flat state dict exactly (no torch);
`hf_config` / `model_options` write and read config.json,
`preprocessor_config` / `preprocessing_from` ViTImageProcessor's file.
transformers' ViT is a pre-LN encoder classifying the class token with one
Linear: other poolings, pre-logits, hybrids, registers and LayerScale have no
equivalent (`check_expressible`). We write the names every version reads;
transformers >= 5 names blocks `layers.{i}.attention.q_proj`, `mlp.fc1`, ...
in memory, and `from_hf` reads those too.
"""
from collections.abc import Mapping
import logging
import re
from typing import Any, TYPE_CHECKING

import numpy as np

from vit_jax.base import errors
from vit_jax.checkpoint import arrays
from vit_jax.interop import fields

if TYPE_CHECKING:  # Imported when called: the checkpoint layer loads no PIL.
  from vit_jax.serving import images

log = logging.getLogger(__name__)

# transformers' hidden_act names of the tanh-approximated GELU (ours by
# default; 'gelu_pytorch_tanh' is the one we write) and of the exact one.
_TANH_GELU = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast',
              'gelu_python_tanh')
_EXACT_GELU = ('gelu', 'gelu_python')
# Our block scopes -> transformers' (on-disk, legacy) module names, layout.
_ATT = 'MultiHeadDotProductAttention_0/'
_BLOCK = (('LayerNorm_0', 'layernorm_before', 'norm'),
          *((_ATT + n, f'attention.attention.{n}', 'qkv')
            for n in ('query', 'key', 'value')),
          (_ATT + 'out', 'attention.output.dense', 'out'),
          ('LayerNorm_1', 'layernorm_after', 'norm'),
          ('MlpBlock_0/Dense_0', 'intermediate.dense', 'dense'),
          ('MlpBlock_0/Dense_1', 'output.dense', 'dense'))
# transformers >= 5 in-memory names -> the legacy ones (applied in order).
_NEW_NAMES = ((r'^(?:encoder\.)?layers\.(\d+)\.', r'encoder.layer.\1.'),
              (r'\.attention\.q_proj\.', '.attention.attention.query.'),
              (r'\.attention\.k_proj\.', '.attention.attention.key.'),
              (r'\.attention\.v_proj\.', '.attention.attention.value.'),
              (r'\.attention\.o_proj\.', '.attention.output.dense.'),
              (r'\.mlp\.fc1\.', '.intermediate.dense.'),
              (r'\.mlp\.fc2\.', '.output.dense.'))
# PIL's resample ints, as ViTImageProcessor stores them.
_RESAMPLE = {'bilinear': 2, 'pil_bilinear': 2, 'pil_bicubic': 3}


def _pairs(model: Any) -> list[tuple[str, str, str]]:
  """(our flat key, transformers' key without 'vit.', layout) for `model`."""
  patch = 'embeddings.patch_embeddings.projection.'
  pairs = [('embedding/kernel', patch + 'weight', 'conv'),
           ('embedding/bias', patch + 'bias', 'same'),
           ('cls', 'embeddings.cls_token', 'same'),
           ('Transformer/posembed_input/pos_embedding',
            'embeddings.position_embeddings', 'same')]
  for i in range(model.num_layers):
    for ours, theirs, kind in _BLOCK:
      mine, hf = f'Transformer/encoderblock_{i}/{ours}/', (
          f'encoder.layer.{i}.{theirs}.')
      if kind == 'norm':
        pairs += [(mine + 'scale', hf + 'weight', 'same'),
                  (mine + 'bias', hf + 'bias', 'same')]
      else:  # q/k/v biases are (heads, head_dim) here, flat there.
        pairs += [(mine + 'kernel', hf + 'weight', kind),
                  (mine + 'bias', hf + 'bias',
                   'heads' if kind == 'qkv' else 'same')]
  pairs += [('Transformer/encoder_norm/scale', 'layernorm.weight', 'same'),
            ('Transformer/encoder_norm/bias', 'layernorm.bias', 'same')]
  if model.num_classes:
    pairs += [('head/kernel', 'classifier.weight', 'dense'),
              ('head/bias', 'classifier.bias', 'same')]
  return pairs


def check_expressible(model: Any) -> None:
  """ValueError (one line) naming every option of `model` that transformers'
  ViT cannot build, so an export fails before writing anything."""
  p = model.patch_size
  reasons = [
      (model.classifier != 'token', f'classifier={model.classifier!r}',
       'ViTForImageClassification classifies the class token'),
      (model.representation_size is not None,
       f'representation_size={model.representation_size}',
       'its classifier is one Linear on the class token, without pre-logits '
       '(ViTModel\'s pooler is unused by it)'),
      (model.resnet_layers is not None,
       f'resnet_layers={model.resnet_layers}', 'it has no ResNet stem'),
      (bool(model.num_registers), f'num_registers={model.num_registers}',
       'it has no register tokens'),
      (model.layerscale is not None, f'layerscale={model.layerscale}',
       'it has no LayerScale'),
      (model.fc_norm, 'fc_norm=True', 'it normalises tokens, not pooled '
       'features'),
      (not model.posemb_prefix, 'posemb_prefix=False',
       'its position embedding covers the class token'),
      (p[0] != p[1], f'patch_size={tuple(p)}', 'config.patch_size is one int')]
  found = [(opt, why) for bad, opt, why in reasons if bad]
  if found:
    raise ValueError(
        f'ViT (hidden_size={model.hidden_size}, {model.num_layers} layers) '
        f'with {" and ".join(o for o, _ in found)} has no Hugging Face ViT '
        f'equivalent: {"; ".join(w for _, w in found)}; export npz/'
        'safetensors or timm instead.')


def to_hf(params: Mapping[str, Any], model: Any) -> dict[str, np.ndarray]:
  """Our params -> ViTForImageClassification's state dict (ViTModel's, with
  the `vit.` prefix, without a head): torch layouts, params' dtype,
  contiguous (safetensors refuses strided arrays)."""
  check_expressible(model)
  flat = {k: np.asarray(v) for k, v in arrays.flatten(params).items()}
  convert = {'same': lambda v: v, 'conv': lambda v: v.transpose(3, 2, 0, 1),
             'dense': lambda v: v.T, 'heads': lambda v: v.reshape(-1),
             'qkv': lambda v: v.reshape(v.shape[0], -1).T,
             'out': lambda v: v.reshape(-1, v.shape[-1]).T}
  missing = [ours for ours, _, _ in _pairs(model) if ours not in flat]
  if missing:
    raise ValueError('These params do not fit the model (unrolled blocks '
                     'expected):' + errors.listing('missing', missing, 10))
  return {('' if theirs.startswith('classifier.') else 'vit.') + theirs:
              np.ascontiguousarray(convert[kind](flat[ours]))
          for ours, theirs, kind in _pairs(model)}


def _legacy_name(key: str) -> str:
  """A key of any transformers version, without 'vit.', in legacy naming."""
  key = key.removeprefix('vit.')
  for pattern, replacement in _NEW_NAMES:
    key = re.sub(pattern, replacement, key)
  return key


def _torch_shape(model: Any, ours: str) -> tuple[int | None, ...]:
  """transformers' shape of our `ours` (None: any position-token count)."""
  d, m, c = model.hidden_size, model.mlp_dim, model.num_classes
  fixed = {'embedding/kernel': (d, 3, *model.patch_size), 'cls': (1, 1, d),
           'Transformer/posembed_input/pos_embedding': (1, None, d),
           'head/kernel': (c, d), 'head/bias': (c,)}
  fixed.update({ours: shape for end, shape in (
      ('Dense_0/kernel', (m, d)), ('Dense_1/kernel', (d, m)),
      ('Dense_0/bias', (m,))) if ours.endswith(end)})
  return fixed.get(ours) or ((d, d) if ours.endswith('/kernel') else (d,))


def from_hf(state: Mapping[str, np.ndarray], model: Any) -> dict:
  """transformers' state dict (with or without `vit.`, legacy or >= 5 names)
  -> our nested params for `model` (built from `model_options`).

  ViTModel's pooler (`pooler.dense`) is skipped: classification and our
  features never use it. One ValueError lists every missing, unexpected
  and mis-shaped array.
  """
  named = {_legacy_name(k): np.asarray(v) for k, v in state.items()}
  d, h = model.hidden_size, model.num_heads
  convert = {'same': lambda v: v, 'conv': lambda v: v.transpose(2, 3, 1, 0),
             'dense': lambda v: v.T, 'heads': lambda v: v.reshape(h, -1),
             'qkv': lambda v: v.T.reshape(d, h, -1),
             'out': lambda v: v.T.reshape(h, -1, d)}
  flat, used, bad = {}, set(), []
  for ours, theirs, kind in _pairs(model):
    if theirs not in named:
      continue
    used.add(theirs)
    v, want = named[theirs], _torch_shape(model, ours)
    if v.ndim != len(want) or any(w not in (None, s)
                                  for w, s in zip(want, v.shape)):
      bad.append(f'{theirs} {tuple(v.shape)}, expected '
                 f'{tuple("any" if w is None else w for w in want)}')
      continue
    flat[ours] = convert[kind](v)
  # ViTModel's pooler: unused by classification and by our features.
  used.update(k for k in named if k.startswith('pooler.'))
  missing = [ours for ours, theirs, _ in _pairs(model) if theirs not in named]
  unexpected = sorted(set(named) - used)
  if missing or unexpected or bad:
    raise ValueError(
        f'This Hugging Face state dict does not fit a {model.num_layers}-layer '
        f'ViT (hidden_size={d}, num_classes={model.num_classes}):'
        + errors.listing('missing (our names)', missing)
        + errors.listing('unexpected (no place for them)', unexpected)
        + errors.listing('mis-shaped', bad))
  return arrays.unflatten(flat)


def hf_config(model: Any, image_size: tuple[int, int],
              label_names: list[str] | None) -> dict:
  """config.json of ViTForImageClassification (ViTModel without a head).

  `image_size` is written as an int when square, [height, width] otherwise
  (ViTPatchEmbeddings accepts both). Labels default to transformers'
  LABEL_i, which `label_names` reads back as None.
  """
  check_expressible(model)
  n = model.num_classes
  labels = list(label_names) if label_names else [f'LABEL_{i}'
                                                  for i in range(n)]
  if len(labels) != n:
    raise ValueError(f'{len(labels)} label names for a model with '
                     f'num_classes={n}.')
  size = (int(image_size[0]) if image_size[0] == image_size[1]
          else [int(image_size[0]), int(image_size[1])])
  return {
      'model_type': 'vit',
      'architectures': ['ViTForImageClassification' if n else 'ViTModel'],
      'hidden_size': model.hidden_size, 'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads,
      'intermediate_size': model.mlp_dim,
      'hidden_act': ('gelu_pytorch_tanh' if model.activation == 'gelu_tanh'
                     else 'gelu'),
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02,
      'layer_norm_eps': 1e-6,  # our LayerNorms' (transformers' default 1e-12)
      'image_size': size, 'patch_size': model.patch_size[0],
      'num_channels': 3, 'qkv_bias': True,
      'encoder_stride': model.patch_size[0],
      'id2label': {str(i): name for i, name in enumerate(labels)},
      'label2id': {name: i for i, name in enumerate(labels)}}


def model_options(config: Mapping) -> tuple[dict, tuple[int, int]]:
  """(VisionTransformer fields, image size) of a transformers config.json.

  Exact GELU ('gelu') maps to our `activation='gelu'`, the tanh forms to
  'gelu_tanh', so logits match either way. A layer_norm_eps other than our
  1e-6 (transformers' default is 1e-12) is logged: it shifts outputs by
  about eps / variance, negligible unless eps is large.
  """
  kind = config.get('model_type')
  if kind != 'vit':
    raise ValueError(f'Hugging Face model_type {kind!r} is not a ViT; '
                     "vit_jax reads model_type 'vit' (ViTModel / "
                     'ViTForImageClassification).')
  act = config.get('hidden_act', 'gelu')
  problems = [f'{name}={config.get(name)!r} ({why})' for name, ok, why in (
      ('hidden_act', act in _TANH_GELU + _EXACT_GELU, 'our MLP is GELU'),
      ('qkv_bias', config.get('qkv_bias', True), 'our q/k/v have biases'),
      ('num_channels', config.get('num_channels', 3) == 3, 'we take RGB'))
               if not ok]
  if problems:
    raise ValueError('Unsupported Hugging Face ViT config: '
                     f'{", ".join(problems)}.')
  eps = config.get('layer_norm_eps', 1e-12)
  if not 0 <= eps <= 1e-5:
    log.warning('layer_norm_eps=%g in the config; vit_jax normalises with '
                '1e-6, so outputs differ slightly.', eps)
  head = 'ViTForImageClassification' in (config.get('architectures') or [])
  id2label = config.get('id2label') or {}
  num_classes = (len(id2label) or fields.integer(config, 'num_labels', 2, 1, 10**6)
                 ) if head else 0
  return ({'num_classes': num_classes,
           'patch_size': fields.size(config, 'patch_size', 16),
           'hidden_size': fields.integer(config, 'hidden_size', 768, 1, 2**16),
           'num_layers': fields.integer(config, 'num_hidden_layers', 12, 1, 2**10),
           'num_heads': fields.integer(config, 'num_attention_heads', 12, 1, 2**10),
           'mlp_dim': fields.integer(config, 'intermediate_size', 3072, 1, 2**18),
           'classifier': 'token', 'representation_size': None,
           'resnet_layers': None, 'num_registers': 0, 'posemb_prefix': True,
           'layerscale': None, 'fc_norm': False,
           'activation': 'gelu' if act in _EXACT_GELU else 'gelu_tanh'},
          fields.size(config, 'image_size', 224))


def label_names(config: Mapping) -> list[str] | None:
  """id2label ordered by int id; None for transformers' LABEL_i defaults."""
  id2label = config.get('id2label') or {}
  names = [str(id2label[k]) for k in sorted(id2label, key=int)]
  if not names or names == [f'LABEL_{i}' for i in range(len(names))]:
    return None
  return names


def preprocessor_config(preprocessing: 'images.Preprocessing',
                        image_size: tuple[int, int]) -> dict:
  """preprocessor_config.json for ViTImageProcessor.

  It resizes straight to the size with Pillow's filter, so 'resize' maps
  onto it; our TF-arithmetic 'bilinear' becomes Pillow's bilinear (about a
  level of 255 apart), and 'resize_crop' has no equivalent: its crop is
  dropped with a warning.
  """
  if preprocessing.resize == 'resize_crop':
    log.warning('ViTImageProcessor cannot crop: the exported preprocessor '
                'resizes the whole image (resize_crop %g dropped).',
                preprocessing.crop_fraction)
  return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
          'size': {'height': int(image_size[0]), 'width': int(image_size[1])},
          'resample': _RESAMPLE[preprocessing.interpolation],
          'do_rescale': True, 'rescale_factor': 1 / 255,
          'do_normalize': True, 'image_mean': list(preprocessing.mean),
          'image_std': list(preprocessing.std)}


def preprocessing_from(preprocessor_config: Mapping | None,
                       image_size: tuple[int, int]) -> 'images.Preprocessing':
  """Our eval preprocessing of a preprocessor_config.json; None (no file):
  ViTImageProcessor's defaults (Pillow bilinear, mean and std 0.5).

  The model sees (x * rescale_factor - mean) / std; written over pixels in
  [0, 1] that is mean / (255 r), std / (255 r), so any rescale is exact.
  """
  # Here, not at the top: serving.images loads PIL, the checkpoint layer not.
  from vit_jax.serving import images  # pylint: disable=g-import-not-at-top
  c = dict(preprocessor_config or {})
  resample = c.get('resample', 2)
  interpolation = {2: 'pil_bilinear', 3: 'pil_bicubic'}.get(resample)
  if interpolation is None:
    log.warning('Resample %r (PIL) is not supported; using bilinear.',
                resample)
    interpolation = 'pil_bilinear'
  size = c.get('size')
  if isinstance(size, Mapping) and 'height' in size and (
      size['height'], size.get('width')) != tuple(image_size):
    log.warning('The preprocessor resizes to %sx%s; the model runs at %sx%s.',
                size['height'], size.get('width'), *image_size)
  r = c.get('rescale_factor', 1 / 255) if c.get('do_rescale', True) else 1
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not (
      0 < r < float('inf')):
    raise ValueError(f'rescale_factor={r!r}: expected a positive number '
                     '(1/255 rescales 0..255 to 0..1)')
  mean, std = ((c.get('image_mean', 0.5), c.get('image_std', 0.5))
               if c.get('do_normalize', True) else (0.0, 1.0))
  for name, v in (('image_mean', mean), ('image_std', std)):
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool)
               for x in (v if isinstance(v, (list, tuple)) else (v,))):
      raise ValueError(f'{name}={v!r}: expected a number or three numbers')
  scale = 255 * float(r)
  scale = 1.0 if abs(scale - 1) < 1e-9 else scale  # keeps 0.5 exactly 0.5
  as3 = lambda v: tuple(float(x) / scale for x in (
      v if isinstance(v, (list, tuple)) else (v,) * 3))
  return images.Preprocessing(resize='resize', interpolation=interpolation,
                              mean=as3(mean), std=as3(std))
