"""The programs keep freed host memory (vit_jax.cli.host_memory) only in a
process the library owns that computes on the CPU: never on import, never
over the user's own allocator settings."""
import os
import platform
import subprocess
import sys

import pytest

from vit_jax import cli
from vit_jax.cli import host_memory

GLIBC = sys.platform.startswith('linux') and platform.libc_ver()[0] == 'glibc'

# Allocates, touches and frees 64 MiB blocks from two threads (as XLA's pool
# does with a step's temporaries), twice, and prints the minor page faults
# of the second pass. (malloc itself: numpy asks for huge pages.)
CHILD = '''
import ctypes, resource, sys, threading
if sys.argv[1] == 'program':
  from vit_jax.cli import host_memory
  print(host_memory.keep_freed_memory(), file=sys.stderr)
else:  # a library user's imports
  import vit_jax.cli, vit_jax.models  # noqa

libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]

def churn():
  for _ in range(4):
    block = libc.malloc(64 * 2**20)
    ctypes.memset(block, 1, 64 * 2**20)
    libc.free(block)

def two_threads():
  threads = [threading.Thread(target=churn) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()

two_threads()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
two_threads()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
'''
PAGES_PER_PASS = 2 * 4 * 64 * 2**20 // 4096  # 131072 at 4 KiB pages


def faults_of_second_pass(setup: str, **env: str) -> int:
  clean = {k: v for k, v in os.environ.items()
           if k not in host_memory.USER_SETTINGS and
           not k.startswith('MALLOC_') and k != 'JAX_PLATFORMS'}
  result = subprocess.run([sys.executable, '-c', CHILD, setup],
                          env={**clean, **env}, capture_output=True,
                          text=True, timeout=300, check=True)
  return int(result.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason='mallopt options are glibc\'s')
@pytest.mark.parametrize('setup,env,kept', [
    ('program', {'JAX_PLATFORMS': 'cpu'}, True),
    # The user's own setting, even empty, leaves glibc's defaults.
    ('program', {'JAX_PLATFORMS': 'cpu', 'GLIBC_TUNABLES': ''}, False),
    ('program', {'JAX_PLATFORMS': 'tpu,cpu'}, False),
    ('import', {'JAX_PLATFORMS': 'cpu'}, False),
])
def test_freed_blocks_are_reused_without_page_faults_only_when_kept(
    setup, env, kept):
  faults = faults_of_second_pass(setup, **env)
  if kept:
    assert faults < 0.02 * PAGES_PER_PASS, faults
  else:
    # glibc's defaults map each block afresh: every page faults again.
    assert faults > 0.5 * PAGES_PER_PASS, faults


@pytest.mark.parametrize('environ,plugins,reason', [
    ({}, [], None),
    ({'JAX_PLATFORMS': 'cpu'}, ['libtpu'], None),
    ({}, ['libtpu'], 'JAX may compute on an accelerator (libtpu'),
    ({'JAX_PLATFORMS': 'cuda,cpu'}, [], "JAX_PLATFORMS='cuda,cpu'"),
    ({'MALLOC_ARENA_MAX': '4'}, [], 'MALLOC_ARENA_MAX set'),
    ({'LD_PRELOAD': 'libtcmalloc.so'}, [], 'LD_PRELOAD set'),
    ({'GLIBC_TUNABLES': ''}, [], 'GLIBC_TUNABLES set'),
])
def test_skip_reasons(monkeypatch, environ, plugins, reason):
  monkeypatch.setattr(host_memory, 'accelerator_plugins', lambda: plugins)
  got = host_memory.skip_reason(environ)
  if not GLIBC:
    assert got == 'the C library is not glibc'
  elif reason is None:
    assert got is None
  else:
    assert reason in got


def test_every_program_configures_host_memory_on_start(monkeypatch):
  calls = []
  monkeypatch.setattr(host_memory, 'keep_freed_memory',
                      lambda: calls.append('memory') or 'kept')
  monkeypatch.setattr(sys, 'argv', ['vit-test'])
  # cli.run lends a console script's __main__ the program's docstring.
  monkeypatch.setattr(sys.modules['__main__'], '__doc__',
                      sys.modules['__main__'].__doc__)
  with pytest.raises(SystemExit) as exit_info:
    cli.run(lambda argv: calls.append('main'))
  assert exit_info.value.code in (0, None)
  assert calls == ['memory', 'main']
