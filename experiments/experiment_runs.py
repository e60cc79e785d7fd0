"""Training runs of the experiment scripts: run or reuse, with their command.

Each run is a `python -m vit_jax.main` command, printed before it starts; a
workdir with metrics.json is a finished run and is reused, so a script can
be stopped and rerun. `SMOKE` shrinks a run to a few steps to check a
script itself.
"""
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
DATA = os.environ.get('TFDS_DATA_DIR',
                      str(REPO.parent / 'shared' / 'data' / 'tensorflow_datasets'))
SMOKE = {'total_steps': 4, 'eval_split': 'test[:400]', 'log_every': 2,
         'checkpoint_every': 4, 'schedule.warmup_steps': 1}


def run(name: str, config: str, out: pathlib.Path, smoke: bool,
        **overrides) -> dict:
  """Runs (or reuses) one training run; returns its metrics, minutes and
  command (with $OUT and $TFDS_DATA_DIR for the paths)."""
  workdir = out / name
  args = {'data_dir': DATA, **overrides, **(SMOKE if smoke else {})}
  command = ['python', '-m', 'vit_jax.main', f'--config={config}',
             f'--workdir={workdir}'] + [f'--config.{k}={v}'
                                         for k, v in args.items()]
  metrics_file = workdir / 'metrics.json'
  if not metrics_file.exists():
    print('$', shlex.join(command), flush=True)
    start = time.time()
    subprocess.run([sys.executable, *command[1:]], cwd=REPO, check=True)
    (workdir / 'wall_time.txt').write_text(f'{time.time() - start:.0f}\n')
  metrics = json.loads(metrics_file.read_text())
  metrics['minutes'] = float((workdir / 'wall_time.txt').read_text()) / 60
  metrics['command'] = shlex.join(command).replace(str(out), '$OUT').replace(
      DATA, '$TFDS_DATA_DIR')
  return metrics


def machine_line() -> str:
  return (f'Machine: {platform.processor() or platform.machine()}, '
          f'{os.cpu_count()} cores; {time.strftime("%Y-%m-%d")}')


def print_table(columns: list[str], rows: list[str], note: str = '') -> None:
  """The machine and date (+ `note`), then a markdown table of `rows` under
  `columns`: what a script prints for experiments/README.md."""
  print(f'\n{machine_line()}{note}\n')
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))
  print('\n'.join(rows))
