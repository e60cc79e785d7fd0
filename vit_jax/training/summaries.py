"""TensorBoard scalar summaries, written without TensorFlow.

TensorBoard reads `events.out.tfevents.*` files: a sequence of `Event`
protocol buffers, each framed as a TFRecord (length, masked CRC-32C of the
length, data, masked CRC-32C of the data). flax.metrics.tensorboard and
tensorboard's own EventFileWriter import TensorFlow whenever it is
installed; this writer needs only the protocol buffers of the `tensorboard`
package.
"""
import contextlib
import os
import pathlib
import socket
import struct
import time

from absl import logging
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2

from vit_jax.base import files


def _crc32c_table() -> list[int]:
  table = []
  for i in range(256):
    crc = i
    for _ in range(8):
      crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)  # Castagnoli, reflected
    table.append(crc)
  return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
  crc = 0xFFFFFFFF
  for byte in data:
    crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
  return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
  crc = crc32c(data)
  return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
  length = struct.pack('<Q', len(data))
  return (length + struct.pack('<I', masked_crc32c(length)) + data
          + struct.pack('<I', masked_crc32c(data)))


class SummaryWriter:
  """Appends scalars to a new event file in `logdir`.

  Summaries are a view of the run, not part of it: when the file cannot be
  written (a full disk), one warning says so and the run goes on, stopping
  or not for its own reasons (its checkpoints report their own failures).
  """

  def __init__(self, logdir: str | os.PathLike):
    logdir = pathlib.Path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    self.path = logdir / (f'events.out.tfevents.{int(time.time())}.'
                          f'{socket.gethostname()}.{os.getpid()}.0')
    self._file = os.fdopen(files.open_regular(
        self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), 'ab')
    self._write(event_pb2.Event(wall_time=time.time(), step=0,
                                file_version='brain.Event:2'))

  def _guarded(self, action) -> None:
    if self._file is None:
      return
    try:
      action()
    except OSError as e:
      logging.warning('TensorBoard summaries stopped (%s: %s); the run goes '
                      'on without them.', self.path, e.strerror or e)
      with contextlib.suppress(OSError):
        self._file.close()
      self._file = None

  def _write(self, event: event_pb2.Event) -> None:
    record = tfrecord(event.SerializeToString())
    self._guarded(lambda: self._file.write(record))

  def scalar(self, tag: str, value: float, step: int) -> None:
    summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=tag, simple_value=float(value))])
    self._write(event_pb2.Event(wall_time=time.time(), step=int(step),
                                summary=summary))

  def flush(self) -> None:
    self._guarded(lambda: self._file.flush())

  def close(self) -> None:
    self._guarded(lambda: self._file.close())
    self._file = None
