"""A workdir shared by its writer and readers: nothing lost, nothing silent.

Readers never disturb a live run; one writer at a time; a resume refuses a
config that changes what the checkpoint means; a finished run stays as it
is; the history and metrics survive resumes as strict JSON.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import runs
from vit_jax import sources
from vit_jax.runs import reader
from vit_jax.runs import resume
from vit_jax.training import setup
from vit_jax.training import trainer


def test_readers_in_a_loop_never_disturb_a_run_saving_every_step(
    tfds_data_dir, imagenet_samples, tmp_path):
  workdir = tmp_path / 'live'
  proc = runs.start(runs.cli(tfds_data_dir, workdir, total_steps=40,
                             checkpoint_every=1, keep_checkpoints=2,
                             log_every=10))
  runs.wait_for(lambda: runs.complete_steps(workdir), proc)
  reads, steps_read = 0, set()
  predicted = None
  while proc.poll() is None:
    try:
      source = sources.load(workdir)  # what export, predict, inspect do
    except FileNotFoundError:  # finished between the poll and the read
      break
    steps_read.add(source.step)
    reads += 1
    if predicted is None:  # one real program too, in the middle of the run
      predicted = subprocess.run(
          [sys.executable, '-m', 'vit_jax.predict', f'--model={workdir}',
           str(sorted(imagenet_samples.glob('*.JPEG'))[0])], cwd=runs.REPO,
          capture_output=True, text=True, timeout=300)
  output = proc.communicate()[0]
  assert proc.returncode == 0, output
  assert 'Could not write checkpoint' not in output
  assert predicted.returncode == 0, predicted.stderr
  # Logs a person can follow: what compiles and how long it took, no start-up
  # noise of TensorFlow, XLA or JAX's backend probing, no Orbax chatter.
  assert 'Compiling the train step...' in output and 'Compiled in ' in output
  for noise in ('oneDNN', 'absl::InitializeLog', 'cpu_feature_guard',
                "Unable to initialize backend 'tpu'", 'orbax',
                'checkpoint_manager.py', 'async_checkpointer.py'):
    assert noise not in output, noise
    assert noise not in predicted.stderr, noise
  assert reads >= 5 and len(steps_read) >= 3, (reads, steps_read)
  assert runs.complete_steps(workdir) == [39, 40]
  for step in (39, 40):  # every kept step whole and readable
    assert reader.read_run(workdir, step).step == step
  # Readers left no trace: no lock record, nothing renamed or cleaned.
  assert (workdir / 'LOCK').read_text() == ''
  assert not [p for p in (workdir / 'checkpoints').iterdir()
              if not p.name.isdigit()]


def test_one_writer_per_workdir_and_a_killed_holder_is_taken_over(
    tfds_data_dir, tmp_path):
  endless = {'total_steps': 100000, 'checkpoint_every': 5, 'log_every': 100}
  first = runs.start(runs.cli(tfds_data_dir, tmp_path, **endless))
  runs.wait_for(lambda: runs.complete_steps(tmp_path), first)
  second = subprocess.run(runs.cli(tfds_data_dir, tmp_path, **endless),
                          cwd=runs.REPO, capture_output=True, text=True,
                          timeout=300)
  assert second.returncode == 2, second.stderr
  errors = [l for l in second.stderr.splitlines() if l.startswith('error: ')]
  assert errors == [
      f'error: {tmp_path} is in use by another run: pid {first.pid} on '
      f'{os.uname().nodename}, started ' + errors[0].split(', started ')[1]]
  assert 'Wait for it to finish or stop it' in errors[0]
  first.send_signal(signal.SIGKILL)
  first.wait()
  left = runs.complete_steps(tmp_path)
  third = runs.start(runs.cli(tfds_data_dir, tmp_path, **endless))
  runs.wait_for(lambda: runs.complete_steps(tmp_path)[-1] > left[-1], third)
  assert json.loads((tmp_path / 'LOCK').read_text())['pid'] == third.pid
  third.send_signal(signal.SIGTERM)  # preempted: checkpoint, exit 75
  output = third.communicate(timeout=300)[0]
  assert third.returncode == 75, output
  assert f'(pid {first.pid} on ' in output
  assert 'ended without releasing it (killed?)' in output
  assert f'Resumed from step {left[-1]}' in output


@pytest.fixture(scope='module')
def four_steps(tfds_data_dir, tmp_path_factory):
  """A finished 4-step run (checkpoints at 2 and 4) to resume from."""
  workdir = tmp_path_factory.mktemp('four')
  trainer.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=4), workdir)
  return workdir


def _copy(workdir, tmp_path):
  import shutil  # pylint: disable=g-import-not-at-top
  target = tmp_path / 'copy'
  shutil.copytree(workdir, target)
  return target


def test_resume_refuses_changes_that_change_what_the_state_means(
    tfds_data_dir, four_steps, tmp_path):
  workdir = _copy(four_steps, tmp_path)
  before = sorted(p.name for p in workdir.rglob('*'))
  with pytest.raises(setup.SetupError) as error:
    trainer.train_and_evaluate(runs.tiny_config(
        tfds_data_dir, batch_size=32, total_steps=8), workdir)
  assert str(error.value) == (
      f'{workdir} holds a run with another config: batch_size 16 -> 32, '
      'total_steps 4 -> 8. To accept the changes, add '
      '--config.resume_accept=batch_size,total_steps.')
  assert sorted(p.name for p in workdir.rglob('*')) == before  # untouched
  stored = reader.read_run(workdir).meta['config']
  changed = runs.tiny_config(tfds_data_dir, dataset='cifar100', total_steps=4,
                             label_smoothing=0.2, resume_accept='dataset')
  with pytest.raises(resume.ResumeConfigError) as error:
    resume.check(stored, changed, str(workdir))
  assert str(error.value) == (
      f"{workdir} holds a run with another config: dataset 'cifar10' -> "
      "'cifar100', label_smoothing 0.1 -> 0.2. dataset cannot change on "
      'resume: to continue from these weights, train into a new --workdir '
      f'with --config.pretrained.path={workdir}. To accept the other change, '
      'add --config.resume_accept=label_smoothing.')
  # What never matters to the state changes freely; accepted changes pass.
  free = runs.tiny_config(tfds_data_dir, total_steps=4, log_every=7,
                          eval_batch_size=8,
                          **{'model.remat_policy': 'full', 'mesh.fsdp': 2})
  assert resume.check(stored, free, str(workdir)) == []
  accepted = runs.tiny_config(tfds_data_dir, total_steps=4,
                              label_smoothing=0.2, resume_accept='label_*')
  assert resume.check(stored, accepted, str(workdir)) == [
      'label_smoothing 0.1 -> 0.2']
  with pytest.raises(ValueError, match=r"config.resume_accept: no config "
                     r"field matches 'batchsize'. Did you mean 'batch_size'"):
    trainer.train_and_evaluate(runs.tiny_config(
        tfds_data_dir, resume_accept='batchsize'), workdir)


def test_accepted_batch_size_change_resumes_at_the_same_example_and_history_spans_the_run(
    tfds_data_dir, four_steps, tmp_path):
  workdir = _copy(four_steps, tmp_path)
  result = trainer.train_and_evaluate(runs.tiny_config(
      tfds_data_dir, batch_size=32, total_steps=8,
      resume_accept='batch_size,total_steps'), workdir)
  meta = reader.read_run(workdir).meta
  assert meta['examples_seen'] == 4 * 16 + 4 * 32
  assert [step for step, _ in result['train_loss_history']] == list(
      range(1, 9))  # log_every=1: the first four from before the resume
  text = (workdir / 'metrics.json').read_text()
  strict = json.loads(text, parse_constant=lambda c: pytest.fail(
      f'bare {c} in metrics.json'))
  assert strict['step'] == 8 and strict['finished'] is True
  assert strict['eval_num_examples'] == 200
  assert json.loads((workdir / 'config.json').read_text())['resolved'][
      'total_steps'] == 8


def test_a_finished_run_says_so_and_changes_nothing(tfds_data_dir, four_steps,
                                                   tmp_path, caplog):
  workdir = _copy(four_steps, tmp_path)
  files = {p: (p.stat().st_mtime_ns, p.stat().st_size)
           for p in workdir.rglob('*') if p.name != 'LOCK'}
  metrics = json.loads((workdir / 'metrics.json').read_text())
  with caplog.at_level('INFO'):
    again = trainer.train_and_evaluate(
        runs.tiny_config(tfds_data_dir, total_steps=4), workdir)
  assert again == metrics
  assert 'This run finished already; nothing to do' in caplog.text
  assert {p: (p.stat().st_mtime_ns, p.stat().st_size)
          for p in workdir.rglob('*') if p.name != 'LOCK'} == files


def test_a_workdir_named_by_a_relative_path_reads(four_steps, monkeypatch):
  monkeypatch.chdir(four_steps.parent)
  source = sources.load(four_steps.name)
  assert source.step == 4 and source.origin['path'] == str(four_steps)


def test_readers_of_a_workdir_without_a_complete_checkpoint_say_so(tmp_path):
  (tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1').mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match='has no complete checkpoint yet'):
    sources.load(tmp_path)
  result = subprocess.run(
      [sys.executable, '-m', 'vit_jax.export', f'--model={tmp_path}',
       f'--output={tmp_path / "out"}'], cwd=runs.REPO, capture_output=True,
      text=True, timeout=120)
  assert result.returncode == 2
  assert result.stderr.startswith(
      f'error: {tmp_path} has no complete checkpoint yet')
  assert (tmp_path / 'checkpoints' / '3.orbax-checkpoint-tmp-1').is_dir()


def test_a_peer_that_never_starts_is_named_after_a_bounded_wait(
    tfds_data_dir, tmp_path):
  port = runs.free_port()
  args = runs.cli(tfds_data_dir, tmp_path, **{
      'distributed.coordinator_address': f'127.0.0.1:{port}',
      'distributed.num_processes': 3, 'distributed.wait_s': 4})
  start = time.time()
  lonely = subprocess.run([*args, '--config.distributed.process_id=0'],
                          cwd=runs.REPO, capture_output=True, text=True,
                          timeout=120)
  assert lonely.returncode == 1 and time.time() - start < 60
  assert lonely.stderr.splitlines()[-1] == (
      f'error: Process 0 waited 4 s at coordinator 127.0.0.1:{port} for '
      'process(es) 1, 2 of 3, which did not start (or cannot reach it); start '
      'them with the same command and their --config.distributed.process_id, '
      'or raise --config.distributed.wait_s.')
  follower = subprocess.run([*args, '--config.distributed.process_id=2'],
                            cwd=runs.REPO, capture_output=True, text=True,
                            timeout=120)
  assert follower.returncode == 1
  assert (f'error: Process 2 waited 4 s for process 0 at coordinator '
          f'127.0.0.1:{port}, which did not answer') in follower.stderr
  # Ctrl-C ends a long wait at once.
  waiting = runs.start([*args, '--config.distributed.wait_s=300',
                        '--config.distributed.process_id=0'])
  # Interrupted once it says it waits (a fixed sleep could land in its
  # imports on a loaded machine); the 300 s wait would outlast the timeout.
  lines = []
  while not any('Waiting at' in line for line in lines[-1:]):
    lines.append(waiting.stdout.readline())
    assert lines[-1], ''.join(lines)
  waiting.send_signal(signal.SIGINT)
  output = ''.join(lines) + waiting.communicate(timeout=200)[0]
  assert waiting.returncode == 130, output
  assert output.splitlines()[-1] == 'error: interrupted (Ctrl-C).'
