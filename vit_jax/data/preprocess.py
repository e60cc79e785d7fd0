"""TensorFlow image ops for the input pipeline (tf.data side only).

Decoding, crops, resizes, flips and label encodings; the training
augmentations built on them (RandAugment, mixup/cutmix) are in `augment`.

Every random op here is *stateless*: it takes an explicit `seed` (int32/int64
tensor of shape [2]) so that the output depends only on the seed and the input,
never on tf.data's parallelism or on how many elements ran before. The pipeline
derives one seed per example from (run seed, process, example index).

Images flow as float32 in [0, 255] until `to_unit_range` maps them to [-1, 1].
"""
from typing import Sequence

from vit_jax.data.tf import tf

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


def one_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  return tf.one_hot(tf.cast(labels, tf.int32), num_classes, dtype=tf.float32)


def multi_hot(labels: tf.Tensor, num_classes: int) -> tf.Tensor:
  """Variable-length label list (e.g. ImageNet ReaL) -> bool [num_classes]."""
  hot = tf.reduce_sum(one_hot(labels, num_classes), axis=0)
  return tf.reshape(hot > 0, [num_classes])
