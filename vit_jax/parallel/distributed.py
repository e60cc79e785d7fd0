"""Several processes (hosts): a bounded rendezvous, then jax.distributed.

`jax.distributed.initialize` waits for every process to register and, when
one never comes, aborts the process after its timeout without naming the
missing one. With an explicit coordinator address we first meet on the
coordinator's port ourselves: process 0 listens, the others announce their
process id, and when all are there process 0 says go and closes the port
for JAX's coordination service to take. Each side waits at most `wait_s`
(Ctrl-C stops the wait at once) and otherwise fails with one line naming the
coordinator and the missing process ids.

On CPU the processes' collectives run over gloo. When a process dies later,
JAX's coordination service aborts the others (after `heartbeat_timeout_s`
at most) with "another task died" rather than letting them hang.
"""
import json
import os
import socket
import time

from absl import logging
import jax

_POLL_S = 0.5
_REPORT_S = 30


class RendezvousError(RuntimeError):
  """Not every process arrived in time."""


def _split(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(':')
  if not host or not port.isdigit():
    raise ValueError(f'Coordinator address {address!r} must be host:port.')
  return host.strip('[]'), int(port)


def _serve(address: str, num_processes: int, wait_s: float) -> None:
  """Process 0: wait for processes 1..N-1 on the coordinator port."""
  host, port = _split(address)
  deadline, report = time.time() + wait_s, time.time() + _REPORT_S
  waiting: dict[int, socket.socket] = {}
  with socket.create_server(('', port), reuse_port=False) as server:
    server.settimeout(_POLL_S)
    try:
      while len(waiting) < num_processes - 1:
        missing = sorted(set(range(1, num_processes)) - set(waiting))
        if time.time() > deadline:
          raise RendezvousError(
              f'Process 0 waited {wait_s:.0f} s at coordinator {address} for '
              f'process(es) {", ".join(map(str, missing))} of {num_processes}, '
              'which did not start (or cannot reach it); start them with the '
              'same command and their --config.distributed.process_id, or '
              'raise --config.distributed.wait_s.')
        if time.time() > report:
          report = time.time() + _REPORT_S
          logging.info('Waiting at %s for process(es) %s of %d...', address,
                       ', '.join(map(str, missing)), num_processes)
        try:
          conn, _ = server.accept()
        except socket.timeout:
          continue
        conn.settimeout(10)
        try:
          hello = json.loads(conn.makefile().readline())
        except (OSError, ValueError):
          conn.close()
          continue
        if hello.get('num_processes') != num_processes:
          conn.sendall(b'mismatch\n')
          conn.close()
          raise RendezvousError(
              f'Process {hello.get("process_id")} was started with '
              f'num_processes={hello.get("num_processes")}, process 0 with '
              f'{num_processes}; start all with the same config.')
        waiting[int(hello['process_id'])] = conn
      for conn in waiting.values():
        conn.sendall(b'go\n')
      for conn in waiting.values():
        # Let each peer close first, so that no connection of ours lingers
        # on the port that JAX's coordination service binds next.
        conn.settimeout(5)
        try:
          conn.recv(1)
        except OSError:
          pass
    finally:
      for conn in waiting.values():
        conn.close()


def _join(address: str, process_id: int, num_processes: int,
          wait_s: float) -> None:
  """Processes 1..N-1: announce ourselves to process 0 and wait for go."""
  host, port = _split(address)
  deadline, report = time.time() + wait_s, time.time() + _REPORT_S
  hello = json.dumps({'process_id': process_id,
                      'num_processes': num_processes}).encode() + b'\n'
  while True:
    if time.time() > deadline:
      raise RendezvousError(
          f'Process {process_id} waited {wait_s:.0f} s for process 0 at '
          f'coordinator {address}, which did not answer; start it, check the '
          'address, or raise --config.distributed.wait_s.')
    if time.time() > report:
      report = time.time() + _REPORT_S
      logging.info('Waiting for process 0 at %s...', address)
    try:
      with socket.create_connection((host, port), timeout=_POLL_S) as conn:
        conn.sendall(hello)
        conn.settimeout(max(deadline - time.time(), _POLL_S))
        answer = conn.makefile().readline().strip()
    except (OSError, socket.timeout):
      time.sleep(_POLL_S)
      continue
    if answer == 'go':
      return
    if answer == 'mismatch':
      raise RendezvousError(
          f'Process 0 at {address} was started with another num_processes '
          f'than this process ({num_processes}); start all with the same '
          'config.')
    time.sleep(_POLL_S)  # process 0 restarted meanwhile: announce again


def initialize(dist) -> None:
  """jax.distributed when the config or the environment asks for it.

  `dist` is config.distributed. Must run before anything touches a JAX
  backend.
  """
  address = dist.coordinator_address or os.environ.get(
      'JAX_COORDINATOR_ADDRESS', '')
  if not (address or dist.auto):
    return
  # CPU devices of different processes talk through gloo (no effect on GPUs).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {'heartbeat_timeout_seconds': dist.heartbeat_timeout_s,
            'initialization_timeout': dist.wait_s}
  if dist.coordinator_address:
    if dist.num_processes > 1:
      if dist.process_id == 0:
        _serve(address, dist.num_processes, dist.wait_s)
      else:
        _join(address, dist.process_id, dist.num_processes, dist.wait_s)
    kwargs.update(coordinator_address=address,
                  num_processes=dist.num_processes, process_id=dist.process_id)
  jax.distributed.initialize(**kwargs)
