"""Hugging Face transformers' ViT: its parameter names and configs, both ways.

`ViTModel` / `ViTForImageClassification` name a ViT's weights
`vit.embeddings.*`, `vit.encoder.layer.{i}.attention.attention.{query,key,
value}`, ..., `classifier`, in PyTorch layouts (Linear weights (out, in),
the patch convolution OIHW). `to_hf` / `from_hf` convert our linen tree to
and from that flat state dict exactly; `hf_config` / `model_options` write
and read config.json, `preprocessor_config` / `preprocessing_from` the
ViTImageProcessor's file. transformers' ViT classifies the class token with
a pre-LN encoder: registers, LayerScale, average or attention pooling,
pre-logits and hybrids have no equivalent and are refused
(`check_expressible`). Newer transformers name the blocks `vit.layers.{i}`
with `q_proj`... in memory; `from_hf` reads those names too.
"""
from collections.abc import Mapping
import re
from typing import Any

import numpy as np

from vit_jax.base import errors
from vit_jax.checkpoint import arrays
from vit_jax.serving import images

# transformers' activations that are the tanh form (ours) or exact GELU.
_TANH_GELU = ('gelu_pytorch_tanh', 'gelu_new', 'gelu_fast')
_BLOCK = {'LayerNorm_0': 'layernorm_before', 'LayerNorm_1': 'layernorm_after',
          'MultiHeadDotProductAttention_0/query': 'attention.attention.query',
          'MultiHeadDotProductAttention_0/key': 'attention.attention.key',
          'MultiHeadDotProductAttention_0/value': 'attention.attention.value',
          'MultiHeadDotProductAttention_0/out': 'attention.output.dense',
          'MlpBlock_0/Dense_0': 'intermediate.dense',
          'MlpBlock_0/Dense_1': 'output.dense'}
# In-memory names of transformers >= 5 -> the on-disk ones every version reads.
_NEW_NAMES = [(r'^(vit\.)?layers\.(\d+)\.', r'\1encoder.layer.\2.'),
              (r'attention\.q_proj\.', 'attention.attention.query.'),
              (r'attention\.k_proj\.', 'attention.attention.key.'),
              (r'attention\.v_proj\.', 'attention.attention.value.'),
              (r'attention\.o_proj\.', 'attention.output.dense.'),
              (r'\.mlp\.fc1\.', '.intermediate.dense.'),
              (r'\.mlp\.fc2\.', '.output.dense.')]


def _pairs(model: Any) -> list[tuple[str, str, str]]:
  """(our key, transformers' key without 'vit.', conversion)."""
  pairs = [('cls', 'embeddings.cls_token', 'same'),
           ('Transformer/posembed_input/pos_embedding',
            'embeddings.position_embeddings', 'same'),
           ('embedding/kernel', 'embeddings.patch_embeddings.projection.weight',
            'conv'),
           ('embedding/bias', 'embeddings.patch_embeddings.projection.bias',
            'same'),
           ('Transformer/encoder_norm/scale', 'layernorm.weight', 'same'),
           ('Transformer/encoder_norm/bias', 'layernorm.bias', 'same')]
  for i in range(model.num_layers):
    for ours, theirs in _BLOCK.items():
      kind = ('in' if ours.endswith(('query', 'key', 'value')) else 'out'
              if ours.endswith('out') else 'dense')
      mine, hf = f'Transformer/encoderblock_{i}/{ours}/', (
          f'encoder.layer.{i}.{theirs}.')
      if ours.startswith('LayerNorm'):
        pairs += [(mine + 'scale', hf + 'weight', 'same'),
                  (mine + 'bias', hf + 'bias', 'same')]
      else:
        pairs += [(mine + 'kernel', hf + 'weight', kind),
                  (mine + 'bias', hf + 'bias',
                   'flat' if kind == 'in' else 'same')]
  return pairs


def check_expressible(model: Any) -> None:
  """One-line ValueError for a model transformers' ViT cannot build."""
  reasons = {
      model.classifier != 'token': f'classifier={model.classifier!r} (it '
                                   'classifies the class token)',
      model.representation_size is not None: 'a pre-logits layer',
      model.resnet_layers is not None: 'a ResNet stem (hybrid)',
      bool(model.num_registers): 'register tokens',
      model.layerscale is not None: 'LayerScale',
      not model.posemb_prefix: 'no position embedding for the class token',
      model.patch_size[0] != model.patch_size[1]: 'non-square patches'}
  found = [why for bad, why in reasons.items() if bad]
  if found:
    raise ValueError(f'This model has {", ".join(found)}: no Hugging Face '
                     'ViT equivalent; export npz, safetensors or timm '
                     'instead.')


def to_hf(params: Mapping[str, Any], model: Any) -> dict[str, np.ndarray]:
  """Our params -> ViTForImageClassification's state dict (ViTModel's, with
  the `vit.` prefix, when the model has no head)."""
  check_expressible(model)
  flat = {k: np.asarray(v) for k, v in arrays.flatten(params).items()}
  convert = {'same': lambda v: v, 'conv': lambda v: v.transpose(3, 2, 0, 1),
             'dense': lambda v: v.T, 'flat': lambda v: v.reshape(-1),
             'in': lambda v: v.reshape(v.shape[0], -1).T,
             'out': lambda v: v.reshape(-1, v.shape[-1]).T}
  state = {f'vit.{theirs}': np.ascontiguousarray(convert[kind](flat[ours]))
           for ours, theirs, kind in _pairs(model)}
  if 'head/kernel' in flat:
    state['classifier.weight'] = np.ascontiguousarray(flat['head/kernel'].T)
    state['classifier.bias'] = flat['head/bias']
  return state


def _normalise_names(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Keys without 'vit.' and in the on-disk naming, whatever the version."""
  out = {}
  for key, value in state.items():
    for pattern, replacement in _NEW_NAMES:
      key = re.sub(pattern, replacement, key)
    out[key.removeprefix('vit.')] = np.asarray(value)
  return out


def from_hf(state: Mapping[str, Any], model: Any,
            source: str = 'Hugging Face checkpoint') -> dict[str, Any]:
  """transformers' state dict -> our params for `model` (`model_options`);
  one ValueError lists what is missing, unexpected or mis-shaped."""
  state = _normalise_names(state)
  heads = model.num_heads
  flat, used = {}, set()
  for ours, theirs, kind in _pairs(model):
    if theirs not in state:
      continue
    used.add(theirs)
    v = state[theirs]
    if kind == 'conv':
      v = v.transpose(2, 3, 1, 0)
    elif kind == 'dense':
      v = v.T
    elif kind == 'in':
      v = v.T.reshape(v.shape[1], heads, -1)
    elif kind == 'out':
      v = v.T.reshape(heads, -1, v.shape[0])
    elif kind == 'flat':
      v = v.reshape(heads, -1)
    flat[ours] = v
  if model.num_classes and 'classifier.weight' in state:
    used.update(('classifier.weight', 'classifier.bias'))
    flat['head/kernel'] = state['classifier.weight'].T
    flat['head/bias'] = state['classifier.bias']
  used.update(k for k in state if k.startswith('pooler.'))  # ViTModel's
  expected = {ours for ours, _, _ in _pairs(model)} | (
      {'head/kernel', 'head/bias'} if model.num_classes else set())
  missing = sorted(expected - set(flat))
  unexpected = sorted(set(state) - used)
  if missing or unexpected:
    raise ValueError(f'{source} does not fit a {model.num_layers}-layer ViT '
                     'of its config:'
                     + errors.listing('unexpected (no place for them)',
                                      unexpected, 10)
                     + errors.listing('missing (our names)', missing, 10))
  return arrays.unflatten(flat)


def hf_config(model: Any, image_size: tuple[int, int],
              label_names: list[str] | None) -> dict[str, Any]:
  """config.json for ViTForImageClassification (ViTModel without a head)."""
  check_expressible(model)
  if image_size[0] != image_size[1]:
    raise ValueError(f'Hugging Face ViT configs hold one image size; this '
                     f'model runs at {image_size[0]}x{image_size[1]}.')
  labels = label_names or [f'LABEL_{i}' for i in range(model.num_classes)]
  return {
      'architectures': ['ViTForImageClassification' if model.num_classes
                        else 'ViTModel'],
      'model_type': 'vit', 'hidden_size': model.hidden_size,
      'num_hidden_layers': model.num_layers,
      'num_attention_heads': model.num_heads,
      'intermediate_size': model.mlp_dim,
      'hidden_act': ('gelu_pytorch_tanh' if model.activation == 'gelu_tanh'
                     else 'gelu'),
      'hidden_dropout_prob': 0.0, 'attention_probs_dropout_prob': 0.0,
      'initializer_range': 0.02, 'layer_norm_eps': 1e-6,
      'image_size': image_size[0], 'patch_size': model.patch_size[0],
      'num_channels': 3, 'qkv_bias': True,
      'encoder_stride': model.patch_size[0],
      'id2label': {str(i): n for i, n in enumerate(labels)},
      'label2id': {n: i for i, n in enumerate(labels)},
      'torch_dtype': 'float32'}


def model_options(config: Mapping[str, Any]
                  ) -> tuple[dict[str, Any], tuple[int, int]]:
  """(VisionTransformer fields, image size) of a transformers config.json."""
  kind = config.get('model_type')
  if kind != 'vit':
    raise ValueError(f'Hugging Face model_type {kind!r} is not a ViT; '
                     "vit_jax reads model_type 'vit' (ViTModel / "
                     'ViTForImageClassification).')
  act = config.get('hidden_act', 'gelu')
  problems = [f'{k}={config.get(k)!r}' for k, ok in (
      ('hidden_act', act in ('gelu', *_TANH_GELU)),
      ('qkv_bias', config.get('qkv_bias', True)),
      ('num_channels', config.get('num_channels', 3) == 3)) if not ok]
  if problems:
    raise ValueError(f'Unsupported Hugging Face ViT config: '
                     f'{", ".join(problems)}.')
  head = 'ViTForImageClassification' in (config.get('architectures') or [])
  size = config.get('image_size', 224)
  patch = config.get('patch_size', 16)
  as_pair = lambda v: tuple(v) if isinstance(v, (list, tuple)) else (v, v)
  return ({'hidden_size': config['hidden_size'],
           'num_layers': config['num_hidden_layers'],
           'num_heads': config['num_attention_heads'],
           'mlp_dim': config['intermediate_size'],
           'patch_size': as_pair(patch), 'classifier': 'token',
           'activation': 'gelu' if act == 'gelu' else 'gelu_tanh',
           'num_classes': len(config.get('id2label') or {}) if head else 0},
          as_pair(size))


def label_names(config: Mapping[str, Any]) -> list[str] | None:
  """id2label in index order; None for transformers' LABEL_i placeholders."""
  id2label = config.get('id2label') or {}
  names = [id2label[k] for k in sorted(id2label, key=int)]
  if not names or all(n == f'LABEL_{i}' for i, n in enumerate(names)):
    return None
  return names


_RESAMPLE = {'pil_bilinear': 2, 'bilinear': 2, 'pil_bicubic': 3}


def preprocessor_config(preprocessing: images.Preprocessing,
                        image_size: tuple[int, int]) -> dict[str, Any]:
  """ViTImageProcessor's file. It resizes straight to the size (no crop)
  with Pillow's filters: our 'resize' maps onto it; a 'resize_crop'
  protocol and TF-arithmetic 'bilinear' are approximated (the card keeps
  ours)."""
  return {'image_processor_type': 'ViTImageProcessor', 'do_resize': True,
          'size': {'height': image_size[0], 'width': image_size[1]},
          'resample': _RESAMPLE[preprocessing.interpolation],
          'do_rescale': True, 'rescale_factor': 1 / 255,
          'do_normalize': True, 'image_mean': list(preprocessing.mean),
          'image_std': list(preprocessing.std)}


def preprocessing_from(config: Mapping[str, Any] | None,
                       image_size: tuple[int, int]) -> images.Preprocessing:
  """Our eval preprocessing of a preprocessor_config.json (None: the
  ViTImageProcessor defaults: bilinear, mean and std 0.5)."""
  config = config or {}
  return images.Preprocessing(
      resize='resize',
      interpolation='pil_bicubic' if config.get('resample') == 3
      else 'pil_bilinear',
      mean=tuple(config.get('image_mean', (0.5, 0.5, 0.5))),
      std=tuple(config.get('image_std', (0.5, 0.5, 0.5))))
