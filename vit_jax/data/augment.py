"""Training augmentation: inception crop and flip, RandAugment, mixup/cutmix.

Stateless like the ops of `preprocess` it builds on: every random choice is
drawn from an explicit per-example (or per-batch) seed, so the output depends
only on the seed and the input. Images are float32 in [0, 255] until
`train_image` maps them to [-1, 1].
"""
import math

from vit_jax.data.tf import tf

from vit_jax.data import preprocess


def train_image(data: tf.Tensor, seed: tf.Tensor, size: preprocess.Size,
                randaug: tuple[int, float] | None = None,
                crop_min_area: float = 0.05) -> tf.Tensor:
  """Inception crop -> resize -> flip [-> RandAugment] -> [-1, 1]."""
  s_crop, s_flip, s_aug = preprocess.split_seed(seed, 3)
  image = preprocess.random_flip(
      preprocess.inception_crop(data, s_crop, size,
                                area_range=(crop_min_area, 1.0)), s_flip)
  if randaug:
    image = randaugment(image, s_aug, *randaug)
  return preprocess.to_unit_range(image)


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
  s_y, s_x = preprocess.split_seed(seed, 2)
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
    s_op, s_sign, s_cut = preprocess.split_seed(
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
  s_choice, s_mix, s_cut, s_box = preprocess.split_seed(seed, 4)
  do_mixup = lambda: _mixup(images, labels, _sample_beta(s_mix, mixup_alpha))
  do_cutmix = lambda: _cutmix(images, labels,
                              _sample_beta(s_cut, cutmix_alpha), s_box)
  if cutmix_alpha <= 0:
    return do_mixup()
  if mixup_alpha <= 0:
    return do_cutmix()
  use_cutmix = tf.random.stateless_uniform([], s_choice) < 0.5
  return tf.cond(use_cutmix, do_cutmix, do_mixup)
