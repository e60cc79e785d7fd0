"""cuDNN flash attention for every token count of the zoo.

JAX's cuDNN attention (`jax.nn.dot_product_attention(implementation='cudnn')`)
refuses, once differentiated, any query or key length that is odd:
`check_is_flash_attention` demands even lengths "with bias", and
`fused_attention_stablehlo.dot_product_attention` always passes a bias (an
empty placeholder replaces None before the check), so a ViT-B/16 at 224 px
(196 patches + class token = 197 tokens) raises NotImplementedError while 196
tokens compile. JAX 0.10.2 and 0.12.0.1 share the rule.

`padded_dot_product_attention` pads the token axes to even lengths and masks
the padding with `query_seq_lengths` / `key_value_seq_lengths` (cuDNN's
PADDING mask: no bias tensor, so no dbias in the backward pass), then slices
the queries back. Padded keys get probability exactly 0 and padded queries
are dropped, so the result is the unpadded attention: with
implementation='xla' this runs on the CPU and tests compare it with plain
attention, forward and gradient.

`cudnn_unavailable_reason` says, before anything is compiled, why cuDNN cannot
serve an attention call (the caller warns and uses XLA's attention). It asks
about the devices the program is compiled for, not `jax.default_backend()`:
the train, eval and plan steps trace under their mesh (`parallel.mesh.on_mesh`),
whose abstract device is the GPU even when this process's backend is the CPU
(compiling for a GPU topology without a GPU).
"""
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.parallel import mesh as mesh_lib

Dtype = Any

# Token axes are padded to a multiple of this: what cuDNN's training path
# accepts (see above). A larger multiple only adds masked work.
SEQ_MULTIPLE = 2
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Platform names of devices that can run cuDNN (`Device.platform`, topology
# devices' and AbstractDevice's alike).
_GPU_PLATFORMS = ('gpu', 'cuda')


def padded_length(n: int, multiple: int = SEQ_MULTIPLE) -> int:
  """`n` rounded up to a multiple of `multiple`."""
  return -(-n // multiple) * multiple


def _pad_tokens(x: jax.Array, length: int) -> jax.Array:
  """[batch, tokens, heads, d] zero-padded to `length` tokens."""
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))


def padded_dot_product_attention(
    query: jax.Array, key: jax.Array, value: jax.Array, *,
    implementation: str = 'cudnn',
    multiple: int = SEQ_MULTIPLE) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v over [batch, tokens, heads, d] inputs.

  Query and key/value token axes are padded to multiples of `multiple`, the
  padded keys masked out (key_value_seq_lengths) and the padded query rows
  sliced off, so any lengths reach cuDNN as lengths it accepts. Inputs that
  need no padding go through unchanged. `implementation` is that of
  `jax.nn.dot_product_attention` ('xla' runs anywhere and serves the tests).
  """
  batch, q_len = query.shape[:2]
  kv_len = key.shape[1]
  q_pad, kv_pad = padded_length(q_len, multiple), padded_length(kv_len, multiple)
  if (q_pad, kv_pad) == (q_len, kv_len):
    return jax.nn.dot_product_attention(query, key, value,
                                        implementation=implementation)
  # Both lengths are given: JAX fills a missing one with the padded length,
  # which would let padded keys in. Split over the batch like q under a
  # mesh, so each device's cuDNN call gets its own batch's lengths (not the
  # global array).
  lengths = lambda n: mesh_lib.constrain_to_batch(
      jnp.full((batch,), n, jnp.int32))
  y = jax.nn.dot_product_attention(
      _pad_tokens(query, q_pad), _pad_tokens(key, kv_pad),
      _pad_tokens(value, kv_pad), query_seq_lengths=lengths(q_len),
      key_value_seq_lengths=lengths(kv_len), implementation=implementation)
  return y[:, :q_len]


def compile_target() -> tuple[str, str | None]:
  """(platform, device kind) of the devices the traced program is for.

  Under a mesh (`jax.sharding.use_abstract_mesh` / `jax.set_mesh`, as the
  train, eval and plan steps set it) the mesh's device decides, so a GPU
  topology compiled from a CPU-only process counts as a GPU; without one the
  default backend runs the program.
  """
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, 'abstract_device', None)
  if device is not None:
    return device.platform, device.device_kind
  backend = jax.default_backend()
  return backend, (jax.devices()[0].device_kind if backend in _GPU_PLATFORMS
                   else None)


def _cudnn_version() -> int | None:
  """cuDNN's version as JAX reads it (e.g. 91000), None without the CUDA
  plugin (jax_cuda12_plugin): then JAX raises 'cuDNN is not detected'."""
  try:
    from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  if cuda_versions is None:
    return None
  try:
    return int(cuda_versions.cudnn_get_version())
  except Exception:  # pylint: disable=broad-except
    return None


def _jax_flash_check(q_shape: Sequence[int], kv_shape: Sequence[int],
                     cudnn_version: int) -> str | None:
  """JAX's own flash-attention check on the shapes it will see, as training
  runs it (bias flag set, as JAX always sets it): its message, or None.

  Private API: if this JAX has none of that name or signature, only our own
  checks speak (`cudnn_unavailable_reason`).
  """
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
    check = fa.check_is_flash_attention
    layout = fa.AttentionLayout.BTNH.value
  except (ImportError, AttributeError):
    return None
  shape = lambda s: jax.ShapeDtypeStruct(tuple(s), jnp.bfloat16)
  try:
    check(shape(q_shape), shape(kv_shape), shape(kv_shape), layout,
          cudnn_version, True, True)
  except NotImplementedError as e:
    return str(e)
  except TypeError:  # another signature
    return None
  return None


def describe(q_shape: Sequence[int], kv_shape: Sequence[int],
             dtype: Dtype) -> str:
  """The attention case in words, for warnings."""
  batch, q_len, heads, head_dim = q_shape
  kv = (f'over {kv_shape[1]} tokens' if kv_shape[1] != q_len
        else 'self-attention')
  return (f'{q_len} queries {kv}, {heads} heads of {head_dim}, batch {batch}, '
          f'{np.dtype(dtype).name}')


def cudnn_unavailable_reason(q_shape: Sequence[int], kv_shape: Sequence[int],
                             dtype: Dtype, dropout: bool = False,
                             multiple: int = SEQ_MULTIPLE) -> str | None:
  """Why `padded_dot_product_attention(implementation='cudnn')` cannot serve
  [batch, tokens, heads, d] queries `q_shape` over keys `kv_shape` on the
  devices being compiled for, or None when it can. Nothing raises later.
  """
  platform, device_kind = compile_target()
  if platform not in _GPU_PLATFORMS:
    return f'the {platform!r} backend has no cuDNN'
  if jnp.dtype(dtype) not in [jnp.dtype(d) for d in CUDNN_DTYPES]:
    return (f'cuDNN flash attention needs bfloat16/float16, not '
            f'{np.dtype(dtype).name}')
  if dropout:
    return 'cuDNN flash attention has no attention dropout'
  version = _cudnn_version()
  if version is None:
    return (f'no cuDNN for {device_kind or platform}: JAX\'s CUDA plugin '
            '(jax[cuda12]) is not installed')
  if jax.default_backend() in _GPU_PLATFORMS:
    # A GPU in this process: cuDNN flash attention needs Ampere or later.
    capability = getattr(jax.devices()[0], 'compute_capability', None)
    if capability and tuple(map(int, capability.split('.'))) < (8, 0):
      return (f'cuDNN flash attention needs compute capability 8.0+, '
              f'{device_kind} has {capability}')
  head_dim = q_shape[-1]
  if head_dim % 8:
    return f'head dim {head_dim} is not a multiple of 8'
  q_pad = (*q_shape[:1], padded_length(q_shape[1], multiple), *q_shape[2:])
  kv_pad = (*kv_shape[:1], padded_length(kv_shape[1], multiple),
            *kv_shape[2:])
  return _jax_flash_check(q_pad, kv_pad, version)
