"""BiT-style ResNet stem of the hybrid models (R50+ViT-B_16 and friends).

Weight-standardised convolutions followed by GroupNorm, as in "Big Transfer"
(arXiv 1912.11370). Module names (`conv_root`, `gn_root`, `block{s}/unit{u}/
conv1..3, gn1..3, conv_proj, gn_proj`) are those of Google's checkpoints.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any


def standardize_weight(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
  """Zero mean, unit std per output channel; eps added to the std (as BiT)."""
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2), keepdims=True)
  return kernel / (jnp.std(kernel, axis=(0, 1, 2), keepdims=True) + eps)


class StdConv(nn.Module):
  """Bias-free 2D convolution with a weight-standardised kernel."""
  features: int
  kernel_size: tuple[int, int]
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(),
                        (*self.kernel_size, x.shape[-1], self.features),
                        self.param_dtype)
    # Standardise in the parameter dtype: bf16 statistics would be too coarse.
    kernel = standardize_weight(kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, window_strides=self.strides,
        padding='SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class ResidualUnit(nn.Module):
  """Bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1 (4x wider), pre-sum GN."""
  features: int
  strides: tuple[int, int] = (1, 1)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = lambda f, k, s, name: StdConv(f, k, s, self.dtype, self.param_dtype,
                                         name=name)
    norm = lambda name, **kw: nn.GroupNorm(dtype=self.dtype, name=name, **kw)
    out_features = self.features * 4
    residual = x
    if x.shape[-1] != out_features or self.strides != (1, 1):
      residual = conv(out_features, (1, 1), self.strides, 'conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = nn.relu(norm('gn1')(conv(self.features, (1, 1), (1, 1), 'conv1')(x)))
    y = nn.relu(norm('gn2')(conv(self.features, (3, 3), self.strides, 'conv2')(y)))
    y = conv(out_features, (1, 1), (1, 1), 'conv3')(y)
    # Zero-initialised last scale: each unit starts as the identity (BiT).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    return nn.relu(residual + y)


class ResNetStage(nn.Module):
  """`block_size` residual units, the first one strided."""
  block_size: int
  features: int
  first_stride: tuple[int, int]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.block_size):
      x = ResidualUnit(self.features, self.first_stride if i == 0 else (1, 1),
                       self.dtype, self.param_dtype, name=f'unit{i + 1}')(x)
    return x


def resnet_stem(x: jax.Array, num_layers: Sequence[int], width_factor: int,
                dtype: Dtype, param_dtype: Dtype) -> jax.Array:
  """Root conv + max-pool (4x down), then stages that each halve the size.

  Called from inside the parent's compact method, so the submodules land at
  the top level of its parameter tree, where Google's hybrids keep them.
  """
  width = int(64 * width_factor)
  x = StdConv(width, (7, 7), (2, 2), dtype, param_dtype, name='conv_root')(x)
  x = nn.relu(nn.GroupNorm(dtype=dtype, name='gn_root')(x))
  x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
  for i, block_size in enumerate(num_layers):
    x = ResNetStage(block_size, width * 2**i, (1, 1) if i == 0 else (2, 2),
                    dtype, param_dtype, name=f'block{i + 1}')(x)
  return x


def stem_stride(num_layers: Sequence[int]) -> int:
  """Total down-sampling of `resnet_stem`: 4 for the root, 2 per later stage."""
  return 4 * 2**max(len(num_layers) - 1, 0)
