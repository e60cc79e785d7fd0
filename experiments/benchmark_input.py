"""Input pipeline throughput (images/s and images/s per CPU core).

    python experiments/benchmark_input.py [--data ../shared/data] [--batches 20]

Cases: 224px Inception crop + flip from the real ImageNet JPEGs in
`<data>/imagenet_samples` (read through the image-folder source, so file
reads, JPEG crop-decoding and resizing all count), the same with
RandAugment(2, 10), the same all the way to a global jax.Array, and real
CIFAR-10 training batches at 32px and 224px. "Per core" divides by the CPU
cores this process may use (tf.data uses them all).
"""
import argparse
import os
import pathlib
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

from vit_jax.data import sources as data_sources  # noqa: E402
from vit_jax.data import pipeline as ip  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def imagenet_folder(samples: pathlib.Path, tmp: str) -> str:
  """root/train/<synset>/<photo> of symlinks to the 1,000 sample photos."""
  for photo in sorted(samples.glob('*.JPEG')):
    class_dir = pathlib.Path(tmp, 'train', photo.name.split('_')[0])
    class_dir.mkdir(parents=True, exist_ok=True)
    (class_dir / photo.name).symlink_to(photo)
  return f'imagefolder:{tmp}'


def rate(batches, batch_size: int, warmup: int, measured: int,
         repeats: int = 3) -> tuple[float, float]:
  """Median (images/s, images per CPU-second) over `repeats` windows.

  The `warmup` batches first fill the shuffle buffer and let tf.data's
  autotuner settle. Images per CPU-second (this process's CPU time, all
  threads) is the per-core cost, and unlike wall time it barely moves when
  other jobs share the machine.
  """
  for _ in range(warmup):
    jax.block_until_ready(next(batches))
  wall, cpu = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(measured):
      jax.block_until_ready(next(batches))
    wall.append(measured * batch_size / (time.perf_counter() - start))
    cpu.append(measured * batch_size / (time.process_time() - start_cpu))
  return float(np.median(wall)), float(np.median(cpu))


def host_stream(dataset: str, split: str, data_dir, batch: int, size: int,
                **kw):
  """The tf.data stream only (what feeds the devices), as numpy batches."""
  src = data_sources.open_source(dataset, data_dir, None)
  ds = ip.train_dataset(
      src, split, local_batch=batch, size=(size, size), seed=0,
      start_example=0, process_index=0, process_count=1,
      randaugment=kw.get('randaugment'), mixup_alpha=0.0, cutmix_alpha=0.0,
      shuffle_buffer=10_000, num_parallel_calls=-1)
  return ds.prefetch(2).as_numpy_iterator()


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--data', default=str(REPO.parent / 'shared' / 'data'))
  parser.add_argument('--batch', type=int, default=128)
  parser.add_argument('--warmup', type=int, default=5)
  parser.add_argument('--batches', type=int, default=20)
  args = parser.parse_args()
  cores = len(os.sched_getaffinity(0))
  data = pathlib.Path(args.data)
  tfds_dir = str(data / 'tensorflow_datasets')
  sharding = NamedSharding(jax.make_mesh((1,), ('data',)), P('data'))
  n = (args.batch, args.warmup, args.batches)
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    folder = imagenet_folder(data / 'imagenet_samples', tmp)
    cases = [
        ('ImageNet JPEG, inception crop 224 + flip (tf.data)',
         lambda: host_stream(folder, 'train', None, args.batch, 224)),
        ('ImageNet JPEG, + RandAugment(2, 10) (tf.data)',
         lambda: host_stream(folder, 'train', None, args.batch, 224,
                             randaugment=(2, 10))),
        ('ImageNet JPEG, inception crop 224 -> global jax.Array',
         lambda: ip.train_iterator(folder, split='train', seed=0,
                                   global_batch_size=args.batch,
                                   image_size=224, sharding=sharding)),
        ('CIFAR-10 train, 32px (tf.data)',
         lambda: host_stream('cifar10', 'train', tfds_dir, args.batch, 32)),
        ('CIFAR-10 train, 224px (tf.data)',
         lambda: host_stream('cifar10', 'train', tfds_dir, args.batch, 224)),
    ]
    for name, make in cases:
      wall, cpu = rate(make(), *n)
      results.append((name, wall, cpu))
      print(f'{name}: {wall:.0f} images/s, {cpu:.0f} images/CPU-s',
            flush=True)
  print(f'\n| case | images/s ({cores} cores, wall) | images/s/core (wall / '
        f'{cores}) | images per CPU-second |')
  print('| --- | ---: | ---: | ---: |')
  for name, wall, cpu in results:
    print(f'| {name} | {wall:.0f} | {wall / cores:.0f} | {cpu:.0f} |')


if __name__ == '__main__':
  main()
