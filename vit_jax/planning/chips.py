"""TPU chips: published bf16 peak FLOP/s and HBM per chip (docs/planning.md
gives the sources), keyed by the device_kind JAX reports."""
import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  bf16_tflops: float  # per chip
  hbm_bytes: int  # per chip
  source: str


CHIPS = {
    'TPU v2': Chip('v2', 45.0, 16 * GIB, 'secondary sources (unverified)'),
    'TPU v3': Chip('v3', 123.0, 32 * GIB, 'https://cloud.google.com/tpu/docs/v3'),
    'TPU v4': Chip('v4', 275.0, 32 * GIB, 'https://cloud.google.com/tpu/docs/v4'),
    'TPU v5 lite': Chip('v5e', 197.0, 16 * 10**9,
                        'https://cloud.google.com/tpu/docs/v5e'),
    'TPU v5': Chip('v5p', 459.0, 95 * 10**9,
                   'https://cloud.google.com/tpu/docs/v5p'),
    'TPU v6 lite': Chip('v6e', 918.0, 32 * 10**9,
                        'https://cloud.google.com/tpu/docs/v6e'),
}


def chip(device_kind: str) -> Chip:
  if device_kind not in CHIPS:
    raise ValueError(f'No peak FLOP/s or HBM known for {device_kind!r}; '
                     f'known: {", ".join(CHIPS)}.')
  return CHIPS[device_kind]
