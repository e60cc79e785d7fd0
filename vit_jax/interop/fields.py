"""Numbers in the ecosystem's config.json files, typed and bounded.

A hand-edited (or hostile) config.json must not size a model, and so our
memory, beyond anything a checkpoint could be, nor fail later as
`invalid literal for int()` without naming the field: every integer a
config gives is checked here, in one ValueError line naming the field (the
loaders add the file).
"""
from collections.abc import Mapping
from typing import Any

from vit_jax.base import limits


def integer(config: Mapping[str, Any], name: str, default: int, low: int,
            high: int, value: Any = None) -> int:
  """config[name] (or `value`) as an int in [low, high]."""
  value = config.get(name, default) if value is None else value
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or value != int(value) or not low <= value <= high):
    raise ValueError(f'{name}={value!r}: expected an integer in [{low}, '
                     f'{high:,}]')
  return int(value)


def size(config: Mapping[str, Any], name: str, default: Any
         ) -> tuple[int, int]:
  """An int or [..., height, width] field of pixels, each side in
  [1, limits.INPUT_SIDE]."""
  value = config.get(name, default)
  sides = value[-2:] if isinstance(value, (list, tuple)) else (value, value)
  if len(sides) != 2:
    raise ValueError(f'{name}={value!r}: expected an integer or [height, '
                     'width]')
  most = limits.INPUT_SIDE.value()
  return tuple(integer(config, name, default, 1, most, v) for v in sides)
