"""Runs an exported ViT from its files alone, without vit_jax's model code.

`python -m vit_jax.export` writes `<name>.card.json`, `<name>.stablehlo` and
`<name>.safetensors` (and `<name>.npz`). This loader needs only jax, numpy,
safetensors and Pillow: it never imports `vit_jax.models` or Flax.

    model = serving.load('out/vit.card.json')          # or the directory
    pixels = model.preprocess(images.load_rgb('cat.jpg'))  # [H, W, 3] 0..255
    logits = model(pixels[None])                       # [1, num_classes]

The StableHLO function (`jax.export`, symbolic batch dimension) is
`logits = f(params, pixels)`:
  params  dict {flat name: array}, exactly the arrays of <name>.safetensors
          (float32, or bfloat16 for a --bfloat16 export; cast up inside).
  pixels  float32 [batch, height, width, 3], RGB in [0, 255], already
          resized to the card's `image_size` as its `preprocessing` says
          (`vit_jax.serving.images.eval_pixels`); any batch size. Resizing
          stays outside because photos of different sizes cannot share a
          tensor. The scaling ((x / 255 - mean) / std; x / 127.5 - 1 for
          this library's own models) is inside.
  returns float32 [batch, num_classes] logits.
The weights are an argument rather than constants so that they are stored
once (the safetensors file) and big models stay under the 2 GiB limit of a
serialized module.

`load` checks every file against the card (`serving.card`): sizes,
SHA-256s, the params checksum, and the StableHLO signature against the
card's resolution and classes.
"""
from collections.abc import Mapping
import os
import pathlib
from typing import Any

import jax
import numpy as np

from vit_jax.serving import card as card_lib
from vit_jax.serving import images

# jax.default_backend() -> the platform names jax.export lowers for.
_LOWERING_PLATFORMS = {'cpu': ('cpu',), 'gpu': ('cuda', 'rocm'),
                       'tpu': ('tpu',)}


class ExportedModel:
  """An export's StableHLO function bound to its weights (module docstring)."""

  def __init__(self, card_path: pathlib.Path, card: dict[str, Any],
               exported: jax.export.Exported, params: dict[str, np.ndarray]):
    self.card_path, self.card = card_path, card
    self.image_size: tuple[int, int] = tuple(card['image_size'])
    self.preprocessing = images.Preprocessing.from_json(
        card['preprocessing'])
    self.num_classes: int = card['num_classes']
    self.label_names: list[str] | None = card['label_names']
    self._params = jax.device_put(params)  # Once, not per call.
    self._call = jax.jit(exported.call)  # Compiled once per batch size.

  def preprocess(self, image: np.ndarray) -> np.ndarray:
    """Decoded uint8 RGB [h, w, 3] -> this model's float32 [0, 255] input."""
    return images.eval_pixels(image, self.image_size, self.preprocessing)

  def __call__(self, pixels: np.ndarray) -> np.ndarray:
    """float32 [batch, height, width, 3] in [0, 255] -> [batch, classes]."""
    pixels = np.asarray(pixels, np.float32)
    expected = (*self.image_size, 3)
    if pixels.ndim != 4 or pixels.shape[1:] != expected:
      raise ValueError(f'Expected pixels of shape (batch, {expected[0]}, '
                       f'{expected[1]}, 3), got {pixels.shape}; resize with '
                       '.preprocess() first.')
    return np.asarray(self._call(self._params, pixels))


def _check_signature(exported: jax.export.Exported, card: Mapping[str, Any],
                     params: Mapping[str, np.ndarray], path: pathlib.Path
                     ) -> None:
  """The StableHLO function must take these params and the card's pixels."""
  try:
    param_avals, pixel_aval = jax.tree.unflatten(exported.in_tree,
                                                 exported.in_avals)[0]
    logits_aval, = exported.out_avals
  except (ValueError, TypeError) as e:
    raise card_lib.CardError(f'{path} is not a vit_jax export function '
                             f'(params, pixels) -> logits: {e}') from e
  want = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in params.items()}
  have = {k: (tuple(v.shape), np.dtype(v.dtype))
          for k, v in param_avals.items()}
  h, w = card['image_size']
  if (want != have or tuple(pixel_aval.shape[1:]) != (h, w, 3)
      or logits_aval.shape[-1] != card['num_classes']):
    raise card_lib.CardError(
        f'{path} takes pixels {pixel_aval.shape[1:]} and gives '
        f'{logits_aval.shape[-1]} classes, but its card says image_size='
        f'{card["image_size"]} and num_classes={card["num_classes"]}'
        + ('' if want == have else ', and other params') + ': the card was '
        'edited or comes from another export.')


def load(path: str | os.PathLike, verify: bool = True) -> ExportedModel:
  """The export at `path` (its card, or the folder holding one card)."""
  card_path, card = card_lib.read_card(path)
  hlo_path = card_lib.export_file(card_path, card, 'stablehlo', verify)
  try:
    exported = jax.export.deserialize(bytearray(hlo_path.read_bytes()))
  except Exception as e:  # pylint: disable=broad-except  (flatbuffer errors)
    raise card_lib.CardError(f'Cannot read the StableHLO function {hlo_path}: '
                             f'{type(e).__name__}: {e}') from e
  backend = jax.default_backend()
  usable = _LOWERING_PLATFORMS.get(backend, (backend,))
  if not set(usable) & set(exported.platforms):
    raise ValueError(f'{hlo_path} was exported for '
                     f'{", ".join(exported.platforms)}; this process runs on '
                     f'{backend}. Re-export with '
                     f'--platforms including {usable[0]}.')
  params = card_lib.read_safetensors(card_path, card, verify)
  _check_signature(exported, card, params, hlo_path)
  return ExportedModel(card_path, card, exported, params)
