"""Masked patch prediction's model side (arXiv 2010.11929, section 4.6).

A corruption says, per patch, what happens to its embedding before the
encoder: KEEP (not corrupted), MASK (the learnable `mask_token`), RANDOM (the
embedding of another patch of the same image, `source`) or UNCHANGED
(corrupted, i.e. predicted, but its embedding kept). `MaskedPatchModel` is a
VisionTransformer plus a per-patch prediction head (`masked_patch_head`); it
shares the transformer's scope, so its parameters are the plain ViT's
(`embedding`, `cls`, `Transformer/...`, Google's names) plus `mask_token` and
`masked_patch_head`: fine-tuning drops those two and keeps the rest. The
sampling, targets and loss are in vit_jax.training.masked_patches.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from vit_jax.models import matmul

KEEP, MASK, RANDOM, UNCHANGED = 0, 1, 2, 3
MASK_TOKEN = 'mask_token'
HEAD = 'masked_patch_head'


def corrupt_patches(x: jax.Array, kind: jax.Array, source: jax.Array,
                    mask_token: jax.Array) -> jax.Array:
  """Patch embeddings (batch, patches, D) corrupted per `kind` (batch,
  patches); RANDOM patches take the embedding of patch `source` of the same
  image."""
  other = jnp.take_along_axis(x, source[..., None], axis=1)
  kind = kind[..., None]
  return jnp.where(kind == MASK, mask_token.astype(x.dtype),
                   jnp.where(kind == RANDOM, other, x))


class MaskedPatchModel(nn.Module):
  """(images, kind, source) -> per-patch predictions (batch, patches, outputs).

  `encoder` is a VisionTransformer (any head settings: its head is not used);
  `outputs` the prediction size per patch (e.g. 512 logits of the 3-bit
  mean colour).
  """
  encoder: nn.Module
  outputs: int

  def setup(self):
    # The ViT's parameters at the top level, named as in a supervised run.
    nn.share_scope(self, self.encoder)
    self.head = matmul.Dense(self.outputs, dtype=self.encoder.dtype,
                             param_dtype=self.encoder.param_dtype,
                             kernel_init=nn.initializers.zeros, name=HEAD)

  def __call__(self, images: jax.Array, kind: jax.Array, source: jax.Array,
               *, train: bool = False) -> jax.Array:
    tokens = self.encoder(images, train=train, patch_corruption=(kind, source))
    return self.head(tokens).astype(jnp.float32)
