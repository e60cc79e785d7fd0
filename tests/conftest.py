"""Test setup: 8 simulated CPU devices and the shared real-data directory."""
import os
import pathlib
import sys

# Must be set before jax is imported anywhere in the test process.
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # for `configs`
SHARED_DATA = pathlib.Path(
    os.environ.get('VIT_JAX_SHARED_DATA', REPO_ROOT.parent / 'shared' / 'data'))


@pytest.fixture(scope='session')
def shared_data() -> pathlib.Path:
  """`../shared/data` (real CIFAR-10 and ImageNet photos); skips where absent."""
  if not (SHARED_DATA / 'tensorflow_datasets' / 'cifar10').is_dir():
    pytest.skip(f'real data not found at {SHARED_DATA} (set VIT_JAX_SHARED_DATA '
                'or place the shared/ checkout beside the repo)')
  return SHARED_DATA


@pytest.fixture(scope='session')
def tfds_data_dir(shared_data) -> str:
  return str(shared_data / 'tensorflow_datasets')


@pytest.fixture(scope='session')
def imagenet_samples(shared_data) -> pathlib.Path:
  path = shared_data / 'imagenet_samples'
  if not path.is_dir():
    pytest.skip(f'ImageNet sample photos not found at {path}')
  return path
