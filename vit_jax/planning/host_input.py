"""What the hosts must feed: CPU cores for the input pipeline at a plan's bound.

A training step at its bound consumes `images/s per device x devices per
host` images per host and second; the host's tf.data pipeline decodes,
crops and augments them on its CPU cores. The per-core rates below are
measured by

    python experiments/benchmark_input.py --data ../shared/data

on the development machine (2-core AMD EPYC, 2026-11-21; images/s over both
cores / 2, experiments/README.md "Input pipeline throughput"), from the
sample ImageNet JPEGs (short side <= 256 px: full-size ILSVRC JPEGs decode
slower, so these rates are optimistic) and TFDS CIFAR-10. Evaluation and
inference read the same JPEGs without the random crop's savings: the crop
rate stands for them.
"""
import dataclasses
import math

import ml_collections


@dataclasses.dataclass(frozen=True)
class Rate:
  case: str
  images_per_s_per_core: float


RATES = {
    'jpeg_inception_crop': Rate(
        'ImageNet JPEG, inception crop 224 + flip', 819.0),
    'jpeg_inception_crop_randaugment': Rate(
        'ImageNet JPEG, inception crop 224 + flip + RandAugment(2, 10)', 432.0),
    'cifar10_32': Rate('CIFAR-10 PNG records, 32 px', 3278.0),
    'cifar10_224': Rate('CIFAR-10 PNG records, resized to 224 px', 1379.0),
}


def rate_for(config: ml_collections.ConfigDict, mode: str,
             image_size: int) -> Rate:
  """The measured case closest to the config's own preprocessing."""
  if config.dataset.startswith('cifar'):
    return RATES['cifar10_32' if image_size <= 32 else 'cifar10_224']
  if mode == 'train' and config.randaugment_layers > 0:
    return RATES['jpeg_inception_crop_randaugment']
  return RATES['jpeg_inception_crop']


def host_feed(config: ml_collections.ConfigDict, mode: str, image_size: int,
              images_per_s_per_host: float | None) -> dict:
  """The JSON `host_input` of a plan: the rate used and the cores needed."""
  rate = rate_for(config, mode, image_size)
  cores = (math.ceil(images_per_s_per_host / rate.images_per_s_per_core)
           if images_per_s_per_host else None)
  return {'case': rate.case,
          'images_per_s_per_core': rate.images_per_s_per_core,
          'images_per_s_per_host_at_bound': images_per_s_per_host,
          'cores_per_host': cores}
