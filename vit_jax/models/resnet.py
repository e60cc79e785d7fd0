"""ResNets of weight-standardised convolutions and GroupNorm ("Big Transfer",
arXiv 1912.11370), in the two conventions Google's published weights use.

`HYBRID`: the stem of the hybrid ViTs (R50+ViT-B_16, ...), Google's
vision_transformer: post-activation bottlenecks (ResNet v1.5, ReLU after the
sum, GroupNorm on every branch), 'SAME' padding, kernels standardised with
eps added to the std, GroupNorm eps 1e-6.
`BIT`: the BiT ResNet-v2 models (`models.bit`), BiT's published code and
`.npz` files: pre-activation bottlenecks (GroupNorm + ReLU before each conv,
the projection taken from the pre-activated input, nothing after the sum),
explicit symmetric padding (zeros before the stem's max-pool), kernels
standardised with eps 1e-10 inside the square root, GroupNorm eps 1e-5.

Module names are shared (`conv_root`, `gn_root`, `block{s}/unit{u}/conv1..3,
gn1..3, conv_proj, gn_proj`; BiT has no `gn_root` or `gn_proj`): those of
Google's hybrid checkpoints. BiT's own file layout is converted on load
(`checkpoint.layout`).
"""
from collections.abc import Sequence
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


@dataclasses.dataclass(frozen=True)
class Style:
  """What differs between the two families of published ResNet weights."""
  preactivation: bool
  weight_eps: float  # of the kernel standardisation
  eps_in_sqrt: bool  # w / sqrt(var + eps) (BiT) or w / (std + eps)
  norm_eps: float  # GroupNorm's
  explicit_padding: bool  # symmetric pads (BiT, TF's) instead of 'SAME'


HYBRID = Style(preactivation=False, weight_eps=1e-5, eps_in_sqrt=False,
               norm_eps=1e-6, explicit_padding=False)
BIT = Style(preactivation=True, weight_eps=1e-10, eps_in_sqrt=True,
            norm_eps=1e-5, explicit_padding=True)


def standardize_weight(kernel: jax.Array, style: Style = HYBRID) -> jax.Array:
  """Zero mean, unit variance per output channel, eps as `style` adds it."""
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  var = jnp.var(kernel, axis=(0, 1, 2), keepdims=True)
  if style.eps_in_sqrt:
    return kernel * jax.lax.rsqrt(var + style.weight_eps)
  return kernel / (jnp.sqrt(var) + style.weight_eps)


class StdConv(nn.Module):
  """Bias-free 2D convolution with a weight-standardised kernel."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  style: Style = HYBRID
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    # Standardise in the parameter dtype: bf16 statistics would be too coarse.
    kernel = standardize_weight(kernel, self.style).astype(self.dtype)
    padding = ([(k // 2, (k - 1) // 2) for k in self.kernel_size]
               if self.style.explicit_padding else 'SAME')
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=self.strides,
        padding=padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def group_norm(style: Style, dtype: Dtype, name: str, **kwargs) -> nn.Module:
  return nn.GroupNorm(num_groups=32, epsilon=style.norm_eps, dtype=dtype,
                      name=name, **kwargs)


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (4x wider)."""
  features: int
  strides: tuple[int, int] = (1, 1)
  style: Style = HYBRID
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, name: StdConv(f, k, s, self.style, self.dtype,
                                         self.param_dtype, name=name)
    norm = lambda name, **kw: group_norm(self.style, self.dtype, name, **kw)
    out_features = self.features * 4
    needs_projection = (x.shape[-1] != out_features
                        or self.strides != (1, 1))
    if self.style.preactivation:
      residual = x
      x = nn.relu(norm('gn1')(x))
      if needs_projection:  # from the normalised input, as BiT
        residual = conv(out_features, (1, 1), self.strides, 'conv_proj')(x)
      y = conv(self.features, (1, 1), (1, 1), 'conv1')(x)
      y = conv(self.features, (3, 3), self.strides,
               'conv2')(nn.relu(norm('gn2')(y)))
      y = conv(out_features, (1, 1), (1, 1), 'conv3')(nn.relu(norm('gn3')(y)))
      return residual + y
    residual = x
    if needs_projection:
      residual = conv(out_features, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides,
                                 'conv2')(y)))
    y = conv(out_features, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialised last scale: each unit starts as the identity (BiT).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` residual units, the first one strided."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  style: Style = HYBRID
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = ResidualUnit(self.features, self.first_stride if i == 0 else (1, 1),
                       self.style, self.dtype, self.param_dtype,
                       name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x: jax.Array, num_layers: Sequence[int], width_factor: int,
                dtype: Dtype, param_dtype: Dtype,
                style: Style = HYBRID) -> jax.Array:
  """Root conv + max-pool (4x down), then stages that each halve the size.

  Called from inside the parent's compact method, so the submodules land at
  the top level of its parameter tree, where Google's hybrids keep them.
  """
  width = int(64 * width_factor)
  x = StdConv(width, (7, 7), (2, 2), style, dtype, param_dtype,
              name='conv_root')(x)
  if style.preactivation:
    # BiT pads with zeros, then pools without padding: the root's output is
    # not rectified, so this differs from a -inf ('SAME') pad.
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='VALID')
  else:
    x = nn.relu(group_norm(style, dtype, 'gn_root')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**i, (1, 1) if i == 0 else (2, 2),
                    style, dtype, param_dtype, name=f'block{i + 1}')(x)
  return x


def stem_stride(num_layers: Sequence[int]) -> int:
  """Total down-sampling of `resnet_stem`: 4 for the root, 2 per later stage."""
  return 4 * 2**max(len(num_layers) - 1, 0)
