"""Per-device figures of a slice's chips or GPUs, and the GPU roofline.

XLA:GPU gives no cost analysis, so a GPU step's time bound is a roofline:
the larger of its FLOPs at the bf16 dense peak and its HBM traffic
(`kernels.bytes_moved`) at the HBM bandwidth. It ignores collectives
(NVLink / network), kernel launch gaps and every FLOP outside matmuls, so a
real step is slower; MFU at the bound is its upper limit.
"""
import os
from typing import Any

from vit_jax.planning import chips
from vit_jax.planning import gpus
from vit_jax.planning import topology as topology_lib

# JAX's GPU allocator takes this share of a GPU's memory (preallocated or
# not): a program must fit in it, not in the whole HBM.
_GPU_MEMORY_FRACTION_DEFAULT = 0.75


def gpu_memory_fraction() -> float:
  """The share of a GPU's memory JAX will use, as the run will see it."""
  return float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION',
                              _GPU_MEMORY_FRACTION_DEFAULT))


def device_figures(hw: topology_lib.Slice) -> dict[str, Any]:
  """Peak FLOP/s, usable and physical memory, bandwidth per device."""
  if hw.platform == 'cuda':
    gpu = next(g for g in gpus.GPUS.values()
               if g.device_kind == hw.device_kind)
    return {'chip': gpu.name, 'peak': gpu.bf16_tflops * 1e12,
            'hbm': int(gpu.device_memory_size * gpu_memory_fraction()),
            'hbm_physical': gpu.device_memory_size,
            'bandwidth': gpu.hbm_bytes_per_s, 'source': gpu.source}
  chip = chips.chip(hw.device_kind)
  per_chip = hw.devices_per_chip
  return {'chip': chip.name, 'peak': chip.bf16_tflops * 1e12 / per_chip,
          'hbm': chip.hbm_bytes // per_chip,
          'hbm_physical': chip.hbm_bytes // per_chip, 'bandwidth': None,
          'source': chip.source}


def roofline(flops: float, bytes_moved: int,
             device: dict[str, Any]) -> dict[str, Any]:
  """The roofline's terms of a GPU step of `flops` moving `bytes_moved`."""
  compute_s = flops / device['peak']
  memory_s = bytes_moved / device['bandwidth']
  return {'compute_s': compute_s, 'memory_s': memory_s,
          'bytes_moved_per_device': bytes_moved,
          'hbm_bytes_per_s': device['bandwidth'],
          'limited_by': 'compute' if compute_s >= memory_s else 'memory'}
