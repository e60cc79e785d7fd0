"""The model zoo: one entry per variant, keyed by the names users know.

Each entry holds the architecture fields of `models.VisionTransformer`; the
paper's variants (Table 1 of arXiv 2010.11929) plus the hybrids and the small
models of "How to train your ViT" (arXiv 2106.10270). Hybrids use patch size 1
on the ResNet features, except R+ViT-Ti_16 (root block only, 8x8 patches).
"""
from typing import Any

from vit_jax.base import errors

_TI = dict(hidden_size=192, mlp_dim=768, num_heads=3, num_layers=12)
_S = dict(hidden_size=384, mlp_dim=1536, num_heads=6, num_layers=12)
_B = dict(hidden_size=768, mlp_dim=3072, num_heads=12, num_layers=12)
_L = dict(hidden_size=1024, mlp_dim=4096, num_heads=16, num_layers=24)
_H = dict(hidden_size=1280, mlp_dim=5120, num_heads=16, num_layers=32)


def _vit(size: dict[str, int], patch: int) -> dict[str, Any]:
  return dict(size, patch_size=(patch, patch))


def _hybrid(size: dict[str, int], resnet_layers: tuple[int, ...],
            patch: int = 1) -> dict[str, Any]:
  return dict(size, patch_size=(patch, patch), resnet_layers=resnet_layers,
              resnet_width=1)


MODELS: dict[str, dict[str, Any]] = {
    'ViT-Ti_16': _vit(_TI, 16),
    'ViT-S_16': _vit(_S, 16),
    'ViT-S_32': _vit(_S, 32),
    'ViT-B_8': _vit(_B, 8),
    'ViT-B_16': _vit(_B, 16),
    'ViT-B_32': _vit(_B, 32),
    'ViT-L_16': _vit(_L, 16),
    'ViT-L_32': _vit(_L, 32),
    'ViT-H_14': _vit(_H, 14),
    'R+ViT-Ti_16': _hybrid(_TI, (), patch=8),
    'R26+ViT-S_32': _hybrid(_S, (2, 2, 2, 2)),
    'R26+ViT-B_32': _hybrid(_B, (2, 2, 2, 2)),
    'R50+ViT-B_16': _hybrid(_B, (3, 4, 9)),
    'R50+ViT-L_32': _hybrid(_L, (3, 4, 6, 3)),
}


def get_model_config(name: str) -> dict[str, Any]:
  """The architecture of `name`; unknown names get close matches listed."""
  if name not in MODELS:
    raise ValueError(errors.unknown('model name', name, list(MODELS), n=3,
                                    cutoff=0.4))
  return dict(MODELS[name])
