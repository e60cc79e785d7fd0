"""Models by name: the registry's variants with options, to and from JSON.

`create_model('ViT-B_16', num_classes=10, dtype=jnp.bfloat16)` is the one way
a model is built from a name; configs and export cards store its options as
JSON values (`options_to_json` / `options_from_json`), and `option_types`
gives every option a config may set.
"""
from collections.abc import Mapping
import math
from typing import Any

import jax
import jax.numpy as jnp

from vit_jax.base import errors
from vit_jax.models import registry
from vit_jax.models.bit import BiT
from vit_jax.models.vit import VisionTransformer

Model = VisionTransformer | BiT
# The model classes by the registry's 'architecture' (BiT's fields are a
# subset of VisionTransformer's names, so configs have one set of options).
ARCHITECTURES: dict[str, type] = {'vit': VisionTransformer, 'bit': BiT}


def _fields(cls: type) -> tuple[str, ...]:
  return tuple(f for f in cls.__dataclass_fields__
               if f not in ('parent', 'name'))


def model_fields(name: str) -> tuple[str, ...]:
  """The fields of the class that builds the registered model `name`."""
  return _fields(ARCHITECTURES[registry.architecture(name)])


def option_types() -> dict[str, type]:
  """Every architecture option of the model classes (what a config may
  set) -> the type a config gives it: dtypes by name (str), patch size as int
  (square) or tuple, `None`-able fields as their non-None type."""
  special = {'dtype': str, 'param_dtype': str, 'patch_size': int,
             'resnet_layers': tuple, 'representation_size': int,
             'layerscale': float}
  options = {}
  for cls in ARCHITECTURES.values():
    for name in _fields(cls):
      if name != 'num_classes':  # from the dataset, not the config
        options.setdefault(name, special.get(name)
                           or cls.__dataclass_fields__[name].type)
  return options


DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16,
          'float16': jnp.float16}


def options_from_json(options: Mapping[str, Any]) -> dict[str, Any]:
  """Model options as configs and export cards store them (dtypes by name,
  lists; None: the registry's value) -> `create_model` keyword arguments."""
  kwargs = {}
  for key, value in options.items():
    if value is None:
      continue
    if key in ('dtype', 'param_dtype'):
      if value not in DTYPES:
        raise ValueError(f'model.{key}={value!r}; allowed: '
                         f'{", ".join(DTYPES)}.')
      value = DTYPES[value]
    elif isinstance(value, list):
      value = tuple(value)
    kwargs[key] = value
  return kwargs


def options_to_json(model: Model) -> dict[str, Any]:
  """The model's options as JSON values: the inverse of `options_from_json`."""
  options = {}
  for name in _fields(type(model)):
    if name == 'num_classes':
      continue
    value = getattr(model, name)
    if name in ('dtype', 'param_dtype'):
      value = jnp.dtype(value).name
    options[name] = list(value) if isinstance(value, tuple) else value
  return options


def create_model(name: str, num_classes: int, **overrides: Any) -> Model:
  """The registered model `name` (e.g. 'ViT-B_16'), with any field overridden.

  >>> model = create_model('ViT-Ti_16', num_classes=10, dtype=jnp.bfloat16)
  """
  config = registry.get_model_config(name)
  cls = ARCHITECTURES[config.pop('architecture', 'vit')]
  fields = _fields(cls)
  unknown = sorted(set(overrides) - set(fields))
  if unknown:
    hint = '; '.join(f'{k!r}' + ''.join(
        f' (did you mean {c!r}?)' for c in errors.close_matches(k, fields))
                     for k in unknown)
    raise ValueError(f'Unknown model option(s) {hint} for {name} '
                     f'({cls.__name__}). Options: {", ".join(fields)}.')
  config.update(overrides, num_classes=num_classes)
  if isinstance(config.get('patch_size'), int):
    config['patch_size'] = (config['patch_size'],) * 2
  return cls(**config)


def count_params(model: Model,
                 image_size: tuple[int, int] = (224, 224)) -> int:
  """Number of parameters, from shapes only (nothing is allocated)."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0),
                         jnp.zeros((1, *image_size, 3), jnp.float32)))
  return sum(math.prod(x.shape) for x in jax.tree.leaves(shapes['params']))
