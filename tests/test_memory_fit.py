"""A run that cannot fit is refused in one line before its state, batches or
input pipeline exist (vit_jax.training.memory): the figure XLA compiled, the
memory there is, the change to make. (Was: killed by the kernel after 20 s
for a batch of 10^9; at the final evaluation for an eval batch of 10^6.)"""
import pathlib
import re
import subprocess
import types

import jax
import pytest

from vit_jax.training import memory

import runs

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize('overrides, match', [
    ({'batch_size': 10**9},
     r'error: The train step needs [\d.]+ GiB \(8 devices x [\d.]+ GiB\): '
     r'state [\d.]+ \+ batch [\d.]+ \+ temporaries [\d.]+ GiB per device, '
     r'compiled by XLA; [\d.]+ GiB available on this host\. Lower '
     r'--config\.batch_size \(now 1000000000\)'),
    ({'eval_batch_size': 10**7},
     r'error: The eval step needs .* Lower --config\.eval_batch_size '
     r'\(now 10000000\) to \d+ or less\.'),
])
def test_a_step_that_cannot_fit_is_one_line_before_anything_runs(
    tfds_data_dir, tmp_path, overrides, match):
  workdir = tmp_path / 'run'
  result = subprocess.run(runs.cli(tfds_data_dir, workdir, **overrides),
                          cwd=REPO, capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 2, result.stderr[-3000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
  assert len(errors) == 1, result.stderr[-3000:]
  assert re.match(match, errors[0]), errors[0]
  assert 'Traceback' not in result.stderr
  # Nothing was written but the (released) lock: no config.json, event file
  # or checkpoints/.
  assert sorted(p.name for p in workdir.iterdir()) == ['LOCK']


def test_a_refused_config_leaves_no_workdir_behind(tfds_data_dir, tmp_path):
  workdir = tmp_path / 'new' / 'run'
  result = subprocess.run(
      runs.cli(tfds_data_dir, workdir, eval_split='tset'), cwd=REPO,
      capture_output=True, text=True, timeout=900)
  assert result.returncode == 2, result.stderr[-3000:]
  assert "Unknown or invalid split 'tset'" in result.stderr
  assert not (tmp_path / 'new').exists()


def test_the_hint_splits_the_batch_when_accumulation_fits(monkeypatch):
  gib = memory.GIB
  mesh = types.SimpleNamespace(devices=types.SimpleNamespace(size=1))
  monkeypatch.setattr(memory, 'available',
                      lambda _: (10 * gib, 'per fake device', 1))
  config = types.SimpleNamespace(batch_size=64, accum_steps=1,
                                 eval_batch_size=64)
  memory.check({'train': memory.Need(2 * gib, gib, 6 * gib)}, mesh, config)  # fits
  with pytest.raises(memory.DoesNotFitError, match=(
      r'The train step needs 15\.00 GiB: .* 10\.00 GiB per fake device\. '
      r'Lower --config\.batch_size \(now 64\), or split each batch with '
      r'--config\.accum_steps=2, or')):
    memory.check({'train': memory.Need(2 * gib, gib, 12 * gib)}, mesh, config)
  with pytest.raises(memory.DoesNotFitError, match='state alone'):
    memory.check({'train': memory.Need(11 * gib, 0, gib)}, mesh, config)
  with pytest.raises(memory.DoesNotFitError, match=(
      r'Lower --config\.eval_batch_size \(now 64\) to 42 or less')):
    memory.check({'eval': memory.Need(4 * gib, gib, 8 * gib)}, mesh, config)


def test_the_cpu_shares_the_hosts_memory_among_its_devices():
  mesh = jax.sharding.Mesh(jax.devices(), ('data',))
  memory_bytes, where, sharing = memory.available(mesh)
  assert where == 'available on this host'
  assert sharing == len(jax.devices())
  assert 0 < memory_bytes <= memory.host_available() * 1.5
