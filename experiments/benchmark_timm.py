"""timm's side of `python experiments/benchmark.py --against=timm`.

The same architecture as our model (built from `vit_jax.interop.timm`'s
arguments, the code that exports our weights to timm: widths, GELU variant,
pooling), run the way a PyTorch user runs it on a CPU: `float32`, or
`bfloat16` under `torch.autocast` with float32 weights (our `bfloat16` cases
also keep float32 parameters and compute in bfloat16). `train` mirrors the
trainer's default step: cross-entropy, backward, global-norm clipping at the
config's grad_clip_norm, SGD with its momentum; `infer` is `model.eval()`
under `torch.inference_mode()`. Needs the `[parity]` extra (torch, timm).

timm runs in a worker process of its own (this file run as a script), driven
one step at a time, so the benchmark can interleave the two sides round by
round on the same cores. Both in one process slowed our train step twofold:
PyTorch's OpenMP threads and XLA's thread pool then contend for the cores.
"""
import importlib.util
import json
import subprocess
import sys
import time
from typing import Any, Callable


def available() -> str | None:
  """None where torch and timm can be imported, else why not."""
  missing = [name for name in ('torch', 'timm')
             if importlib.util.find_spec(name) is None]
  if missing:
    return (f'--against=timm needs {" and ".join(missing)}: '
            'pip install -e ".[parity]"')
  return None


def case_spec(model: Any, mode: str, batch: int, res: int, dtype: str,
              config: Any) -> dict[str, Any]:
  """What the worker needs to build a case: plain JSON, no jax objects."""
  # Imported here: the worker process needs neither jax nor vit_jax.
  from vit_jax.interop import timm as timm_interop  # pylint: disable=import-outside-toplevel
  size = (res, res)
  return {'architecture': timm_interop.architecture_name(model, size),
          'model_args': timm_interop.model_args(model, size), 'mode': mode,
          'batch': batch, 'res': res, 'dtype': dtype,
          'learning_rate': config.optimizer.learning_rate,
          'momentum': config.optimizer.momentum,
          'grad_clip_norm': config.grad_clip_norm}


class Worker:
  """The timm process: `build(spec)` a case, then time `step()`s of it."""

  def __init__(self):
    self._process = subprocess.Popen(
        [sys.executable, __file__], stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, text=True)
    self.versions = self._call({'versions': True})

  def _call(self, message: dict[str, Any]) -> Any:
    self._process.stdin.write(json.dumps(message) + '\n')
    self._process.stdin.flush()
    reply = self._process.stdout.readline()
    if not reply:
      raise RuntimeError(f'the timm worker died on {message} (its stderr '
                         'is above)')
    return json.loads(reply)

  def build(self, spec: dict[str, Any]) -> None:
    self._call({'build': spec})

  def step(self) -> float:
    """Seconds of one step, timed inside the worker."""
    return self._call({'step': True})

  def close(self) -> None:
    self._process.stdin.close()
    self._process.wait()


def build_step(spec: dict[str, Any]) -> Callable[[], None]:
  """(In the worker.) One timm step of the case, finished on return."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  net = timm.create_model(spec['architecture'], pretrained=False,
                          **spec['model_args'])
  images = torch.zeros(spec['batch'], 3, spec['res'], spec['res'])
  autocast = torch.autocast('cpu', dtype=torch.bfloat16,
                            enabled=spec['dtype'] == 'bfloat16')
  if spec['mode'] == 'infer':
    net.eval()

    def infer():
      with torch.inference_mode(), autocast:
        net(images)
    return infer

  net.train()
  labels = torch.zeros(spec['batch'], dtype=torch.long)
  optimizer = torch.optim.SGD(net.parameters(), lr=spec['learning_rate'],
                              momentum=spec['momentum'])

  def train():
    with autocast:
      loss = torch.nn.functional.cross_entropy(net(images), labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), spec['grad_clip_norm'])
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
  return train


def serve() -> None:
  """The worker's loop: one JSON request per line on stdin, one reply."""
  import timm  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  step = None
  for line in sys.stdin:
    request = json.loads(line)
    if 'versions' in request:
      reply = {'torch': torch.__version__, 'timm': timm.__version__,
               'torch_threads': torch.get_num_threads()}
    elif 'build' in request:
      step, reply = build_step(request['build']), 'built'
    else:
      start = time.perf_counter()
      step()
      reply = time.perf_counter() - start
    print(json.dumps(reply), flush=True)


if __name__ == '__main__':
  serve()
