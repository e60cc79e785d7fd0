"""BiT ResNet-v2 (arXiv 1912.11370), the paper's convolutional baselines.

The same ResNet code as the hybrids' stem (`models.resnet`) in BiT's
pre-activation style, then GroupNorm + ReLU, global average pooling and a
zero-initialised `head`. `BiT-R50x1` ... `BiT-R152x4` in the registry have
the parameter counts of BiT's published models (and of timm's
`resnetv2_*_bit`). Its interface is VisionTransformer's where the trainer and
tools use it (`train=`, `num_classes=0` returns the pooled features,
`check_input_shape`, `token_grid`), so both train, fine-tune, export and
evaluate the same way.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import layers
from vit_jax.models import resnet

Dtype = Any


class BiT(nn.Module):
  """ResNet-v2: root -> stages -> norm_pre_head + ReLU -> mean -> head.

  Call as `model.apply(variables, images, train=False)` with NHWC images in
  [-1, 1] of any size (at least 32x32: the output stride).
  """
  num_classes: int
  resnet_layers: tuple[int, ...]
  resnet_width: int = 1
  head_bias_init: float = 0.0
  dtype: Dtype = jnp.float32  # compute
  param_dtype: Dtype = jnp.float32

  def __post_init__(self):
    layers = self.resnet_layers
    if (not isinstance(layers, tuple) or not layers
        or any(not isinstance(n, int) or n < 1 for n in layers)):
      raise ValueError(f'resnet_layers={layers!r} must be a non-empty tuple '
                       'of positive integers (units per stage).')
    if not isinstance(self.resnet_width, int) or self.resnet_width < 1:
      raise ValueError(f'resnet_width={self.resnet_width!r} must be a '
                       'positive integer.')
    if not isinstance(self.num_classes, int) or self.num_classes < 0:
      raise ValueError(f'num_classes={self.num_classes!r} must be a positive '
                       'integer (or 0 for a model without a head, which '
                       'returns features).')
    super().__post_init__()

  # What the tools ask of every model: no tokens, no position embedding.
  posemb_prefix_tokens = 0
  num_prefix_tokens = 0

  @property
  def input_stride(self) -> tuple[int, int]:
    """Output stride: pixels per cell of the last feature map."""
    stride = resnet.stem_stride(self.resnet_layers)
    return stride, stride

  def token_grid(self, image_size: Sequence[int]) -> tuple[int, int]:
    """(rows, columns) of the last feature map (nothing is resized by it)."""
    stride = self.input_stride
    return -(-image_size[0] // stride[0]), -(-image_size[1] // stride[1])

  def check_input_shape(self, shape: tuple[int, ...]) -> None:
    """Raises ValueError unless `shape` is a valid (batch, H, W, 3) input."""
    if len(shape) != 4 or shape[-1] != 3:
      raise ValueError(f'Expected images of shape (batch, height, width, 3) '
                       f'(NHWC, RGB), got shape {tuple(shape)}.')
    if min(shape[1:3]) < self.input_stride[0]:
      raise ValueError(f'Image size {shape[1]}x{shape[2]} is smaller than '
                       f'the ResNet\'s output stride {self.input_stride[0]}; '
                       'use larger images.')

  @nn.compact
  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    del train  # no dropout in BiT
    self.check_input_shape(images.shape)
    x = resnet.resnet_stem(images.astype(self.dtype), self.resnet_layers,
                           self.resnet_width, self.dtype, self.param_dtype,
                           style=resnet.BIT)
    x = nn.relu(resnet.group_norm(resnet.BIT, self.dtype, 'norm_pre_head')(x))
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = layers.classifier_head(self.num_classes, self.head_bias_init,
                                 self.dtype, self.param_dtype)(x)
    # Logits leave in float32 whatever the compute dtype: losses need range.
    return x.astype(jnp.float32)
