"""The train step's matmuls alone, chained as in the step: what they cost.

    python experiments/matmul_chain.py --models=ViT-B_16 --batch=8 --resolution=224

For a plain ViT of the registry, jits one function that runs only the matmuls
of a train step, forward layer after layer and backward in reverse, each
taking the previous one's output as in the real step, and times it as
`benchmark.py` does (median of --rounds after a warm-up, a square matmul probe
timed beside every round). Two cases per model, timed in the same rounds as
the real train step (`benchmark.py`'s), so that one process's conditions hold
for all three:

  dense            the q, k, v, out and MLP kernels: forward, dX and dW
  dense+attention  plus the attention core's batched matmuls (q kᵀ and
                   weights v, forward and backward) with the head-major copies
                   the model makes around them

The differences split the step's time without a profiler's guesswork: the
dense matmuls as XLA schedules them, what the attention core adds, and what
everything else adds (softmax, GELU, LayerNorm, residuals, loss, optimizer).
The chains run no model code and leave out the patch embedding and head
(under 1 % of the FLOPs).
"""
import argparse
import math
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchmark  # noqa: E402
from vit_jax.models import registry as model_registry  # noqa: E402


def matmul_chain(arch: dict, batch: int, resolution: int, attention: bool):
  """(jitted chain of the step's matmuls, its arguments)."""
  width, mlp, heads = arch['hidden_size'], arch['mlp_dim'], arch['num_heads']
  if arch.get('resnet_layers') is not None:
    raise ValueError('hybrid models have a ResNet stem: use a plain ViT.')
  tokens = math.prod(resolution // p for p in arch['patch_size']) + 1
  rows, head_dim = batch * tokens, width // heads
  keys = iter(jax.random.split(jax.random.key(0), 8))

  def kernel(fan_in, fan_out):  # unit-scale activations all the way through
    return jax.random.normal(next(keys), (fan_in, fan_out)) / math.sqrt(fan_in)

  params = {'qkvo': [kernel(width, width) for _ in range(4)],
            'mlp': [kernel(width, mlp), kernel(mlp, width)]}
  x = jax.random.normal(next(keys), (rows, width))
  to_heads = lambda t: t.reshape(batch, tokens, heads, head_dim).swapaxes(1, 2)
  from_heads = lambda t: t.swapaxes(1, 2).reshape(rows, width)

  def chain(params, x):
    (wq, wk, wv, wo), (w1, w2) = params['qkvo'], params['mlp']
    saved, grads = [], []
    for _ in range(arch['num_layers']):
      inputs = x
      q, k, v = inputs @ wq, inputs @ wk, inputs @ wv
      if attention:
        hq, hk, hv = map(to_heads, (q, k, v))
        weights = jnp.einsum('bhqd,bhkd->bhqk', hq, hk) / tokens
        mixed = from_heads(jnp.einsum('bhqk,bhkd->bhqd', weights, hv))
      else:
        hq = hk = hv = weights = None
        mixed = q + k + v
      mlp_in = x + mixed @ wo
      hidden = mlp_in @ w1
      x = mlp_in + hidden @ w2
      saved.append((inputs, mixed, mlp_in, hidden, hq, hk, hv, weights))
    grad = x
    for inputs, mixed, mlp_in, hidden, hq, hk, hv, weights in reversed(saved):
      grads += [hidden.T @ grad]
      d_hidden = grad @ w2.T
      grads += [mlp_in.T @ d_hidden]
      grad = grad + d_hidden @ w1.T
      grads += [mixed.T @ grad]
      d_mixed = grad @ wo.T
      if attention:
        dy = to_heads(d_mixed)
        d_weights = jnp.einsum('bhqd,bhkd->bhqk', dy, hv)
        dv = jnp.einsum('bhqk,bhqd->bhkd', weights, dy)
        dq = jnp.einsum('bhqk,bhkd->bhqd', d_weights, hk)
        dk = jnp.einsum('bhqk,bhqd->bhkd', d_weights, hq)
        d_qkv = map(from_heads, (dq, dk, dv))
      else:  # three different gradients, or XLA merges the dW matmuls
        d_qkv = (d_mixed, 0.5 * d_mixed, 0.25 * d_mixed)
      for w, d in zip((wq, wk, wv), d_qkv):
        grads += [inputs.T @ d]
        grad = grad + d @ w.T
    return grad, grads

  return jax.jit(chain), (params, x)


def main(argv: list[str]) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--models', type=lambda s: s.split(','),
                      default=['ViT-B_16'])
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--resolution', type=int, default=224)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--peak_size', type=int, default=2048)
  args = parser.parse_args(argv[1:])
  peak = benchmark.matmul_peak(args.peak_size, jnp.float32)
  step_args = benchmark.parse_args(['benchmark', '--mode=train'])
  print('model | case | batch | res | step_ms | gflop | tflop_per_s | '
        'peak_tflop_per_s | fraction_of_peak')
  for name in args.models:
    cases = {}
    for attention in (False, True):
      fn, inputs = matmul_chain(model_registry.get_model_config(name),
                                args.batch, args.resolution, attention)
      cases['dense+attention' if attention else 'dense'] = (
          fn.lower(*inputs).compile(), inputs, None)
    # The real train step (benchmark.py's), timed in the same rounds.
    fn, abstract, make, feed = benchmark.build_case(
        step_args, name, 'train', args.batch, args.resolution, 'float32',
        'none', 'xla', False)
    cases['train step'] = (fn.lower(*abstract).compile(), make(), feed)
    times = {case: [] for case in cases}
    peaks = []
    for _ in range(args.rounds + 1):  # round 0 warms up
      for case, (compiled, inputs, feed) in cases.items():
        start = time.perf_counter()
        out = jax.block_until_ready(compiled(*inputs))
        times[case].append(time.perf_counter() - start)
        if feed:  # the train step's state is donated: feed the new one
          cases[case] = (compiled, feed(out, inputs), feed)
      peaks.append(peak())
    for case, (compiled, _, _) in cases.items():
      flops = compiled.cost_analysis()['flops']
      steps = times[case][1:]
      step = statistics.median(steps)
      ratio = statistics.median(flops / s / p for s, p in zip(steps, peaks[1:]))
      print(f'{name} | {case} | {args.batch} | {args.resolution} | '
            f'{1e3 * step:.0f} | {flops / 1e9:.1f} | '
            f'{flops / step / 1e12:.3g} | '
            f'{statistics.median(peaks[1:]) / 1e12:.3g} | {ratio:.3f}',
            flush=True)


if __name__ == '__main__':
  main(sys.argv)
