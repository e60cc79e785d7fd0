"""TensorFlow image ops for the input pipeline (tf.data side only).

Every random op here is *stateless*: it takes an explicit `seed` (int32/int64
tensor of shape [2]) so that the output depends only on the seed and the input,
never on tf.data's parallelism or on how many elements ran before. The pipeline
derives one seed per example from (run seed, process, example index).

Images flow as float32 in [0, 255] until `to_unit_range` maps them to [-1, 1].
"""
import math
from typing import Sequence

import tensorflow as tf

# TF must never reserve accelerator memory: JAX owns the GPUs/TPUs. This has to
# run before TF initializes its devices, hence at import time.
try:
  tf.config.set_visible_devices([], 'GPU')
except (RuntimeError, ValueError):  # TF already initialized: nothing to hide.
  pass

Size = tuple[int, int]


def split_seed(seed: tf.Tensor, num: int) -> list[tf.Tensor]:
  """Splits a stateless seed into `num` independent seeds."""
  return tf.unstack(tf.random.experimental.stateless_split(seed, num))


def decode(data: tf.Tensor) -> tf.Tensor:
  """Decodes JPEG/PNG/GIF/BMP bytes to uint8 [h, w, 3] (grayscale -> RGB)."""
  return tf.io.decode_image(data, channels=3, expand_animations=False)


def inception_crop(data: tf.Tensor, seed: tf.Tensor, size: Size,
                   area_range: tuple[float, float] = (0.05, 1.0),
                   aspect_range: tuple[float, float] = (3 / 4, 4 / 3)
                   ) -> tf.Tensor:
  """Decodes encoded bytes, takes a random Inception crop, resizes to `size`.

  For JPEG only the crop window is decoded (`decode_and_crop_jpeg`), which is
  the main throughput win on ImageNet-sized photos. Returns float32 [0, 255].
  """
  is_jpeg = tf.io.is_jpeg(data)
  shape = tf.cond(is_jpeg, lambda: tf.image.extract_jpeg_shape(data),
                  lambda: tf.shape(decode(data), out_type=tf.int32))
  begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
      shape, tf.zeros([0, 0, 4], tf.float32), seed=seed,
      min_object_covered=0.0, aspect_ratio_range=aspect_range,
      area_range=area_range, max_attempts=10,
      use_image_if_no_bounding_boxes=True)
  window = tf.stack([begin[0], begin[1], crop_size[0], crop_size[1]])

  def crop_jpeg():
    return tf.image.decode_and_crop_jpeg(data, window, channels=3)

  def crop_other():
    return tf.slice(decode(data), begin, crop_size)

  image = tf.cond(is_jpeg, crop_jpeg, crop_other)
  return resize(image, size)


def resize(image: tf.Tensor, size: Size) -> tf.Tensor:
  """Plain bilinear resize to `size` (Google's ViT fine-tuning eval)."""
  image = tf.image.resize(tf.cast(image, tf.float32), size, method='bilinear')
  return tf.clip_by_value(image, 0.0, 255.0)


def resize_shorter_and_crop(image: tf.Tensor, size: Size,
                            crop_fraction: float = 0.875) -> tf.Tensor:
  """Resizes the shorter side to max(size)/crop_fraction, crops the centre.

  0.875 = 224/256, the usual ImageNet eval protocol.
  """
  target = tf.cast(tf.math.round(max(size) / crop_fraction), tf.float32)
  shape = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = target / tf.reduce_min(shape)
  new_hw = tf.cast(tf.math.round(shape * scale), tf.int32)
  new_hw = tf.maximum(new_hw, tf.constant(size, tf.int32))
  image = resize(image, new_hw)
  top = (new_hw[0] - size[0]) // 2
  left = (new_hw[1] - size[1]) // 2
  return tf.slice(image, [top, left, 0], [size[0], size[1], 3])


def random_flip(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  return tf.image.stateless_random_flip_left_right(image, seed)


def to_unit_range(image: tf.Tensor) -> tf.Tensor:
  """[0, 255] -> [-1, 1], the range the ViT checkpoints were trained on."""
  return tf.cast(image, tf.float32) / 127.5 - 1.0


def train_image(data: tf.Tensor, seed: tf.Tensor, size: Size,
                randaug: tuple[int, float] | None = None,
                crop_min_area: float = 0.05) -> tf.Tensor:
  """Inception crop -> resize -> flip [-> RandAugment] -> [-1, 1]."""
  s_crop, s_flip, s_aug = split_seed(seed, 3)
  image = random_flip(
      inception_crop(data, s_crop, size, area_range=(crop_min_area, 1.0)),
      s_flip)
  if randaug:
    image = randaugment(image, s_aug, *randaug)
  return to_unit_range(image)


def eval_image(data: tf.Tensor, size: Size, mode: str = 'resize') -> tf.Tensor:
  """'resize': plain resize; 'resize_crop': shorter side + central crop."""
  image = decode(data)
  image = (resize(image, size) if mode == 'resize' else
           resize_shorter_and_crop(image, size))
  return to_unit_range(image)


def decodable(paths: Sequence[str]) -> list[bool]:
  """Whether each file can be read and decoded (checked in parallel).

  JPEGs decode at 1/8 scale: libjpeg still walks the whole entropy stream, so
  truncated files are caught at a fraction of the cost.
  """
  if not paths:
    return []

  def check(i, path):
    data = tf.io.read_file(path)
    img = tf.cond(tf.io.is_jpeg(data),
                  lambda: tf.io.decode_jpeg(data, channels=3, ratio=8),
                  lambda: decode(data))
    return i, tf.reduce_max(img)  # Uses the pixels so decoding is not pruned.

  ds = tf.data.Dataset.from_tensor_slices((tf.range(len(paths)), list(paths)))
  ds = ds.map(check, num_parallel_calls=tf.data.AUTOTUNE).ignore_errors()
  ok = {int(i) for i, _ in ds.as_numpy_iterator()}
  return [i in ok for i in range(len(paths))]


# ---------------------------------------------------------------- RandAugment
# Stateless port of the RandAugment op set of the TPU/big_vision code that the
# "Better plain ViT baselines" recipe uses (randaug(2, 10)): magnitude is on a
# 0..10 scale (larger values extrapolate), ops are picked uniformly, geometric
# ops fill with grey (128). Pixel offsets are relative to the image side
# (100/224 for translate, 40/224 for cutout) so the same magnitude means the
# same thing at any resolution.
_FILL = 128.0


def _blend(degenerate, image, factor):
  return tf.clip_by_value(degenerate + factor * (image - degenerate), 0., 255.)


def _gray(image):
  return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _transform(image, transform):
  """Applies an 8-parameter projective transform (output -> input coords)."""
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=tf.cast(tf.reshape(transform, [1, 8]),
                                             tf.float32),
      output_shape=tf.shape(image)[:2], fill_value=_FILL,
      interpolation='NEAREST', fill_mode='CONSTANT')
  return out[0]


def _rotate(image, degrees):
  h, w = [tf.cast(d, tf.float32) for d in tf.unstack(tf.shape(image)[:2])]
  rad = degrees * math.pi / 180.0
  cos, sin = tf.cos(rad), tf.sin(rad)
  x_off = ((w - 1) - (cos * (w - 1) - sin * (h - 1))) / 2.0
  y_off = ((h - 1) - (sin * (w - 1) + cos * (h - 1))) / 2.0
  return _transform(image, [cos, -sin, x_off, sin, cos, y_off, 0., 0.])


def _autocontrast(image):
  lo = tf.reduce_min(image, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(image, axis=[0, 1], keepdims=True)
  scaled = (image - lo) * 255.0 / tf.maximum(hi - lo, 1e-3)
  return tf.where(hi > lo, scaled, image)


def _equalize_channel(channel):
  channel = tf.cast(tf.clip_by_value(channel, 0, 255), tf.int32)
  histo = tf.histogram_fixed_width(channel, [0, 255], nbins=256)
  nonzero = tf.boolean_mask(histo, histo > 0)
  step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255
  lut = (tf.cumsum(histo) + step // 2) // tf.maximum(step, 1)
  lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
  return tf.cast(tf.where(step == 0, channel, tf.gather(lut, channel)),
                 tf.float32)


def _equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], -1)


def _sharpness(image, factor):
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(image[None], kernel, [1, 1, 1, 1], 'VALID')[0]
  # The border keeps the original pixels, like PIL's ImageEnhance.Sharpness.
  smooth = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]])
  inner = tf.pad(tf.ones_like(smooth[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.where(inner > 0, smooth, image)
  return _blend(degenerate, image, factor)


def _cutout(image, seed, half):
  h, w = tf.unstack(tf.shape(image)[:2])
  s_y, s_x = split_seed(seed, 2)
  cy = tf.random.stateless_uniform([], s_y, 0, h, tf.int32)
  cx = tf.random.stateless_uniform([], s_x, 0, w, tf.int32)
  rows = tf.range(h)[:, None, None]
  cols = tf.range(w)[None, :, None]
  inside = ((tf.abs(rows - cy) < half) & (tf.abs(cols - cx) < half))
  return tf.where(inside, _FILL, image)


def _posterize(image, bits):
  shift = tf.cast(8 - bits, tf.uint8)
  pixels = tf.cast(tf.clip_by_value(image, 0, 255), tf.uint8)
  return tf.cast(
      tf.bitwise.left_shift(tf.bitwise.right_shift(pixels, shift), shift),
      tf.float32)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_layers: int,
                magnitude: float) -> tf.Tensor:
  """RandAugment(n=num_layers, m=magnitude) on a float32 [0, 255] image."""
  level = magnitude / 10.0
  size = tf.cast(tf.reduce_min(tf.shape(image)[:2]), tf.float32)
  shape = image.shape
  factor = level * 1.8 + 0.1  # colour/contrast/brightness/sharpness
  bits = max(0, min(8, int(level * 4)))
  for layer in range(num_layers):
    s_op, s_sign, s_cut = split_seed(
        tf.random.experimental.stateless_fold_in(seed, layer), 3)
    sign = tf.where(tf.random.stateless_uniform([], s_sign) < 0.5, -1.0, 1.0)
    shift = sign * level * 0.45 * size
    img = image
    gray_mean = lambda im: tf.reduce_mean(_gray(im)) * tf.ones_like(im)
    branches = [
        lambda: _autocontrast(img),
        lambda: _equalize(img),
        lambda: 255.0 - img,
        lambda: _rotate(img, sign * level * 30.0),
        lambda: _posterize(img, bits),
        lambda: tf.where(img < level * 256.0, img, 255.0 - img),
        lambda: _blend(_gray(img), img, factor),
        lambda: _blend(gray_mean(img), img, factor),
        lambda: _blend(tf.zeros_like(img), img, factor),
        lambda: _sharpness(img, factor),
        lambda: _transform(img, [1., sign * level * 0.3, 0., 0., 1., 0., 0., 0.]),
        lambda: _transform(img, [1., 0., 0., sign * level * 0.3, 1., 0., 0., 0.]),
        lambda: _transform(img, [1., 0., -shift, 0., 1., 0., 0., 0.]),
        lambda: _transform(img, [1., 0., 0., 0., 1., -shift, 0., 0.]),
        lambda: _cutout(img, s_cut, tf.cast(level * 0.18 * size, tf.int32)),
        lambda: tf.where(img < 128.0,
                         tf.clip_by_value(img + level * 110.0, 0., 255.), img),
    ]
    op = tf.random.stateless_uniform([], s_op, 0, len(branches), tf.int32)
    image = tf.ensure_shape(tf.switch_case(op, branches), shape)
  return tf.clip_by_value(image, 0.0, 255.0)


# -------------------------------------------------------------- mixup/cutmix
def _sample_beta(seed, alpha):
  g = tf.random.stateless_gamma([2], seed, alpha=alpha)
  return g[0] / tf.maximum(g[0] + g[1], 1e-12)


def _mixup(images, labels, lam):
  mixed = lam * images + (1.0 - lam) * tf.roll(images, 1, axis=0)
  return mixed, lam * labels + (1.0 - lam) * tf.roll(labels, 1, axis=0)


def _cutmix(images, labels, lam, seed):
  """Pastes a box from the partner image; label weight = kept area."""
  h, w = tf.shape(images)[1], tf.shape(images)[2]
  hf, wf = tf.cast(h, tf.float32), tf.cast(w, tf.float32)
  ratio = tf.sqrt(1.0 - lam)
  center = tf.random.stateless_uniform([2], seed) * tf.stack([hf, wf])
  half = tf.stack([hf, wf]) * ratio / 2.0
  lo = tf.cast(tf.clip_by_value(center - half, 0, [hf, wf]), tf.int32)
  hi = tf.cast(tf.clip_by_value(center + half, 0, [hf, wf]), tf.int32)
  rows = tf.range(h)[:, None]
  cols = tf.range(w)[None, :]
  box = ((rows >= lo[0]) & (rows < hi[0]) & (cols >= lo[1]) & (cols < hi[1]))
  mixed = tf.where(box[None, :, :, None], tf.roll(images, 1, axis=0), images)
  area = tf.cast(tf.reduce_prod(hi - lo), tf.float32)
  kept = 1.0 - area / (hf * wf)
  return mixed, kept * labels + (1.0 - kept) * tf.roll(labels, 1, axis=0)


def mix_batch(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor,
              mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
              ) -> tuple[tf.Tensor, tf.Tensor]:
  """Mixup and/or CutMix on a batch; each image is mixed with its neighbour.

  One mixing weight per batch (as in big_vision's mixup); with both alphas
  set, each batch uses one of the two with probability 1/2 (as in timm).
  `labels` must be one-hot/soft [B, C]; they are mixed with the same weight.
  """
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return images, labels
  s_choice, s_mix, s_cut, s_box = split_seed(seed, 4)
  do_mixup = lambda: _mixup(images, labels, _sample_beta(s_mix, mixup_alpha))
  do_cutmix = lambda: _cutmix(images, labels,
                              _sample_beta(s_cut, cutmix_alpha), s_box)
  if cutmix_alpha <= 0:
    return do_mixup()
  if mixup_alpha <= 0:
    return do_cutmix()
  use_cutmix = tf.random.stateless_uniform([], s_choice) < 0.5
  return tf.cond(use_cutmix, do_cutmix, do_mixup)


def one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Variable-length label list (e.g. ImageNet ReaL) -> bool [num_classes]."""
  hot = tf.reduce_sum(one_hot(labels, num_classes), axis=0)
  return tf.reshape(hot > 0, [num_classes])


def as_size(image_size: int | Sequence[int]) -> Size:
  if isinstance(image_size, int):
    return (image_size, image_size)
  h, w = image_size
  return (int(h), int(w))
