"""Transformer encoder layers: attention, MLP, stochastic depth, the block.

Submodule names (`MultiHeadDotProductAttention_0/{query,key,value,out}`,
`MlpBlock_0/Dense_{0,1}`, `LayerNorm_{0,1}`) are those of Google's linen
checkpoints.
"""
import functools
from typing import Any
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import attention
from vit_jax.models import matmul
from vit_jax.parallel import mesh as mesh_lib

Dtype = Any


ACTIVATIONS = ('gelu_tanh', 'gelu')


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense -> dropout.

  'gelu_tanh' (the tanh approximation) by default: Google's checkpoints were
  trained with Flax's nn.gelu, whose default it is. 'gelu' (exact, erf) is
  timm's and Hugging Face's default, so their weights load exactly.
  """
  mlp_dim: int
  dropout_rate: float = 0.0
  activation: str = 'gelu_tanh'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
    dense = functools.partial(
        matmul.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6))
    y = nn.gelu(dense(self.mlp_dim, name='Dense_0')(x),
                approximate=self.activation == 'gelu_tanh')
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    y = dense(x.shape[-1], name='Dense_1')(y)
    return nn.Dropout(self.dropout_rate)(y, deterministic)


class MultiHeadDotProductAttention(nn.Module):
  """Self-attention with q/k/v kernels (D, heads, D/heads), out (heads, D/heads, D).

  `implementation='xla'` computes softmax(q k^T / sqrt(d)) v with a float32
  softmax and sows the attention weights (collection `intermediates`) for
  inspection; `'cudnn'` calls cuDNN's fused flash attention on token axes
  padded to lengths it accepts (`attention.padded_dot_product_attention`),
  or warns and uses 'xla' where cuDNN cannot serve the call.
  """
  num_heads: int
  dropout_rate: float = 0.0
  implementation: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _use_cudnn(self, q: jax.Array, k: jax.Array,
                 deterministic: bool) -> bool:
    """cuDNN for this call, or a warning naming the case and why not (at
    trace time, before anything compiles; `attention.py`)."""
    if self.implementation != 'cudnn':
      return False
    reason = attention.cudnn_unavailable_reason(
        q.shape, k.shape, self.dtype,
        dropout=self.dropout_rate > 0 and not deterministic)
    if reason:
      warnings.warn(
          f"attention implementation 'cudnn' unavailable for "
          f"{attention.describe(q.shape, k.shape, self.dtype)} ({reason}); "
          "using 'xla' attention instead.", stacklevel=3)
      return False
    return True

  @nn.compact
  def __call__(self, x: jax.Array, deterministic: bool,
               keys: jax.Array | None = None) -> jax.Array:
    """Self-attention of `x`, or `x` (queries) attending over `keys`."""
    keys = x if keys is None else keys
    features = x.shape[-1]
    head_dim = features // self.num_heads
    dense = functools.partial(
        matmul.Dense, dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=nn.initializers.xavier_uniform())
    q = dense((self.num_heads, head_dim), name='query')(x)
    k, v = (dense((self.num_heads, head_dim), name=n)(keys)
            for n in ('key', 'value'))  # [batch, tokens, heads, d]
    if self._use_cudnn(q, k, deterministic):
      # cuDNN's partitioner wants q, k, v split alike: the MAP head's probe
      # (tiled from a parameter) is not batch-split like its keys.
      q, k, v = (mesh_lib.constrain_to_batch(t) for t in (q, k, v))
      # Token counts padded to what cuDNN takes (197 -> 198), padding masked.
      y = attention.padded_dot_product_attention(q, k, v,
                                                 implementation='cudnn')
    else:
      # Head-major copies before the batched matmuls: XLA:CPU runs a [b, h]
      # batch over strided [b, tokens, h, d] views at about half speed
      # (BENCHMARKS.md). The same function either way.
      q = q / jnp.sqrt(head_dim).astype(self.dtype)
      q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))  # [b, h, tokens, d]
      logits = matmul.einsum('bhqd,bhkd->bhqk', q, k)
      weights = jax.nn.softmax(logits.astype(jnp.float32)).astype(self.dtype)
      self.sow('intermediates', 'attention_weights', weights)
      weights = nn.Dropout(self.dropout_rate)(weights, deterministic)
      y = jnp.swapaxes(matmul.einsum('bhqk,bhkd->bhqd', weights, v), 1, 2)
    return dense(features, axis=(-2, -1), name='out')(y)


def _drop_path(module: 'Encoder1DBlock', x: jax.Array, rate,
               deterministic: bool):
  """Stochastic depth: drops the whole residual branch per example.

  `rate` may be traced (under scan or remat), so whether drop path is on at
  all is the static `module.drop_path`: without it no dropout rng is needed.
  """
  if deterministic or not module.drop_path:
    return x
  keep = 1.0 - jnp.asarray(rate, jnp.float32)
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep,
                              (x.shape[0],) + (1,) * (x.ndim - 1))
  return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (CaiT, DeiT III): `scale` (D)."""
  init_value: float
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param('scale', nn.initializers.constant(self.init_value),
                       (x.shape[-1],), self.param_dtype)
    return x * scale.astype(x.dtype)


class MAPHead(nn.Module):
  """Multihead attention pooling (big_vision's MAPHead, timm's attn_pool):
  a learned `probe` attends over the tokens, then x + MLP(LN(x)).

  `attention_impl` 'cudnn': the 1-token probe is padded to 2 queries (and
  the keys to an even count) for cuDNN, as every attention here."""
  num_heads: int
  mlp_dim: int
  activation: str = 'gelu_tanh'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  attention_impl: str = 'xla'

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    batch, _, features = x.shape
    probe = self.param('probe', nn.initializers.xavier_uniform(),
                       (1, 1, features), self.param_dtype)
    probe = jnp.tile(probe.astype(self.dtype), (batch, 1, 1))
    y = MultiHeadDotProductAttention(
        self.num_heads, implementation=self.attention_impl, dtype=self.dtype,
        param_dtype=self.param_dtype,
        name='MultiHeadDotProductAttention_0')(probe, True, keys=x)
    norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype,
                        param_dtype=self.param_dtype, name='LayerNorm_0')
    y = y + MlpBlock(self.mlp_dim, activation=self.activation,
                     dtype=self.dtype, param_dtype=self.param_dtype,
                     name='MlpBlock_0')(
                         norm(y), True)
    return y[:, 0]


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block: x + MHA(LN(x)), then x + MLP(LN(x)); with
  `layerscale`, each branch scaled per channel first (LayerScale_{0,1})."""
  mlp_dim: int
  num_heads: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  attention_impl: str = 'xla'
  drop_path: bool = False  # stochastic depth on (its rate is an argument)
  layerscale: float | None = None  # LayerScale's initial value; None: off
  activation: str = 'gelu_tanh'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, drop_path_rate, deterministic: bool):
    norm = functools.partial(nn.LayerNorm, epsilon=1e-6, dtype=self.dtype,
                             param_dtype=self.param_dtype)
    y = norm(name='LayerNorm_0')(x)
    y = MultiHeadDotProductAttention(
        self.num_heads, self.attention_dropout_rate, self.attention_impl,
        self.dtype, self.param_dtype, name='MultiHeadDotProductAttention_0')(
            y, deterministic)
    y = nn.Dropout(self.dropout_rate)(y, deterministic)
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, self.param_dtype, name='LayerScale_0')(y)
    x = x + _drop_path(self, y, drop_path_rate, deterministic)
    y = norm(name='LayerNorm_1')(x)
    y = MlpBlock(self.mlp_dim, self.dropout_rate, self.activation,
                 self.dtype, self.param_dtype, name='MlpBlock_0')(
                     y, deterministic)
    if self.layerscale is not None:
      y = LayerScale(self.layerscale, self.param_dtype, name='LayerScale_1')(y)
    return x + _drop_path(self, y, drop_path_rate, deterministic)


def classifier_head(num_classes: int, bias_init: float, dtype: Dtype,
                    param_dtype: Dtype) -> matmul.Dense:
  """The zero-initialised `head` (Google's name) of every model: a new task
  starts from uniform predictions."""
  return matmul.Dense(num_classes, dtype=dtype, param_dtype=param_dtype,
                      name='head', kernel_init=nn.initializers.zeros,
                      bias_init=nn.initializers.constant(bias_init))
