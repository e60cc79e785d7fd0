"""Bounds on every size that a file decides, so that no file decides our memory.

A size read from a file (an image's dimensions, a preprocessing crop, a
config's resolution, a labels or JSON file's length, the bytes of a weights
archive) is checked against one of these limits before anything is allocated
for it; over the limit, one `LimitError` line names the file, the size, the
limit and the environment variable that raises it. docs/reliability.md
("Limits") lists them with where each is checked.

Each limit is read from its environment variable at the moment of the check,
so a user (or a test) can change it without code.
"""
import dataclasses
import os

MIB = 2**20
GIB = 2**30


class LimitError(ValueError):
  """A size from a file is over its limit; the message says which and how to
  raise it."""


@dataclasses.dataclass(frozen=True)
class Limit:
  env: str  # the environment variable that overrides `default`
  default: int
  what: str  # what is counted, in the plural: 'pixels', 'bytes'

  def value(self) -> int:
    text = os.environ.get(self.env, '').strip()
    if not text:
      return self.default
    try:
      value = int(float(text))
    except ValueError:
      raise LimitError(f'{self.env}={text!r} is not a number; give the limit '
                       f'in {self.what}, e.g. {self.env}={self.default}.'
                       ) from None
    if value <= 0:
      raise LimitError(f'{self.env}={text!r} must be positive.')
    return value

  def check(self, amount: float, subject: str) -> None:
    """LimitError if `amount` (of `subject`, e.g. 'photo.png: 144000000
    decoded pixels') is over the limit."""
    limit = self.value()
    if amount > limit:
      raise LimitError(
          f'{subject}: {amount:,.0f} {self.what}, over the limit of '
          f'{limit:,} (set {self.env} to raise it, if the file is trusted).')


# A decoded image, and any image the eval preprocessing makes from it (the
# resized copy before a crop). 40 M pixels is a 7300 x 5500 photo: 120 MB as
# uint8, 480 MB as the float32 the resize works in. Larger JPEGs are decoded
# at 1/2, 1/4 or 1/8 scale by libjpeg (Pillow's draft) to fit; other formats
# are refused.
IMAGE_PIXELS = Limit('VIT_JAX_MAX_IMAGE_PIXELS', 40_000_000, 'pixels')
# A model's input side read from a file (config.json, card, preprocessing
# sizes): ViT-B/16 at 4096 px is 65,536 tokens.
INPUT_SIDE = Limit('VIT_JAX_MAX_INPUT_SIDE', 4096, 'pixels per side')
# JSON configs, cards, labels, lock records: text a person could read.
TEXT_BYTES = Limit('VIT_JAX_MAX_TEXT_BYTES', 64 * MIB, 'bytes')
# All arrays of one weights file (npz or safetensors), as they will be in
# memory: ViT-H/14 in float32 is 2.5 GB, ViT-22B in bfloat16 44 GB.
WEIGHTS_BYTES = Limit('VIT_JAX_MAX_WEIGHTS_BYTES', 16 * GIB, 'bytes')
# A crop keeps at least this fraction of the shorter side (timm's crop_pct,
# our crop_fraction): below it the resize before the crop grows without bound.
MIN_CROP_FRACTION = 0.25

ALL = (IMAGE_PIXELS, INPUT_SIDE, TEXT_BYTES, WEIGHTS_BYTES)
