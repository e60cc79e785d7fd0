"""One process of the 2-process input-pipeline test (4 CPU devices each).

Usage: python input_multiprocess_worker.py PROCESS_ID NUM_PROCESSES PORT
           FOLDER_ROOT TFDS_DATA_DIR_OR_EMPTY OUT_JSON
Writes what the global batches held (gathered from all processes) to OUT_JSON
(and, with CIFAR, global-order training batches to OUT_JSON's .npz twin).
"""
import json
import os
import sys

os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=4'
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


def gather(x: jax.Array) -> np.ndarray:
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def eval_fingerprints(ds, split, data_dir, batch, size, sharding, ip):
  """(label, pixel-sum fingerprint) of every masked-in example, all processes."""
  rows, num_batches = [], 0
  for b in ip.eval_iterator(ds, split=split, data_dir=data_dir,
                            global_batch_size=batch, image_size=size,
                            sharding=sharding):
    num_batches += 1
    image, label, mask = gather(b['image']), gather(b['label']), gather(b['mask'])
    pixels = np.rint((image.astype(np.float64) + 1) * 127.5)
    if ds.startswith('imagefolder:'):  # Constant-colour images: the colour.
      fp = pixels[:, 0, 0, 0]
    else:  # Identity resize: the exact sum of the uint8 pixels.
      fp = pixels.reshape(len(image), -1).sum(1)
    rows += [(int(l), int(f)) for l, f, m in zip(label, fp, mask) if m]
  return rows, num_batches


def main():
  pid, nproc, port, folder, tfds_dir, out = sys.argv[1:]
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(f'127.0.0.1:{port}', num_processes=int(nproc),
                             process_id=int(pid))
  from vit_jax.data import pipeline as ip  # After jax.distributed.
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  sharding = NamedSharding(mesh, P('data'))
  result = {'process_count': jax.process_count(),
            'device_count': jax.device_count()}

  # Eval over an image folder: the constant colour of each image is its id.
  rows, n = eval_fingerprints(f'imagefolder:{folder}', 'test', None, 8, 8,
                              sharding, ip)
  result['folder_eval'] = {'rows': rows, 'batches': n}

  # Train over the folder: first epoch across both processes.
  it = ip.train_iterator(f'imagefolder:{folder}', split='train', data_dir=None,
                         global_batch_size=8, image_size=8, sharding=sharding,
                         seed=3)
  values, local_values = [], []
  for _ in range(3):
    b = next(it)
    local = np.concatenate([np.asarray(s.data) for s in
                            sorted(b['image'].addressable_shards,
                                   key=lambda s: s.index[0].start)])
    local_values += np.rint((local[:, 0, 0, 0] + 1) * 127.5).astype(int).tolist()
    values += np.rint((gather(b['image'])[:, 0, 0, 0] + 1) * 127.5).astype(
        int).tolist()
    result['train_shape'] = list(b['image'].shape)
    result['train_label_shape'] = list(b['label'].shape)
  result['train_values'] = values
  result['train_local_values'] = local_values
  result['train_examples'] = it.examples

  if tfds_dir:
    rows, n = eval_fingerprints('cifar10', 'test[:203]', tfds_dir, 16, 32,
                                sharding, ip)
    result['cifar_eval'] = {'rows': rows, 'batches': n}
    # Global order: the test compares these with a 1-process run's batches.
    kw = dict(split='train[:2%]', data_dir=tfds_dir, global_batch_size=16,
              image_size=32, sharding=sharding, seed=5, global_order=True)
    it = ip.train_iterator('cifar10', **kw)
    batches = [next(it) for _ in range(3)]
    resumed = next(ip.train_iterator('cifar10', start_example=2 * 16, **kw))
    np.savez(out.replace('.json', '.npz'),
             image=[gather(b['image']) for b in batches],
             label=[gather(b['label']) for b in batches],
             resumed_image=gather(resumed['image']),
             resumed_label=gather(resumed['label']))

  errors = {}
  replicated = NamedSharding(mesh, P())
  for name, batch, shard in (('odd_processes', 3, replicated),
                             ('odd_devices', 6, sharding),
                             ('replicated_rows', 4, replicated)):
    try:
      ip.eval_iterator(f'imagefolder:{folder}', split='test', data_dir=None,
                       global_batch_size=batch, image_size=8, sharding=shard)
      errors[name] = None
    except ValueError as e:
      errors[name] = str(e)
  result['errors'] = errors
  with open(out, 'w') as f:
    json.dump(result, f)
  jax.distributed.shutdown()


if __name__ == '__main__':
  main()
