"""Model architectures (Flax linen): the Vision Transformer and its zoo.

Imports jax and Flax only: never TensorFlow, Orbax or optax.

    model = models.create_model('ViT-B_16', num_classes=10)

`vit`: VisionTransformer and the scanned/unrolled block layouts; `masked`:
its masked-patch-prediction wrapper (self-supervision); `layers`:
attention, MLP, the encoder block; `resnet`: the ResNet of the hybrids'
stem and of `bit`, the BiT ResNet-v2 baselines;
`registry`: the variants by the names users know; `factory`: create_model
and the options as configs and cards store them.
"""
from vit_jax.models.bit import BiT
from vit_jax.models.factory import ARCHITECTURES
from vit_jax.models.factory import Model
from vit_jax.models.factory import count_params
from vit_jax.models.factory import create_model
from vit_jax.models.factory import model_fields
from vit_jax.models.factory import option_types
from vit_jax.models.factory import options_from_json
from vit_jax.models.factory import options_to_json
from vit_jax.models.registry import MODELS
from vit_jax.models.registry import get_model_config
from vit_jax.models.vit import ATTENTION_IMPLS
from vit_jax.models.vit import CLASSIFIERS
from vit_jax.models.vit import REMAT_POLICIES
from vit_jax.models.vit import VisionTransformer
from vit_jax.models.vit import stack_encoder_blocks
from vit_jax.models.vit import unstack_encoder_blocks

__all__ = ['ARCHITECTURES', 'ATTENTION_IMPLS', 'BiT', 'CLASSIFIERS', 'MODELS',
           'Model', 'REMAT_POLICIES', 'VisionTransformer', 'count_params',
           'create_model', 'get_model_config', 'model_fields', 'option_types',
           'options_from_json', 'options_to_json', 'stack_encoder_blocks',
           'unstack_encoder_blocks']
