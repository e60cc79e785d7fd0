"""Host memory of the programs: keep what the process frees (CPU-only runs).

XLA:CPU allocates a step's temporaries afresh on every execution. glibc's
malloc serves large blocks with fresh `mmap`s (or from per-thread arenas that
it trims) and hands them back to the kernel on `free`, so every step
first-touches gigabytes of new pages: on the 2-core development VM 1.5-2.8 s
of kernel time per 5-7 s ViT-B/16 train step (BENCHMARKS.md). With mmap off,
trimming off and one arena, freed blocks are reused: no page faults, the
step 25 % faster.

Applied by `vit_jax.cli.run`, that is only in processes the library owns
(`python -m vit_jax.main` and the other programs, the benchmark), never on
import; and only where:
- the C library is glibc (mallopt's options are glibc's);
- the user has not configured the allocator (GLIBC_TUNABLES, any MALLOC_*
  variable, or LD_PRELOAD, e.g. tcmalloc, set even to an empty value):
  `GLIBC_TUNABLES= python -m vit_jax.main ...` keeps glibc's defaults;
- JAX computes on the CPU: JAX_PLATFORMS names cpu first, or no accelerator
  plugin is installed. On accelerator hosts the step's temporaries live on
  the device, and one arena would make tf.data's many threads queue on one
  lock for nothing.

The cost: freed memory stays with the process, whose resident size holds at
its high-water mark, which for a training loop is its steady state anyway.
"""
import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys
from collections.abc import Mapping

# mallopt(3) parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -4, -8
USER_SETTINGS = ('GLIBC_TUNABLES', 'LD_PRELOAD')
KEPT = 'kept'


def accelerator_plugins() -> list[str]:
  """JAX plugins installed that may put computation off the CPU."""
  names = [entry.name for entry in
           importlib.metadata.entry_points(group='jax_plugins')]
  if importlib.util.find_spec('libtpu') is not None:
    names.append('libtpu')
  return names


def skip_reason(environ: Mapping[str, str]) -> str | None:
  """Why the allocator is left as it is, or None to configure it."""
  if not sys.platform.startswith('linux') or platform.libc_ver()[0] != 'glibc':
    return 'the C library is not glibc'
  user = [name for name in environ
          if name in USER_SETTINGS or name.startswith('MALLOC_')]
  if user:
    return f'the allocator is the user\'s ({", ".join(sorted(user))} set)'
  platforms = environ.get('JAX_PLATFORMS', '')
  if platforms:
    if platforms.split(',')[0].strip() != 'cpu':
      return f'JAX_PLATFORMS={platforms!r} is not cpu first'
  elif plugins := accelerator_plugins():
    return (f'JAX may compute on an accelerator ({", ".join(plugins)} '
            'installed; JAX_PLATFORMS=cpu says it will not)')
  return None


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> str:
  """Configures glibc's malloc to keep freed memory; returns 'kept' or why
  not. Call it before the process starts its threads' work."""
  reason = skip_reason(environ)
  if reason:
    return reason
  libc = ctypes.CDLL(None)  # the process's own C library
  # -1 as size_t: never trim. One arena: with XLA's threads on arenas of
  # their own the faults stayed (measured, ViT-B/16 train step: 2.8 s of
  # kernel time with the default arenas, 0.9 s with two, none with one).
  applied = [libc.mallopt(M_MMAP_MAX, 0), libc.mallopt(M_TRIM_THRESHOLD, -1),
             libc.mallopt(M_ARENA_MAX, 1)]
  return KEPT if all(applied) else 'mallopt refused the settings'
