"""Accelerator plugins installed where no accelerator is: silent and free.

libtpu (in `vit_jax[tpu]`, so in `[test]`) and the CUDA plugin
(`vit_jax[cuda]`) are also installed on machines that only plan for TPUs and
GPUs. JAX then probes for their devices at the first use of any backend: on
a machine without TPUs libtpu prints `Failed to find host bounds ...`,
`E0000 ... TPU_WORKER_HOSTNAMES` and a `Source Location Trace`, and the
allocator setting of `host_memory` stands down because an accelerator might
compute.

So the programs (`vit_jax.cli.run`, before JAX starts) look for the devices
themselves: on Linux, with JAX_PLATFORMS unset, an accelerator plugin
installed and none of the device files of a TPU (/dev/accel*, /dev/vfio/<n>),
an NVIDIA GPU (/dev/nvidia<n>) or an AMD GPU (/dev/kfd) present, they set
JAX_PLATFORMS=cpu for their own process, which is what JAX would end up
computing on. A user's JAX_PLATFORMS always wins; library users who import
vit_jax into their own process set it themselves (README).
"""
import glob
import os
import sys
from collections.abc import MutableMapping

from vit_jax.cli import host_memory

DEVICE_FILES = ('/dev/accel*', '/dev/vfio/[0-9]*', '/dev/nvidia[0-9]*',
                '/dev/kfd')


def present_devices() -> list[str]:
  """Device files of TPUs or GPUs on this machine."""
  return sorted(path for pattern in DEVICE_FILES for path in glob.glob(pattern))


def cpu_only_platforms(environ: MutableMapping[str, str] = os.environ
                       ) -> str | None:
  """Sets JAX_PLATFORMS=cpu when plugins are installed but no accelerator is
  (module docstring); returns the plugins it kept quiet, or None."""
  if (not sys.platform.startswith('linux') or environ.get('JAX_PLATFORMS')
      or present_devices()):
    return None
  plugins = host_memory.accelerator_plugins()
  if not plugins:
    return None
  environ['JAX_PLATFORMS'] = 'cpu'
  if environ is os.environ and 'jax' in sys.modules:
    # jax read the variable when it was imported (a program's module-level
    # imports); no backend has started yet, so its config still decides.
    sys.modules['jax'].config.update('jax_platforms', 'cpu')
  return ', '.join(plugins)
