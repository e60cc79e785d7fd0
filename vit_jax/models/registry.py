"""The model zoo: one entry per variant, keyed by the names users know.

Each entry holds the architecture fields of its model class
(`ARCHITECTURES`; `models.VisionTransformer` unless it names another): the
paper's ViT variants (Table 1 of arXiv 2010.11929) plus the hybrids and the
small models of "How to train your ViT" (arXiv 2106.10270), and the paper's
ResNet baselines, BiT ResNet-v2 (arXiv 1912.11370, Table 7 of the ViT paper;
`models.BiT`). Hybrids use patch size 1 on the ResNet features, except
R+ViT-Ti_16 (root block only, 8x8 patches).
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


def _bit(resnet_layers: tuple[int, ...], width: int) -> dict[str, Any]:
  return dict(architecture='bit', resnet_layers=resnet_layers,
              resnet_width=width)


_R50, _R101, _R152 = (3, 4, 6, 3), (3, 4, 23, 3), (3, 8, 36, 3)

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
    'BiT-R50x1': _bit(_R50, 1),
    'BiT-R50x3': _bit(_R50, 3),
    'BiT-R101x1': _bit(_R101, 1),
    'BiT-R101x3': _bit(_R101, 3),
    'BiT-R152x2': _bit(_R152, 2),
    'BiT-R152x4': _bit(_R152, 4),
}


def architecture(name: str) -> str:
  """'vit' or 'bit': which model class builds `name`."""
  return get_model_config(name).get('architecture', 'vit')


def get_model_config(name: str) -> dict[str, Any]:
  """The entry of `name` (fields, and 'architecture' where not 'vit');
  unknown names get close matches listed."""
  if name not in MODELS:
    raise ValueError(errors.unknown('model name', name, list(MODELS), n=3,
                                    cutoff=0.4))
  return dict(MODELS[name])
