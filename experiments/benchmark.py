"""Model throughput, compile time, memory and MFU on this machine's backend.

    python experiments/benchmark.py --models=ViT-B_16 --batch=8 --mode=train,infer
    python experiments/benchmark.py --models=ViT-H_14 --batch=64 --mode=train \
        --scan_layers --remat_policy=none,dots,full --compile_only

Every combination of the comma-separated --models, --batch, --resolution,
--dtype, --mode, --remat_policy, --attention_impl and the ";"-separated --xla
option sets is one case. `train` is the
trainer's own step (`vit_jax.training.steps.make_train_step`: loss, gradients, global
norm clipping and the optimizer update, donated state); `infer` is
`model.apply(train=False)`. Each case is compiled once (lowering and XLA
compile timed apart, peak memory from the compiled executable's
memory_analysis, FLOPs from XLA's cost_analysis), then run --warmup times and
timed --rounds times. Each round also times a square --peak_size matmul of the
same dtype on the same device, so MFU = (step FLOP/s) / (matmul FLOP/s) is a
ratio of rates measured side by side (still, quote a quiet machine: other
processes slow the short matmul more than a long step). Reported: medians
over rounds, and the kernel time per step (on CPU mostly page faults of the
step's fresh temporaries; see BENCHMARKS.md for the allocator). --compile_only
stops after compiling (no parameters are allocated), which is how ViT-H/14's
memory is read on a CPU.

    python experiments/benchmark.py --against=timm --dtype=float32,bfloat16

also builds each case's model in timm (experiments/benchmark_timm.py, in a
worker process) and times its step right after ours in every round, on the
same cores: `speedup` = timm's step time / ours, the median of per-round
ratios.
"""
import argparse
import datetime
import functools
import itertools
import json
import os
import pathlib
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # configs

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import benchmark_timm  # noqa: E402

from configs import common  # noqa: E402
from vit_jax import models  # noqa: E402
from vit_jax.cli import host_memory as cli_host_memory  # noqa: E402
from vit_jax.models import matmul as matmul_lib  # noqa: E402
from vit_jax.training import objectives  # noqa: E402
from vit_jax.training import optim  # noqa: E402
from vit_jax.training import state as train_state  # noqa: E402
from vit_jax.training import steps  # noqa: E402

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
# Large enough to reach the backend's matmul peak, small enough to be quick.
PEAK_SIZES = {'cpu': 2048, 'gpu': 8192, 'tpu': 8192}
COLUMNS = ('model_name', 'mode', 'batch', 'res', 'dtype', 'remat', 'attn',
           'img_per_s', 'step_ms', 'sys_ms_per_step', 'compile_s', 'mem_gib',
           'gflop', 'tflop_per_s', 'peak_tflop_per_s', 'mfu', 'xla',
           'against_ms', 'speedup')


def timed(fn: Callable[[], Any]) -> float:
  """Seconds for fn() with its outputs ready on the device."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def matmul_peak(size: int, dtype) -> Callable[[], float]:
  """A () -> FLOP/s probe: one size^3 matmul, best of 5 (a peak, not a mean),
  written as the model writes its products (float32 accumulation)."""
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  matmul = jax.jit(functools.partial(matmul_lib.einsum, 'ij,jk->ik'))
  jax.block_until_ready(matmul(a, a))
  return lambda: 2 * size**3 / min(timed(lambda: matmul(a, a))
                                   for _ in range(5))


def trainer_config(args: argparse.Namespace, model_name: str, batch: int):
  """The trainer's defaults (SGD momentum, clip 1.0) with the chosen optimizer."""
  config = common.get_config()
  config.model_name = model_name
  config.batch_size = batch
  config.optimizer.name = args.optimizer
  return config


def case_model(model_name: str, dtype: str, remat: str, attn: str,
               scan_layers: bool, **unused):
  del unused
  return models.create_model(
      model_name, 1000, dtype=DTYPES[dtype], remat_policy=remat,
      attention_impl=attn, scan_layers=scan_layers)


def build_case(args, model_name: str, mode: str, batch: int, res: int,
               dtype: str, remat: str, attn: str, scan_layers: bool):
  """(jitted fn, abstract args, concrete-args factory, feed) for one case."""
  model = case_model(model_name, dtype, remat, attn, scan_layers)
  images = jax.ShapeDtypeStruct((batch, res, res, 3), jnp.float32)
  if mode == 'infer':
    init = lambda: {'params': model.init(jax.random.key(0), jnp.zeros(
        images.shape))['params']}
    fn = jax.jit(lambda v, x: model.apply(v, x, train=False))
    inputs = (jax.eval_shape(init), images)
    make = lambda: (jax.jit(init)(), jnp.zeros(images.shape))
    return fn, inputs, make, None
  config = trainer_config(args, model_name, batch)
  total_steps = 10_000
  schedule = optim.create_schedule(config, total_steps)
  tx = optim.create_optimizer(config, schedule)
  objective = objectives.Classification(model, config.label_smoothing)
  init = train_state.make_init_fn(objective, tx, (res, res))
  fn = jax.jit(steps.make_train_step(objective, tx, schedule),
               donate_argnums=0)
  labels = jax.ShapeDtypeStruct((batch, 1000), jnp.float32)
  batch_of = lambda: {'image': jnp.zeros(images.shape),
                      'label': jax.nn.one_hot(jnp.zeros(batch, jnp.int32),
                                              1000)}
  abstract = (jax.eval_shape(init, jax.random.key(0)),
              {'image': images, 'label': labels})
  make = lambda: (jax.jit(init)(jax.random.key(0)), batch_of())
  # The train step returns (state, metrics): feed the new state back in.
  return fn, abstract, make, lambda out, inputs: (out[0], inputs[1])


def memory_bytes(compiled) -> tuple[int | None, int | None]:
  """(arguments + outputs + temporaries - donated, XLA's own peak) in bytes.

  The first is what must fit on the device; XLA's `peak_memory_in_bytes`
  is kept beside it because on some backends (CPU) it leaves out the
  temporaries.
  """
  stats = compiled.memory_analysis()
  if stats is None:
    return None, None
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes +
          stats.temp_size_in_bytes - stats.alias_size_in_bytes,
          stats.peak_memory_in_bytes)


def compiler_options(spec: str) -> dict[str, Any]:
  """'name=value,name=value' -> XLA debug options for one compile."""
  options = {}
  for item in filter(None, spec.split(',')):
    name, _, value = item.partition('=')
    options[name] = {'true': True, 'false': False}.get(value.lower(), value)
  return options


def run_case(args, peak_probe, against: benchmark_timm.Worker | None,
             xla: str, **case) -> dict[str, Any]:
  fn, abstract, make, feed = build_case(args, **case)
  start = time.perf_counter()
  lowered = fn.lower(*abstract)
  lower_s = time.perf_counter() - start
  compiled = lowered.compile(compiler_options=compiler_options(xla))
  compile_s = time.perf_counter() - start - lower_s
  flops = (compiled.cost_analysis() or {}).get('flops')
  if case['scan_layers']:
    # XLA counts a while loop's body once: count the unrolled twin instead.
    twin, twin_args = build_case(args, **dict(case, scan_layers=False))[:2]
    flops = twin.lower(*twin_args).cost_analysis()['flops']
  mem, xla_peak = memory_bytes(compiled)
  row = dict(case, xla=xla, lower_s=lower_s, xla_compile_s=compile_s,
             compile_s=lower_s + compile_s, flops_per_step=flops,
             gflop=flops / 1e9 if flops else None,
             mem_bytes=mem, xla_peak_bytes=xla_peak,
             mem_gib=mem / 2**30 if mem else None)
  if args.compile_only:
    return row
  inputs = make()
  if against:
    against.build(benchmark_timm.case_spec(
        case_model(**case), case['mode'], case['batch'], case['res'],
        case['dtype'], trainer_config(args, case['model_name'],
                                      case['batch'])))
  steps, peaks, faults, sys_s, against_s = [], [], [], [], []
  for i in range(args.warmup + args.rounds):
    usage = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    out = compiled(*inputs)
    jax.block_until_ready(out)
    step = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    if feed:
      inputs = feed(out, inputs)
    if i >= args.warmup:
      steps.append(step)
      # Minor page faults and kernel time: first touches of freshly mapped
      # temporaries, a CPU-side cost that no FLOP count shows.
      faults.append(after.ru_minflt - usage.ru_minflt)
      sys_s.append(after.ru_stime - usage.ru_stime)
      peaks.append(peak_probe())
    if against:
      # Interleaved: each round times timm right after our step, so both
      # see the same machine.
      seconds = against.step()
      if i >= args.warmup:
        against_s.append(seconds)
  if args.profile:
    # One more step, traced: per-thunk times on the host timeline (open the
    # perfetto_trace.json.gz in ui.perfetto.dev or TensorBoard's profiler).
    # hlo.txt beside it names each thunk's model code for
    # experiments/profile_breakdown.py.
    case_dir = pathlib.Path(args.profile, f"{case['model_name']}_{case['mode']}")
    with jax.profiler.trace(str(case_dir), create_perfetto_trace=True):
      jax.block_until_ready(compiled(*inputs))
    (case_dir / 'hlo.txt').write_text(compiled.as_text())
  step = statistics.median(steps)
  # Measured by the allocator where the backend has one (GPU, TPU; not CPU).
  device_stats = jax.devices()[0].memory_stats() or {}
  row.update(device_peak_bytes=device_stats.get('peak_bytes_in_use'),
             step_ms=1e3 * step, step_ms_all=[1e3 * s for s in steps],
             page_faults_per_step=statistics.median(faults),
             sys_ms_per_step=1e3 * statistics.median(sys_s),
             img_per_s=case['batch'] / step,
             peak_tflop_per_s=statistics.median(peaks) / 1e12)
  if against_s:
    # > 1: our step is faster. The median of per-round ratios, so a slow
    # round hits both sides.
    row.update(against_ms=1e3 * statistics.median(against_s),
               against_ms_all=[1e3 * s for s in against_s],
               speedup=statistics.median(a / s for a, s in
                                         zip(against_s, steps)))
  if flops:
    row.update(tflop_per_s=flops / step / 1e12,
               mfu=statistics.median(flops / s / p
                                     for s, p in zip(steps, peaks)))
  return row


def environment(argv: list[str]) -> dict[str, Any]:
  device = jax.devices()[0]
  return {'date': datetime.datetime.now().isoformat(timespec='seconds'),
          'command': ' '.join(['python', *argv]),
          'backend': jax.default_backend(), 'device': device.device_kind,
          'device_count': jax.device_count(), 'host': platform.node(),
          'cpu_count': os.cpu_count(), 'jax': jax.__version__,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'glibc_tunables': os.environ.get('GLIBC_TUNABLES', ''),
          'load_avg': os.getloadavg()}


def print_row(row: dict[str, Any]) -> None:
  cells = []
  for key in COLUMNS:
    value = row.get(key)
    if isinstance(value, float):
      value = f'{value:.3g}' if key != 'img_per_s' else f'{value:.2f}'
    cells.append('-' if value in (None, '') else str(value))
  print(' | '.join(cells), flush=True)


def parse_args(argv: list[str]) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  csv = lambda s: s.split(',')
  ints = lambda s: [int(x) for x in s.split(',')]
  parser.add_argument('--models', type=csv, default=['ViT-B_16'])
  parser.add_argument('--batch', type=ints, default=[8])
  parser.add_argument('--resolution', type=ints, default=[224])
  parser.add_argument('--dtype', type=csv, default=['float32'],
                      help=f'any of {",".join(DTYPES)}')
  parser.add_argument('--mode', type=csv, default=['train', 'infer'])
  parser.add_argument('--remat_policy', type=csv, default=['none'],
                      help=f'any of {",".join(models.REMAT_POLICIES)}')
  parser.add_argument('--attention_impl', type=csv, default=['xla'],
                      help=f'any of {",".join(models.ATTENTION_IMPLS)}')
  parser.add_argument('--xla', type=lambda s: s.split(';'), default=[''],
                      help='XLA option sets compared as cases, ";"-separated, '
                      'each "name=value,..." for that compile only, e.g. '
                      '"";xla_cpu_experimental_ynn_fusion_type=')
  parser.add_argument('--scan_layers', action='store_true')
  parser.add_argument('--optimizer', default='sgd', choices=optim.OPTIMIZERS)
  parser.add_argument('--compile_only', action='store_true',
                      help='compile time, FLOPs and memory only; run nothing')
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--peak_size', type=int, default=0,
                      help='matmul size for the peak; 0: per backend')
  parser.add_argument('--against', default='', choices=('', 'timm'),
                      help='also time timm\'s model of each case, '
                      'interleaved round by round (needs the [parity] '
                      'extra): columns against_ms and speedup = '
                      'against_ms / step_ms')
  parser.add_argument('--json', default='', help='append JSON lines here')
  parser.add_argument('--profile', default='',
                      help='write a profiler trace of one step per case here')
  args = parser.parse_args(argv[1:])
  for mode in args.mode:
    if mode not in ('train', 'infer'):
      parser.error(f'--mode={mode!r}: use train and/or infer')
  if args.against:
    missing = benchmark_timm.available()
    if missing:
      parser.error(missing)
    if args.compile_only:
      parser.error('--against times steps: drop --compile_only')
  return args


def main(argv: list[str]) -> None:
  args = parse_args(argv)
  # As the library's programs run (vit_jax.cli.run); GLIBC_TUNABLES= (set,
  # empty) measures glibc's defaults.
  host_memory = cli_host_memory.keep_freed_memory()
  env = environment(argv)
  env['host_memory'] = host_memory
  against = None
  if args.against:
    against = benchmark_timm.Worker()
    env.update(against.versions)
    print(f"# against timm {env['timm']}, torch {env['torch']} "
          f"({env['torch_threads']} threads)")
  print(f"# {env['date']} {env['backend']} ({env['device']} x"
        f"{env['device_count']}, {env['cpu_count']} CPUs, load "
        f"{env['load_avg'][0]:.2f}) jax {env['jax']} "
        f"XLA_FLAGS='{env['xla_flags']}' "
        f"GLIBC_TUNABLES='{env['glibc_tunables']}' host memory: "
        f"{env['host_memory']}")
  print(' | '.join(COLUMNS))
  peak_probes = {}
  cases = itertools.product(args.models, args.mode, args.batch,
                            args.resolution, args.dtype, args.remat_policy,
                            args.attention_impl, args.xla)
  for model_name, mode, batch, res, dtype, remat, attn, xla in cases:
    if not args.compile_only and dtype not in peak_probes:
      size = args.peak_size or PEAK_SIZES.get(env['backend'], 2048)
      peak_probes[dtype] = matmul_peak(size, DTYPES[dtype])
    row = run_case(args, peak_probes.get(dtype), against,
                   model_name=model_name,
                   mode=mode, batch=batch, res=res, dtype=dtype, remat=remat,
                   attn=attn, scan_layers=args.scan_layers, xla=xla)
    row.update(optimizer=args.optimizer,
               load_avg_after=os.getloadavg(), **env)
    print_row(row)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps(row) + '\n')
  if against:
    against.close()


if __name__ == '__main__':
  main(sys.argv)
