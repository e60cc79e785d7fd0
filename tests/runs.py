"""Training runs for the tests: a tiny config, the CLI, and what runs leave."""
import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np

from configs import pretrain
from vit_jax.sources import workdir as vit_workdir
from vit_jax.training import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# A tiny model on a slice of real CIFAR-10: seconds per run on 2 cores.
TINY = {
    'model.num_layers': 1, 'model.hidden_size': 32, 'model.mlp_dim': 64,
    'model.num_heads': 2, 'model.patch_size': 8, 'train_split': 'train[:2%]',
    'eval_split': 'test[:200]', 'batch_size': 16, 'eval_batch_size': 40,
    'total_steps': 6, 'log_every': 1, 'checkpoint_every': 2,
    'schedule.warmup_steps': 2, 'optimizer.learning_rate': 3e-3,
}


def tiny_config(data_dir: str, **overrides):
  return config_lib.with_overrides(pretrain.get_config('cifar10_quick'), {
      **TINY, 'data_dir': data_dir, **overrides})


def cli(data_dir: str, workdir, **overrides) -> list[str]:
  args = [sys.executable, '-m', 'vit_jax.main',
          '--config=configs/pretrain.py:cifar10_quick', f'--workdir={workdir}']
  for key, value in {**TINY, 'data_dir': data_dir, **overrides}.items():
    args.append(f'--config.{key}={value}')
  return args


def final_params(workdir) -> dict:
  """The parameters of the newest checkpoint in `workdir`."""
  return jax.device_get(vit_workdir.load_workdir(workdir).params)


def losses(result) -> np.ndarray:
  return np.array([loss for _, loss in result['train_loss_history']])


def wait_for(predicate, proc, timeout=300):
  start = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError(f'run ended early with status {proc.returncode}: '
                           f'{proc.stdout.read()}')
    if time.time() - start > timeout:
      proc.kill()
      raise AssertionError('timed out')
    time.sleep(0.2)


def complete_steps(workdir) -> list[int]:
  directory = pathlib.Path(workdir) / 'checkpoints'
  return sorted(int(p.name) for p in directory.glob('*') if p.name.isdigit())


def start(args: list[str], **kwargs) -> subprocess.Popen:
  """A process in the repo root; stdout and stderr together, as text."""
  return subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, **kwargs)


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def start_processes(data_dir: str, workdir, num_processes: int,
                    devices_each: int, **overrides) -> list[subprocess.Popen]:
  """One multi-process CLI run on this machine (gloo over localhost)."""
  port = free_port()
  env = {**os.environ,
         'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices_each}'}
  return [start(cli(data_dir, workdir, **overrides, **{
      'distributed.coordinator_address': f'127.0.0.1:{port}',
      'distributed.num_processes': num_processes,
      'distributed.process_id': pid}), env=env)
          for pid in range(num_processes)]
