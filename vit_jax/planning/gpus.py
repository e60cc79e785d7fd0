"""NVIDIA GPUs: published figures and the target description XLA compiles for.

Each GPU has its published bf16 dense peak, HBM size and bandwidth (with the
page each number comes from; NVIDIA gives peaks "with sparsity", which are
twice the dense ones), and the device fields of XLA's `GpuTargetConfig` text
proto, taken from XLA's own descriptions of the GPUs it tests on
(openxla/xla: xla/backends/gpu/target_config/specs/*.txtpb, formerly
xla/tools/hlo_opt/gpu_specs/) except the L4's, written from NVIDIA's
datasheet. Only the fields jaxlib 0.10.2 parses are written: the newer
files' per-dtype unit rates and ACCELERATED_FEATURES are not known to it.
"""
import dataclasses

GB = 10**9
# What the compile reports as its toolchain: cuDNN 9.8 and CUDA 12.8, the
# versions jax[cuda12]==0.10.2 installs (cuDNN's version decides which
# fused-attention kernels XLA may choose).
_DNN = (9, 8)
_RUNTIME = (12, 8)


@dataclasses.dataclass(frozen=True)
class Gpu:
  """One GPU: published figures (per GPU) and its target description."""
  name: str
  device_kind: str  # what JAX reports as device_kind
  bf16_tflops: float  # dense
  hbm_bytes: int
  hbm_bytes_per_s: float
  source: str
  # XLA's device fields (gpu_device_info).
  compute_capability: tuple[int, int]
  core_count: int
  fpus_per_core: int
  clock_rate_ghz: float
  device_memory_size: int
  l2_cache_size: int
  shared_memory_per_core: int
  shared_memory_per_block_optin: int
  threads_per_core_limit: int = 2048

  def target_config(self) -> str:
    """The GpuTargetConfig text proto JAX's topology API takes."""
    major, minor = self.compute_capability
    return f'''gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {self.shared_memory_per_core}
  threads_per_core_limit: {self.threads_per_core_limit}
  core_count: {self.core_count}
  fpus_per_core: {self.fpus_per_core}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {int(self.hbm_bytes_per_s)}
  l2_cache_size: {self.l2_cache_size}
  clock_rate_ghz: {self.clock_rate_ghz}
  device_memory_size: {self.device_memory_size}
  shared_memory_per_block_optin: {self.shared_memory_per_block_optin}
  cuda_compute_capability {{ major: {major} minor: {minor} }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: {_DNN[0]} minor: {_DNN[1]} }}
runtime_version {{ major: {_RUNTIME[0]} minor: {_RUNTIME[1]} }}
device_description_str: "{self.device_kind}"
'''


_A100 = ('https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/'
         'pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf (SXM: BF16 '
         'Tensor Core 312 TFLOPS dense)')
_HOPPER = dict(compute_capability=(9, 0), core_count=132, fpus_per_core=128,
               clock_rate_ghz=1.98, l2_cache_size=52428800,
               shared_memory_per_core=233472,
               shared_memory_per_block_optin=232448)
_AMPERE = dict(compute_capability=(8, 0), core_count=108, fpus_per_core=64,
               clock_rate_ghz=1.41, l2_cache_size=41943040,
               shared_memory_per_core=167936,
               shared_memory_per_block_optin=166912)

GPUS = {
    'h100': Gpu(
        'h100', 'NVIDIA H100 80GB HBM3', 989.0, 80 * GB, 3.35e12,
        'https://www.nvidia.com/en-us/data-center/h100/ (H100 SXM: BF16 '
        'Tensor Core 1,979 TFLOPS with sparsity, 80 GB, 3.35 TB/s)',
        device_memory_size=84942979072, **_HOPPER),
    'h200': Gpu(
        'h200', 'NVIDIA H200 141GB HBM3e', 989.0, 141 * GB, 4.8e12,
        'https://www.nvidia.com/en-us/data-center/h200/ (H200 SXM: BF16 '
        'Tensor Core 1,979 TFLOPS with sparsity, 141 GB, 4.8 TB/s)',
        device_memory_size=151397597184, **_HOPPER),
    'a100-40g': Gpu(
        'a100-40g', 'NVIDIA A100-SXM4-40GB', 312.0, 40 * GB, 1.555e12,
        _A100 + ', 40 GB HBM2, 1,555 GB/s)',
        device_memory_size=42331013120, **_AMPERE),
    'a100-80g': Gpu(
        'a100-80g', 'NVIDIA A100-SXM4-80GB', 312.0, 80 * GB, 2.039e12,
        _A100 + ', 80 GB HBM2e, 2,039 GB/s)',
        device_memory_size=85100068864, **_AMPERE),
    'b200': Gpu(
        'b200', 'NVIDIA B200', 2250.0, 180 * GB, 7.7e12,
        'https://www.nvidia.com/en-us/data-center/hgx/ (HGX B200, 8 GPUs: '
        'FP16/BF16 Tensor Core 36 PFLOPS with sparsity, 1.4 TB HBM3e; per '
        'GPU 2.25 PFLOPS dense, 180 GB, 7.7 TB/s)',
        compute_capability=(10, 0), core_count=148, fpus_per_core=128,
        clock_rate_ghz=1.965, device_memory_size=191514411008,
        l2_cache_size=132644864, shared_memory_per_core=233472,
        shared_memory_per_block_optin=232448),
    'l4': Gpu(
        'l4', 'NVIDIA L4', 121.0, 24 * GB, 300e9,
        'https://www.nvidia.com/en-us/data-center/l4/ (BF16 Tensor Core '
        '242 TFLOPS with sparsity, 24 GB GDDR6, 300 GB/s)',
        compute_capability=(8, 9), core_count=58, fpus_per_core=128,
        clock_rate_ghz=2.04, device_memory_size=23580639232,
        l2_cache_size=50331648, shared_memory_per_core=102400,
        shared_memory_per_block_optin=101376, threads_per_core_limit=1536),
}


def gpu(name: str) -> Gpu:
  """The GPU called `name` (a key of GPUS); KeyError if unknown."""
  return GPUS[name]
