"""Every program speaks the same vocabulary: --help, usage errors, exit codes."""
import logging
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
PROGRAMS = {'main': 'vit-train', 'export': 'vit-export',
            'predict': 'vit-predict', 'inspect': 'vit-inspect',
            'evaluate': 'vit-evaluate', 'plan': 'vit-plan'}
# The shared model flags (vit_jax.cli) of the programs that read a model.
MODEL_FLAGS = ('--model', '--step', '--model_name', '--image_size', '--labels')


def _run(*args: str, program: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, '-m', f'vit_jax.{program}', *args],
                        cwd=REPO, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize('program', sorted(PROGRAMS))
def test_help_exits_0_and_a_bad_flag_is_one_usage_line(program):
  help_ = _run('--help', program=program)
  assert help_.returncode == 0, help_.stderr
  if program in ('main', 'plan'):
    assert '--config' in help_.stdout
    assert ('--workdir' if program == 'main' else '--topology') in help_.stdout
  else:
    for flag in MODEL_FLAGS:
      assert flag in help_.stdout, (program, flag)
    if program != 'predict':
      assert '--output' in help_.stdout
  bad = _run('--no_such_flag=1', program=program)
  assert bad.returncode == 2
  assert bad.stderr.splitlines()[0] == (
      'error: Unknown command line flag \'no_such_flag\'')
  assert 'Traceback' not in bad.stderr


@pytest.mark.parametrize('program', ['export', 'predict', 'inspect',
                                     'evaluate'])
def test_a_missing_model_is_named(program, tmp_path):
  missing = tmp_path / 'nothing_here'
  args = [f'--model={missing}']
  if program != 'predict':
    args.append(f'--output={tmp_path / "out"}')
  if program != 'export':
    args.append(str(REPO))  # images or data to read
  result = _run(*args, program=program)
  assert result.returncode == 2, result.stderr
  assert result.stderr.splitlines()[0] == (
      f'error: --model={missing}: no such file or directory '
      '(a Hub id starts with hf-hub:).')


@pytest.mark.parametrize('program,script', sorted(PROGRAMS.items()))
def test_console_scripts_are_installed(program, script):
  path = shutil.which(script, path=os.path.dirname(sys.executable))
  if path is None:
    pytest.skip(f'{script} not installed here (pip install -e . makes it)')
  result = subprocess.run([path, '--help'], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
  assert result.returncode == 0, result.stderr
  # The same program: its docstring and flags, as `python -m` shows them.
  module_help = _run('--help', program=program).stdout
  assert result.stdout.splitlines()[:3] == module_help.splitlines()[:3]
  assert {'main': '--workdir', 'plan': '--topology'}.get(
      program, '--model') in result.stdout


def test_export_cli_writes_the_library_default_formats():
  from vit_jax.sources import export  # pylint: disable=g-import-not-at-top
  help_text = _run('--help', program='export').stdout
  default = ','.join(export.DEFAULT_FORMATS)
  assert f"(default: '{default}')" in help_text
  for fmt in export.FORMATS:  # every format is named in the help
    assert fmt in help_text.split('--formats:')[1].split('(default')[0]


def test_library_chatter_is_filtered_and_our_warnings_kept():
  from vit_jax import cli

  def record(pathname, level, msg):
    return logging.LogRecord('absl', level, pathname, 1, msg, None, None)

  orbax = '/site-packages/orbax/checkpoint/checkpoint_manager.py'
  quiet = cli._QuietLibraries()
  assert not quiet.filter(record(orbax, logging.INFO, 'Saving item'))
  assert not quiet.filter(record(
      orbax, logging.WARNING, 'Waiting for previous save to complete took '
      '1.2 seconds. If this number is high, consider checkpointing less'))
  kept = record(orbax, logging.WARNING, 'Disk full\nTraceback ...')
  assert quiet.filter(kept) and kept.getMessage() == 'Disk full'
  ours = record('/repo/vit_jax/runs/state_checkpoint.py', logging.WARNING,
                'Step 2 waited 1.5 s for checkpoint 1 to finish writing')
  assert quiet.filter(ours)


@pytest.mark.parametrize('program', ['evaluate', 'inspect'])
def test_an_output_that_is_a_file_is_refused_before_any_work(program,
                                                            tmp_path):
  existing = tmp_path / 'notes.txt'
  existing.write_text('mine\n')
  result = _run('--model=/nonexistent', f'--output={existing}', str(tmp_path),
                program=program)
  assert result.returncode == 2, result.stderr
  assert result.stderr.startswith(
      f'error: --output={existing} is a file; name a folder'), result.stderr
  assert existing.read_text() == 'mine\n'
