"""Accelerator plugins installed where no accelerator is cost nothing in the
programs (vit_jax.cli.accelerators): no libtpu lines, the CPU allocator
setting kept, a user's JAX_PLATFORMS respected."""
import os
import pathlib
import subprocess
import sys

import pytest
from PIL import Image

from vit_jax import sources
from vit_jax.cli import accelerators
from vit_jax.cli import host_memory

import test_pytorch_sources as pytorch_tests

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_NOISE = ('host bounds', 'TPU_WORKER_HOSTNAMES', 'Source Location Trace',
                'InitGoogle')
needs_plugin_without_device = pytest.mark.skipif(
    not host_memory.accelerator_plugins() or accelerators.present_devices()
    or not sys.platform.startswith('linux'),
    reason='needs an accelerator plugin (libtpu from [test]) installed on a '
           'Linux machine without TPU or GPU device files')


@needs_plugin_without_device
def test_plugins_without_devices_make_the_programs_compute_on_the_cpu():
  environ = {}
  assert accelerators.cpu_only_platforms(environ)  # names the plugins
  assert environ == {'JAX_PLATFORMS': 'cpu'}
  assert host_memory.skip_reason(environ) is None  # allocator setting kept
  user = {'JAX_PLATFORMS': 'tpu,cpu'}
  assert accelerators.cpu_only_platforms(user) is None
  assert user == {'JAX_PLATFORMS': 'tpu,cpu'}


def test_a_machine_with_device_files_is_left_to_jax(monkeypatch):
  monkeypatch.setattr(accelerators, 'present_devices',
                      lambda: ['/dev/nvidia0'])
  environ = {}
  assert accelerators.cpu_only_platforms(environ) is None
  assert environ == {}


@needs_plugin_without_device
def test_predict_prints_no_libtpu_lines(tmp_path):
  """After README's test install (libtpu in the environment) predict's
  stderr held five lines of libtpu start-up errors."""
  model = tmp_path / 'model'
  sources.write_export(pytorch_tests.tiny_source(), model, 'tiny',
                       formats=('npz',))
  photo = tmp_path / 'p.png'
  Image.new('RGB', (40, 40), (200, 30, 30)).save(photo)
  env = {k: v for k, v in os.environ.items() if k != 'JAX_PLATFORMS'}
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.predict', f'--model={model}',
       str(photo)], cwd=REPO, capture_output=True, text=True, timeout=600,
      env=env)
  assert result.returncode == 0, result.stderr
  assert not [l for l in result.stderr.splitlines()
              if any(n in l for n in LIBTPU_NOISE)], result.stderr
