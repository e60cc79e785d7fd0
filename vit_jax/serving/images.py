"""Image files -> model inputs in numpy, matching training's eval preprocessing.

The one image decoder of every tool (predict, evaluate on folders, inspect,
serving): they must see the pixels that evaluation saw during training
(`vit_jax.data.preprocess.eval_image`, TensorFlow) without importing
TensorFlow. This module reproduces it with Pillow and numpy:

  decode   Pillow; EXIF orientation applied (TF's decoder ignores it, so a
           photo tagged "rotate 90" is shown upright here, as a viewer shows
           it); grayscale, palette, CMYK -> RGB; RGBA / LA drop alpha (as
           `tf.io.decode_image(channels=3)` does); 16-bit images keep the
           high byte (as TF's uint16 -> uint8 conversion). First frame of a
           GIF. 32-bit integer and floating-point images are refused: they
           have no standard mapping to 0..255.
  resize   'resize': bilinear to the model's size, the arithmetic of
           `tf.image.resize(method='bilinear')` (half-pixel centres, no
           antialiasing, float32, clipped to [0, 255]);
           'resize_crop': shorter side to round(max(size) / 0.875), bilinear,
           central crop (`data.preprocess.resize_shorter_and_crop`).
  scale    [0, 255] -> [-1, 1] as x / 127.5 - 1 (`to_unit_range`). Exported
           models do this step themselves; they take the resized [0, 255].

TF decodes JPEGs with libjpeg's fast integer DCT, Pillow with the accurate
one (Pillow offers no other with fancy upsampling), so eval inputs from JPEGs
differ by about 1 level of 255 on average, at most 9, on the 1000 ImageNet
samples at 224px; from the same decoded pixels they are identical
(tests/test_predict.py checks both on real photos).
"""
from collections.abc import Iterable, Iterator, Sequence
import concurrent.futures
import dataclasses
import os
import pathlib
import warnings

import numpy as np
from PIL import Image
from PIL import ImageOps

from vit_jax.base import limits

RESIZE_MODES = ('resize', 'resize_crop')
CROP_FRACTION = 0.875  # 224 / 256, preprocess.resize_shorter_and_crop's default
IMAGE_EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.bmp', '.gif',
                              '.webp', '.tif', '.tiff'})
Size = tuple[int, int]


def as_size(size: int | Sequence[int]) -> Size:
  """An int (square) or (height, width) -> (height, width) of positive ints."""
  pair = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
  if len(pair) != 2 or not all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s > 0
      for s in pair):
    raise ValueError(f'Image size {size!r} must be a positive int or '
                     '(height, width) of positive ints.')
  return int(pair[0]), int(pair[1])


class UnsupportedImageError(ValueError):
  """A decodable image whose pixels have no defined 8-bit RGB meaning."""


def _bits(image: Image.Image) -> int:
  """Bits per sample of a single-channel integer image ('I' or 'I;16*')."""
  if image.mode.startswith('I;16'):
    return 16
  tags = getattr(image, 'tag_v2', None)  # TIFF
  if tags is not None and tags.get(258):
    return int(tags.get(258)[0] if isinstance(tags.get(258), tuple)
               else tags.get(258))
  return 16 if image.format == 'PNG' else 32  # older Pillow: PNG 16 -> 'I'


def _fit_pixel_limit(image: Image.Image, path) -> None:
  """Bounds the decoded size before decoding (the header is read, no pixel).

  Pillow's own bomb check only warns below 179 M pixels (a 17 KB PNG can
  declare 144 M). A JPEG over `limits.IMAGE_PIXELS` is decoded at 1/2, 1/4 or
  1/8 scale (libjpeg's DCT scaling, Pillow's `draft`): still far above any
  model's resolution, and the full bitmap is never made. Anything else over
  the limit is refused with one LimitError line.
  """
  width, height = image.size
  limit = limits.IMAGE_PIXELS.value()
  if width * height <= limit:
    return
  if image.format == 'JPEG':
    for factor in (2, 4, 8):
      if -(-width // factor) * -(-height // factor) <= limit:  # ceil: as decoded
        image.draft(image.mode, (max(1, width // factor),
                                 max(1, height // factor)))
        break
  limits.IMAGE_PIXELS.check(image.size[0] * image.size[1],
                            f'{path}: {width}x{height} image, decoded')


def load_rgb(path: str | os.PathLike) -> np.ndarray:
  """Decodes an image file to uint8 [height, width, 3] RGB.

  Raises OSError / ValueError (Pillow's errors, e.g. truncated or not an
  image) for files that cannot be decoded, UnsupportedImageError for 32-bit
  integer or floating-point pixels, limits.LimitError for images over
  `limits.IMAGE_PIXELS` (JPEGs are first decoded smaller to fit).
  """
  with warnings.catch_warnings():
    # Pillow warns from 89 M pixels; our own, lower limit decides below.
    warnings.simplefilter('ignore', Image.DecompressionBombWarning)
    image = Image.open(path)
  with image:
    _fit_pixel_limit(image, path)
    image.load()  # Decodes now, so truncated files fail here, not later.
    try:
      image = ImageOps.exif_transpose(image)
    except Exception:  # pylint: disable=broad-except
      pass  # Malformed EXIF: the pixels are fine, keep them as stored.
    if image.mode == 'F' or (image.mode == 'I' and _bits(image) > 16):
      kind = ('floating-point' if image.mode == 'F' else
              f'{_bits(image)}-bit integer')
      raise UnsupportedImageError(
          f'{kind} pixels (Pillow mode {image.mode}) have no standard '
          'mapping to 0..255; convert the image to 8- or 16-bit first.')
    if image.mode == 'I' or image.mode.startswith('I;16'):
      # 16-bit grey: keep the high byte, as tf.image.convert_image_dtype.
      grey = (np.asarray(image, np.int64) >> 8).clip(0, 255).astype(np.uint8)
      return np.repeat(grey[..., None], 3, axis=-1)
    # convert('RGB') drops alpha without compositing, like TF's channels=3.
    return np.asarray(image.convert('RGB'), np.uint8)


def _bilinear_weights(in_size: int, out_size: int):
  """Source indices and weights of TF's ResizeBilinear (half-pixel centres)."""
  scale = np.float32(in_size) / np.float32(out_size)
  x = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale
  x = x - np.float32(0.5)
  floor = np.floor(x)
  lower = np.maximum(floor.astype(np.int64), 0)
  upper = np.minimum(np.ceil(x).astype(np.int64), in_size - 1)
  return lower, upper, (x - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, size: Size) -> np.ndarray:
  """`preprocess.resize` in numpy: float32 [h, w, C] in [0, 255]."""
  image = np.asarray(image)
  y_lo, y_hi, y_lerp = _bilinear_weights(image.shape[0], size[0])
  x_lo, x_hi, x_lerp = _bilinear_weights(image.shape[1], size[1])
  x_lerp = x_lerp[None, :, None]
  # Same operation order as TF's kernel (interpolate along x, then y), so
  # float32 rounding matches too. Rows are picked before the (exact) cast to
  # float32: a large photo is never copied whole as float32.
  top, bottom = (image[y].astype(np.float32) for y in (y_lo, y_hi))
  top = top[:, x_lo] + (top[:, x_hi] - top[:, x_lo]) * x_lerp
  bottom = bottom[:, x_lo] + (bottom[:, x_hi] - bottom[:, x_lo]) * x_lerp
  out = top + (bottom - top) * y_lerp[:, None, None]
  return np.clip(out, 0.0, 255.0)


def resize_shorter_and_crop(image: np.ndarray, size: Size,
                            crop_fraction: float = CROP_FRACTION
                            ) -> np.ndarray:
  """`preprocess.resize_shorter_and_crop` in numpy (same float32 rounding)."""
  target = np.round(np.float32(max(size) / crop_fraction))
  shape = np.asarray(image.shape[:2], np.float32)
  scale = target / shape.min()
  new_hw = np.maximum(np.round(shape * scale).astype(np.int64), size)
  _check_resized(image.shape, new_hw)
  resized = resize_bilinear(image, (int(new_hw[0]), int(new_hw[1])))
  top, left = (new_hw[0] - size[0]) // 2, (new_hw[1] - size[1]) // 2
  return resized[top:top + size[0], left:left + size[1]]


INTERPOLATIONS = ('bilinear', 'pil_bilinear', 'pil_bicubic')
_PIL_FILTERS = {'pil_bilinear': Image.BILINEAR, 'pil_bicubic': Image.BICUBIC}
UNIT_RANGE = (0.5, 0.5, 0.5)  # mean = std = 0.5: [0, 255] -> [-1, 1]


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """How a model's evaluation turns a decoded image into its input.

  resize         'resize' (to the model's size) or 'resize_crop' (shorter
                 side to the size / crop_fraction, then the centre);
  crop_fraction  with 'resize_crop'; 0.875 = 224 / 256;
  interpolation  'bilinear': TF's arithmetic, as this library trains and
                 evaluates (half-pixel centres, no antialiasing, the shorter
                 side rounded); 'pil_bilinear' / 'pil_bicubic': Pillow's
                 antialiased filters, as timm's and Hugging Face's
                 evaluation transforms (the shorter side floored, as timm);
  mean, std      per channel, of pixels scaled to [0, 1]: the model sees
                 (x / 255 - mean) / std; 0.5 / 0.5 is [-1, 1].
  The defaults are this library's; timm and Hugging Face checkpoints bring
  their own (`from_json` reads a card's).
  """
  resize: str = 'resize'
  crop_fraction: float = CROP_FRACTION
  interpolation: str = 'bilinear'
  mean: tuple[float, float, float] = UNIT_RANGE
  std: tuple[float, float, float] = UNIT_RANGE

  def __post_init__(self):
    if self.resize not in RESIZE_MODES:
      raise ValueError(f'Resize mode {self.resize!r} is not supported; '
                       f'allowed: {", ".join(RESIZE_MODES)}.')
    if self.interpolation not in INTERPOLATIONS:
      raise ValueError(f'Interpolation {self.interpolation!r} is not '
                       f'supported; allowed: {", ".join(INTERPOLATIONS)}.')
    if not limits.MIN_CROP_FRACTION <= self.crop_fraction <= 1:
      # Below the minimum the resize before the crop grows without bound
      # (timm's crop_pct 1e-5 would resize to 22 M pixels a side).
      raise ValueError(f'crop_fraction={self.crop_fraction} must be in '
                       f'[{limits.MIN_CROP_FRACTION}, 1].')
    if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
      raise ValueError(f'mean {self.mean} and std {self.std} must be three '
                       'numbers each, std positive.')

  def to_json(self) -> dict:
    return {'resize': self.resize, 'crop_fraction': (
        self.crop_fraction if self.resize == 'resize_crop' else None),
            'interpolation': self.interpolation, 'mean': list(self.mean),
            'std': list(self.std)}

  @classmethod
  def from_json(cls, value: dict) -> 'Preprocessing':
    return cls(resize=value['resize'],
               crop_fraction=value.get('crop_fraction') or CROP_FRACTION,
               interpolation=value.get('interpolation', 'bilinear'),
               mean=tuple(value.get('mean', UNIT_RANGE)),
               std=tuple(value.get('std', UNIT_RANGE)))

  def describe(self) -> str:
    crop = (f' {self.crop_fraction:g}' if self.resize == 'resize_crop'
            else '')
    scale = ('' if (self.mean, self.std) == (UNIT_RANGE, UNIT_RANGE) else
             f', mean {list(self.mean)} std {list(self.std)}')
    return f'{self.resize}{crop} {self.interpolation}{scale}'


def _as_preprocessing(preprocessing: 'Preprocessing | str') -> Preprocessing:
  if isinstance(preprocessing, Preprocessing):
    return preprocessing
  return Preprocessing(resize=preprocessing)


def _check_resized(shape: Sequence[int], new_hw: Sequence[int]) -> None:
  """LimitError before a resize whose output is over `limits.IMAGE_PIXELS`
  (a 1 x 20000 strip resized to a 256 px shorter side would be 5 G pixels)."""
  limits.IMAGE_PIXELS.check(
      int(new_hw[0]) * int(new_hw[1]),
      f'a {shape[0]}x{shape[1]} image resized to {int(new_hw[0])}x'
      f'{int(new_hw[1])} before its crop')


def _resize_pil(image: np.ndarray, size: Size, interpolation: str
                ) -> np.ndarray:
  resized = Image.fromarray(np.asarray(image, np.uint8)).resize(
      (size[1], size[0]), _PIL_FILTERS[interpolation])
  return np.asarray(resized, np.float32)


def as_rgb(image: np.ndarray) -> np.ndarray:
  """A decoded image as uint8 [h, w, 3]: grey [h, w] or [h, w, 1] repeated to
  RGB; ValueError for any other shape or dtype (a float image in [0, 1] would
  otherwise be read as 0..255, nearly black)."""
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f'Expected a uint8 image (0..255, as load_rgb decodes '
                     f'it), got dtype {image.dtype}; a float image in [0, 1] '
                     'needs (image * 255).round().astype(np.uint8).')
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3) or 0 in image.shape:
    raise ValueError(f'Expected an image of shape [height, width, 3] (RGB) or '
                     f'[height, width] (grey), got {image.shape}.')
  return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def eval_pixels(image: np.ndarray, size: Size,
                preprocessing: 'Preprocessing | str' = 'resize'
                ) -> np.ndarray:
  """Decoded uint8 RGB (or grey) -> float32 [size, 3] in [0, 255], resized
  like eval.

  `preprocessing` is a Preprocessing, or a resize mode for this library's.
  """
  image = as_rgb(image)
  p = _as_preprocessing(preprocessing)
  size = (int(size[0]), int(size[1]))
  if p.interpolation == 'bilinear':
    if p.resize == 'resize':
      return resize_bilinear(image, size)
    return resize_shorter_and_crop(image, size, p.crop_fraction)
  if p.resize == 'resize':
    return _resize_pil(image, size, p.interpolation)
  # timm's evaluation: shorter side to floor(size / crop_pct), centre crop.
  target = int(max(size) / p.crop_fraction)
  h, w = image.shape[:2]
  scale = target / min(h, w)
  new_hw = (max(size[0], round(h * scale)), max(size[1], round(w * scale)))
  _check_resized(image.shape, new_hw)
  resized = _resize_pil(image, new_hw, p.interpolation)
  top, left = (new_hw[0] - size[0]) // 2, (new_hw[1] - size[1]) // 2
  return resized[top:top + size[0], left:left + size[1]]


def normalize(pixels, preprocessing: Preprocessing):
  """[0, 255] -> the model's input range; numpy or jax arrays alike.

  This library's own range is computed as x / 127.5 - 1, bit for bit what
  training's evaluation computes.
  """
  if (preprocessing.mean, preprocessing.std) == (UNIT_RANGE, UNIT_RANGE):
    return pixels / 127.5 - 1.0
  mean = np.asarray(preprocessing.mean, np.float32)
  std = np.asarray(preprocessing.std, np.float32)
  return (pixels / 255.0 - mean) / std


def to_unit_range(pixels: np.ndarray) -> np.ndarray:
  """[0, 255] -> [-1, 1], exactly `preprocess.to_unit_range`."""
  return np.asarray(pixels, np.float32) / np.float32(127.5) - np.float32(1.0)


def eval_image(image: np.ndarray, size: Size,
               preprocessing: 'Preprocessing | str' = 'resize') -> np.ndarray:
  """`preprocess.eval_image` after decoding: float32 [size, 3], normalized."""
  p = _as_preprocessing(preprocessing)
  return np.asarray(normalize(eval_pixels(image, size, p), p), np.float32)


def list_images(paths: Iterable[str | os.PathLike]) -> list[str]:
  """Files as given, folders expanded (recursively, sorted) to image files.

  Named files are kept whatever their extension (so an unreadable one is
  reported rather than silently skipped); inside folders only files with an
  image extension are taken. Missing paths are kept: reading them fails and
  names them.
  """
  out = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      out.extend(str(p) for p in sorted(pathlib.Path(path).rglob('*'))
                 if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    else:
      out.append(path)
  return out


def class_folder(root: str | os.PathLike) -> dict[str, list[str]]:
  """{class name: its image files} of `root/<class>/<files>`, both sorted.

  Files directly in a class folder only (not in deeper folders), with an
  image extension. The class index of a name is its position in the sorted
  names (in the training folder dataset: of all splits together).
  """
  root = pathlib.Path(root)
  return {d.name: sorted(str(f) for f in d.iterdir()
                         if f.suffix.lower() in IMAGE_EXTENSIONS
                         and f.is_file())
          for d in sorted(root.iterdir()) if d.is_dir()}


def read_pixels(path: str | os.PathLike, size: Size,
                preprocessing: 'Preprocessing | str' = 'resize'
                ) -> np.ndarray | Exception:
  """`eval_pixels` of a file, or the exception that reading it raised.

  Returned rather than raised so that a batch of files can go on past a
  bad one (Pillow raises OSError, ValueError, SyntaxError, ...).
  """
  try:
    return eval_pixels(load_rgb(path), size, preprocessing)
  except Exception as e:  # pylint: disable=broad-except
    return e


def error_text(error: Exception) -> str:
  """A file's read error as the tools print it after `error: PATH: `."""
  if isinstance(error, FileNotFoundError):
    return 'no such file'
  if isinstance(error, IsADirectoryError):
    return 'is a directory'
  return f'{type(error).__name__}: {error}'


def read_batches(paths: Sequence[str], size: Size,
                 preprocessing: 'Preprocessing | str', batch_size: int,
                 workers: int = 4
                 ) -> Iterator[list[tuple[str, np.ndarray | Exception]]]:
  """[(path, pixels or the read error)] per `batch_size` files, in order.

  Files are decoded and resized in threads (Pillow and numpy release the
  GIL for most of it), the next batch while the caller uses this one.
  """
  read = lambda p: read_pixels(p, size, preprocessing)
  chunks = [paths[i:i + batch_size] for i in range(0, len(paths), batch_size)]
  workers = max(1, min(workers, os.cpu_count() or 1))
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    pending = [pool.submit(read, p) for p in chunks[0]] if chunks else []
    for n, chunk in enumerate(chunks):
      loaded = [future.result() for future in pending]
      if n + 1 < len(chunks):
        pending = [pool.submit(read, p) for p in chunks[n + 1]]
      yield list(zip(chunk, loaded))


def stack_padded(pixels: Sequence[np.ndarray], batch_size: int) -> np.ndarray:
  """Images stacked and zero-padded to `batch_size` rows: one compiled shape."""
  batch = np.zeros((batch_size, *pixels[0].shape), np.float32)
  batch[:len(pixels)] = pixels
  return batch
