"""Vision Transformer (arXiv 2010.11929) in Flax linen.

Parameter names follow Google's linen checkpoints (`embedding`, `cls`,
`Transformer/posembed_input/pos_embedding`, `Transformer/encoderblock_{i}/...`,
`Transformer/encoder_norm`, `pre_logits`, `head`), so official `.npz` files map
1:1. With `scan_layers=True` the blocks live in one stacked
`Transformer/encoderblock` (leading layer axis, big_vision's layout);
`stack_encoder_blocks` / `unstack_encoder_blocks` convert between the two.
"""
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import layers
from vit_jax.models import masked
from vit_jax.models import matmul
from vit_jax.models import resnet
from vit_jax.parallel import mesh as mesh_lib

Dtype = Any
CLASSIFIERS = ('token', 'gap', 'map', 'unpooled', 'token_unpooled')
ATTENTION_IMPLS = ('xla', 'cudnn')
REMAT_POLICIES = {
    'none': None,  # no rematerialisation
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _check_choice(field: str, value: Any, allowed) -> None:
  if value not in allowed:
    raise ValueError(f'{field}={value!r} is not supported; allowed: '
                     f'{", ".join(map(repr, allowed))}.')


def _check_sizes(model: 'VisionTransformer') -> None:
  """Sizes and rates in range, one line naming the first that is not."""
  def is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)
  positive = {'hidden_size': model.hidden_size, 'num_layers': model.num_layers,
              'num_heads': model.num_heads, 'mlp_dim': model.mlp_dim,
              'resnet_width': model.resnet_width}
  patch = model.patch_size
  if not (isinstance(patch, tuple) and len(patch) == 2):
    raise ValueError(f'patch_size={patch!r} must be an int or (height, width).')
  positive.update({'patch_size': patch[0], 'patch_size ': patch[1]})
  if model.representation_size is not None:
    positive['representation_size'] = model.representation_size
  for field, value in positive.items():
    if not is_int(value) or value < 1:
      raise ValueError(f'{field.strip()}={value!r} must be a positive integer.')
  if not is_int(model.num_classes) or model.num_classes < 0:
    raise ValueError(f'num_classes={model.num_classes!r} must be a positive '
                     'integer (or 0 for a model without a head, which '
                     'returns features).')
  if model.resnet_layers is not None and any(
      not is_int(n) or n < 1 for n in model.resnet_layers):
    raise ValueError(f'resnet_layers={model.resnet_layers!r} must be positive '
                     'integers (units per stage), or None for no ResNet stem.')
  if not is_int(model.num_registers) or model.num_registers < 0:
    raise ValueError(f'num_registers={model.num_registers!r} must be an '
                     'integer >= 0.')
  if model.activation not in layers.ACTIVATIONS:
    raise ValueError(f'activation={model.activation!r} is not supported; '
                     f'allowed: {", ".join(layers.ACTIVATIONS)}.')
  if model.fc_norm and model.classifier not in ('gap', 'map'):
    raise ValueError(f"fc_norm normalises pooled features: it needs classifier "
                     f"'gap' or 'map', not {model.classifier!r}.")
  for field in ('dropout_rate', 'attention_dropout_rate', 'stochastic_depth'):
    value = getattr(model, field)
    if not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise ValueError(f'{field}={value!r} must be in [0, 1).')


class AddPositionEmbs(nn.Module):
  """Learned position embedding (1, tokens, D), initialised N(0, 0.02^2).

  The first `skip` tokens (class, registers) get none when the embedding
  covers only the patches (timm's `no_embed_class`: DeiT III, registers).
  """
  skip: int = 0
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    prefix, x = x[:, :self.skip], x[:, self.skip:]
    shape = (1, *x.shape[1:])
    if self.has_variable('params', 'pos_embedding'):
      stored = self.get_variable('params', 'pos_embedding').shape
      if stored != shape:
        raise ValueError(
            f'The position embedding has shape {stored} but this input gives '
            f'{shape[1]} tokens ({shape}). Use the resolution the parameters '
            'were made for, or resize them with '
            'vit_jax.checkpoint.load_pretrained / interpolate_posemb.')
    pe = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                    shape, self.param_dtype)
    return jnp.concatenate([prefix, x + pe.astype(x.dtype)], axis=1)


class Encoder(nn.Module):
  """Position embedding, `num_layers` blocks (unrolled or scanned), final LN."""
  num_layers: int
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  layerscale: float | None = None
  activation: str = 'gelu_tanh'
  posemb_skip: int = 0  # leading tokens without a position embedding
  final_norm: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    x = AddPositionEmbs(self.posemb_skip, self.param_dtype,
                        name='posembed_input')(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    block_cls = layers.Encoder1DBlock
    if self.remat_policy != 'none':
      # static_argnums counts self: (self, x, drop_path_rate, deterministic).
      block_cls = nn.remat(block_cls, static_argnums=(3,),
                           policy=REMAT_POLICIES[self.remat_policy])
    block_kwargs = dict(
        mlp_dim=self.mlp_dim, num_heads=self.num_heads,
        dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        attention_impl=self.attention_impl,
        drop_path=self.stochastic_depth > 0, layerscale=self.layerscale,
        activation=self.activation, dtype=self.dtype,
        param_dtype=self.param_dtype)
    # Stochastic depth grows linearly with depth, 0 at the first block.
    rates = [self.stochastic_depth * i / max(self.num_layers - 1, 1)
             for i in range(self.num_layers)]
    # Activations stay split over the batch on a (data, fsdp) mesh.
    x = mesh_lib.constrain_to_batch(x)
    if self.scan_layers:
      body = lambda block, carry, rate: (mesh_lib.constrain_to_batch(
          block(carry, rate, not train)), None)
      scan = nn.scan(body, variable_axes={'params': 0, 'intermediates': 0},
                     split_rngs={'params': True, 'dropout': True},
                     length=self.num_layers)
      x, _ = scan(block_cls(**block_kwargs, name='encoderblock'), x,
                  jnp.asarray(rates, jnp.float32))
    else:
      for i, rate in enumerate(rates):
        x = mesh_lib.constrain_to_batch(block_cls(
            **block_kwargs, name=f'encoderblock_{i}')(x, rate, not train))
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='encoder_norm')(x)


class VisionTransformer(nn.Module):
  """ViT: patches -> [class token, registers] -> encoder -> pooling ->
  [pre-logits] -> head.

  Call as `model.apply(variables, images, train=False)` with NHWC images in
  [-1, 1]. Height and width must be divisible by the patch size (times the
  ResNet stem's stride for hybrids). `num_classes=0` drops the head and
  returns features.

  Options of timm's ViT families, off by default (today's models and
  checkpoints unchanged): `num_registers` register tokens (`reg`, after the
  class token); `posemb_prefix=False`: the position embedding covers only
  the patches (timm's no_embed_class); `layerscale` (initial value): each
  residual branch scaled per channel (`LayerScale_{0,1}/scale`, DeiT III);
  `classifier='map'`: attention pooling (`MAPHead_0`, big_vision's names);
  `fc_norm`: pooled features normalised (`fc_norm`) instead of the tokens
  (`Transformer/encoder_norm`), as timm's average pooling; `activation`
  'gelu' (exact) for timm's and Hugging Face's weights instead of Google's
  'gelu_tanh'.

  `patch_corruption=(kind, source)` (masked patch prediction,
  `masked.MaskedPatchModel`) corrupts the patch embeddings before the
  encoder (a `mask_token` parameter) and returns the encoded patch tokens
  instead of the pooled head's output.
  """
  num_classes: int
  patch_size: tuple[int, int]
  hidden_size: int
  num_layers: int
  num_heads: int
  mlp_dim: int
  resnet_layers: tuple[int, ...] | None = None  # None: no ResNet stem
  resnet_width: int = 1
  classifier: str = 'token'
  num_registers: int = 0
  posemb_prefix: bool = True
  layerscale: float | None = None
  fc_norm: bool = False
  activation: str = 'gelu_tanh'  # or 'gelu' (exact): layers.ACTIVATIONS
  representation_size: int | None = None
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  stochastic_depth: float = 0.0
  head_bias_init: float = 0.0
  attention_impl: str = 'xla'
  remat_policy: str = 'none'
  scan_layers: bool = False
  dtype: Dtype = jnp.float32  # compute
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    _check_choice('classifier', self.classifier, CLASSIFIERS)
    _check_choice('attention_impl', self.attention_impl, ATTENTION_IMPLS)
    _check_choice('remat_policy', self.remat_policy, tuple(REMAT_POLICIES))
    _check_sizes(self)
    if self.hidden_size % self.num_heads:
      raise ValueError(f'hidden_size={self.hidden_size} is not divisible by '
                       f'num_heads={self.num_heads}.')
    super().__post_init__()

  @property
  def num_prefix_tokens(self) -> int:
    """Tokens before the patches: the class token (if any) and registers."""
    return (int(self.classifier in ('token', 'token_unpooled'))
            + self.num_registers)

  @property
  def posemb_prefix_tokens(self) -> int:
    """Position-embedding slots before the patch grid's."""
    return self.num_prefix_tokens if self.posemb_prefix else 0

  @property
  def input_stride(self) -> tuple[int, int]:
    """Pixels per token along (height, width)."""
    stem = (1 if self.resnet_layers is None
            else resnet.stem_stride(self.resnet_layers))
    return (stem * self.patch_size[0], stem * self.patch_size[1])

  def token_grid(self, image_size: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of patch tokens the model makes of `image_size`."""
    stride = self.input_stride
    return image_size[0] // stride[0], image_size[1] // stride[1]

  def check_input_shape(self, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `shape` is a valid (batch, H, W, 3) input."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f'Expected images of shape (batch, height, width, 3) '
                       f'(NHWC, RGB), got shape {tuple(shape)}.')
    size, stride = tuple(shape[1:3]), self.input_stride
    if size[0] % stride[0] or size[1] % stride[1]:
      raise ValueError(
          f'Image size {size[0]}x{size[1]} is not divisible by the model\'s '
          f'{stride[0]}x{stride[1]} pixels per token (patch size '
          f'{self.patch_size}); use a multiple, e.g. '
          f'{stride[0] * max(size[0] // stride[0], 1)}x'
          f'{stride[1] * max(size[1] // stride[1], 1)}.')

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False,
               patch_corruption: tuple[jax.Array, jax.Array] | None = None
               ) -> jax.Array:
    self.check_input_shape(images.shape)
    x = images.astype(self.dtype)
    if self.resnet_layers is not None:
      x = resnet.resnet_stem(x, self.resnet_layers, self.resnet_width,
                             self.dtype, self.param_dtype)
    x = nn.Conv(self.hidden_size, self.patch_size, strides=self.patch_size,
                padding='VALID', dtype=self.dtype, param_dtype=self.param_dtype,
                name='embedding')(x)
    batch, h, w, c = x.shape
    x = x.reshape(batch, h * w, c)
    if patch_corruption is not None:
      x = masked.corrupt_patches(x, *patch_corruption, self.param(
          masked.MASK_TOKEN, nn.initializers.normal(stddev=0.02), (1, 1, c),
          self.param_dtype))
    prefix = []
    if self.classifier in ('token', 'token_unpooled'):
      prefix.append(self.param('cls', nn.initializers.zeros, (1, 1, c),
                               self.param_dtype))
    if self.num_registers:
      prefix.append(self.param('reg', nn.initializers.normal(1e-6),
                               (1, self.num_registers, c), self.param_dtype))
    if prefix:
      x = jnp.concatenate([jnp.tile(p.astype(x.dtype), (batch, 1, 1))
                           for p in prefix] + [x], 1)
    x = Encoder(
        num_layers=self.num_layers, mlp_dim=self.mlp_dim,
        num_heads=self.num_heads, dropout_rate=self.dropout_rate,
        attention_dropout_rate=self.attention_dropout_rate,
        stochastic_depth=self.stochastic_depth,
        attention_impl=self.attention_impl, remat_policy=self.remat_policy,
        scan_layers=self.scan_layers, layerscale=self.layerscale,
        activation=self.activation,
        posemb_skip=self.num_prefix_tokens - self.posemb_prefix_tokens,
        final_norm=not self.fc_norm, dtype=self.dtype,
        param_dtype=self.param_dtype, name='Transformer')(x, train=train)
    patches = x[:, self.num_prefix_tokens:]
    if patch_corruption is not None:
      return patches
    if self.classifier == 'token':
      x = x[:, 0]
    elif self.classifier == 'gap':
      x = jnp.mean(patches, axis=1)
    elif self.classifier == 'map':
      x = layers.MAPHead(self.num_heads, self.mlp_dim, self.activation,
                         self.dtype, self.param_dtype,
                         attention_impl=self.attention_impl,
                         name='MAPHead_0')(x)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='fc_norm')(x)
    if self.representation_size is not None:
      x = jnp.tanh(matmul.Dense(self.representation_size, dtype=self.dtype,
                                param_dtype=self.param_dtype,
                                name='pre_logits')(x))
    if self.num_classes:
      x = layers.classifier_head(self.num_classes, self.head_bias_init,
                                 self.dtype, self.param_dtype)(x)
    # Logits leave in float32 whatever the compute dtype: losses need range.
    return x.astype(jnp.float32)


_BLOCK = 'encoderblock'


def stack_encoder_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
  """Unrolled `encoderblock_{i}` params -> scanned `encoderblock` (layer axis 0)."""
  encoder = dict(params['Transformer'])
  names = sorted((k for k in encoder if k.startswith(_BLOCK + '_')),
                 key=lambda k: int(k.rsplit('_', 1)[1]))
  if not names:
    raise ValueError('No Transformer/encoderblock_{i} params to stack; are '
                     'these already in the scanned layout?')
  blocks = [encoder.pop(k) for k in names]
  encoder[_BLOCK] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return {**params, 'Transformer': encoder}


def unstack_encoder_blocks(params: Mapping[str, Any]) -> dict[str, Any]:
  """Scanned `encoderblock` params (layer axis 0) -> `encoderblock_{i}`."""
  encoder = dict(params['Transformer'])
  if _BLOCK not in encoder:
    raise ValueError('No stacked Transformer/encoderblock params to unstack; '
                     'are these already in the unrolled layout?')
  stacked = encoder.pop(_BLOCK)
  num_layers = jax.tree.leaves(stacked)[0].shape[0]
  for i in range(num_layers):
    encoder[f'{_BLOCK}_{i}'] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return {**params, 'Transformer': encoder}
