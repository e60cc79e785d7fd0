"""The trainer on real CIFAR-10: parallelism equivalence, resume, preemption."""
import json
import signal
import time
import types

import jax
import numpy as np
import pytest

import runs
from vit_jax import checkpoint
from vit_jax import sources
from vit_jax.data import pipeline as input_pipeline
from vit_jax.evaluation import classification
from vit_jax.sources import workdir as vit_workdir
from vit_jax.training import finetune
from vit_jax.training import guards
from vit_jax.training import optim
from vit_jax.training import progress as progress_lib
from vit_jax.training import setup as setup_lib
from vit_jax.training import trainer as train


def test_data_parallel_and_fsdp_follow_the_single_device_trajectory(
    tfds_data_dir, tmp_path):
  results = {}
  for name, data, fsdp in [('single', 1, 1), ('dp8', 8, 1), ('fsdp8', 1, 8)]:
    config = runs.tiny_config(tfds_data_dir, **{'mesh.data': data,
                                                'mesh.fsdp': fsdp,
                                                'mesh.fsdp_min_size': 256})
    results[name] = train.train_and_evaluate(config, tmp_path / name)
  assert len(runs.losses(results['single'])) == 6
  for name in ('dp8', 'fsdp8'):
    np.testing.assert_allclose(runs.losses(results[name]),
                               runs.losses(results['single']), rtol=2e-4)
    assert results[name]['eval_num_examples'] == 200
    assert abs(results[name]['eval_accuracy'] -
               results['single']['eval_accuracy']) <= 0.01


def test_fsdp_shards_large_arrays_and_replicates_small_ones(tfds_data_dir):
  config = runs.tiny_config(tfds_data_dir, **{'mesh.data': 2, 'mesh.fsdp': 4,
                                              'mesh.fsdp_min_size': 1024})
  setup = setup_lib.create_setup(config)
  state, _, _ = train.create_train_state(setup)
  mlp = state['params']['Transformer']['encoderblock_0']['MlpBlock_0']
  kernel = mlp['Dense_0']['kernel']  # (32, 64): largest divisible dim is 64
  assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')
  assert kernel.addressable_shards[0].data.shape == (32, 16)
  assert mlp['Dense_0']['bias'].sharding.spec == jax.sharding.PartitionSpec()
  adam_mu = state['opt_state'][1][0].mu  # chain(clip, adamw): same layout
  assert adam_mu['Transformer']['encoderblock_0']['MlpBlock_0']['Dense_0'][
      'kernel'].sharding.spec == jax.sharding.PartitionSpec(None, 'fsdp')


def test_gradient_accumulation_matches_the_full_batch(tfds_data_dir, tmp_path):
  full = train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=3), tmp_path / 'full')
  accum = train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=3, accum_steps=2),
      tmp_path / 'accum')
  np.testing.assert_allclose(runs.losses(accum), runs.losses(full), rtol=2e-4)


def test_short_run_on_real_cifar10_learns(tfds_data_dir, tmp_path):
  config = runs.tiny_config(
      tfds_data_dir, train_split='train[:20%]', eval_split='test[:1000]',
      total_steps=150, batch_size=64, log_every=1, checkpoint_every=150,
      **{'model.hidden_size': 64, 'model.mlp_dim': 128,
         'schedule.warmup_steps': 15})
  result = train.train_and_evaluate(config, tmp_path)
  history = runs.losses(result)
  assert history[-20:].mean() < history[:20].mean() - 0.1, history
  assert result['eval_num_examples'] == 1000
  assert result['eval_accuracy'] > 0.25, result  # chance is 0.10
  saved = json.loads((tmp_path / 'metrics.json').read_text())
  assert saved['eval_accuracy'] == result['eval_accuracy']
  assert list((tmp_path).glob('events.out.tfevents.*'))
  # The workdir alone gives back the model: same accuracy, same labels.
  trained = vit_workdir.load_workdir(tmp_path)
  assert (trained.step, trained.image_size) == (150, (32, 32))
  assert trained.label_names[:2] == ['airplane', 'automobile']
  correct = 0
  for batch in input_pipeline.eval_iterator(
      'cifar10', split='test[:1000]', data_dir=tfds_data_dir,
      global_batch_size=100, image_size=32,
      sharding=jax.sharding.NamedSharding(
          jax.sharding.Mesh(jax.devices()[:1], ('b',)),
          jax.sharding.PartitionSpec('b'))):
    logits = trained.model.apply({'params': trained.params}, batch['image'])
    correct += int(((logits.argmax(-1) == batch['label']) & batch['mask']).sum())
  assert correct / 1000 == result['eval_accuracy']


def test_sigterm_writes_a_checkpoint_and_exits_resumable(tfds_data_dir,
                                                         tmp_path):
  overrides = dict(total_steps=100000, checkpoint_every=100000)
  proc = runs.start(runs.cli(tfds_data_dir, tmp_path, **overrides))
  runs.wait_for(lambda: (tmp_path / 'events.out.tfevents').exists() or
                list(tmp_path.glob('events.out.tfevents.*')), proc)
  time.sleep(3)  # let it train a few steps
  proc.send_signal(signal.SIGTERM)
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == guards.PREEMPTED_EXIT_CODE, output
  steps = runs.complete_steps(tmp_path)
  assert len(steps) == 1 and 0 < steps[0] < 100000, steps
  assert f'checkpoint of step {steps[0]} written' in output


@pytest.mark.parametrize('overrides,match', [
    ({'model_name': 'ViT-B16'}, r"Unknown model name 'ViT-B16'.*ViT-B_16"),
    ({'optimizer.name': 'adam'}, r"Unknown optimizer 'adam'.*'adamw'"),
    ({'schedule.name': 'cosin'}, r"Unknown schedule 'cosin'.*'cosine'"),
    ({'batch_size': 12}, r'batch_size=12 must be divisible by the 8 devices'),
    ({'batch_size': 16, 'accum_steps': 4},
     r'divisible by the 8 devices x accum_steps=4 = 32'),
    ({'mesh.data': 4, 'mesh.fsdp': 4}, r'needs 16 devices but 8 are available'),
    ({'image_size': 36}, r'Image size 36x36 is not divisible'),
    ({'dataset': 'cifar11'}, r"cifar11.*cifar10"),
    # Zero, negative and out-of-range numbers: one line naming the field.
    ({'total_steps': -5}, r"config.total_steps=-5 must be a positive integer "
     r"\(or 0 for the dataset's default\)"),
    ({'total_steps': 10**20}, r'config.total_steps=100000000000000000000 is '
     r'out of range: at most 2,147,483,647'),
    ({'seed': 10**20}, r'config.seed=100000000000000000000 is out of range'),
    ({'keep_checkpoints': 0}, r'keep_checkpoints=0 must be >= 1 \(at least '
     r'the newest checkpoint is kept\)'),
    ({'checkpoint_every': 0}, r'config.checkpoint_every=0 must be an integer'),
    ({'log_every': 0}, r'config.log_every=0 must be an integer >= 1'),
    ({'eval_every': -1}, r'config.eval_every=-1 must be >= 0 \(0: evaluate '
     r'at the end only\)'),
    ({'optimizer.learning_rate': 0.0},
     r'learning_rate=0.0 must be > 0 \(to keep weights fixed, use '
     r'optimizer.freeze\)'),
    ({'label_smoothing': 1.0}, r'label_smoothing=1.0 must be in \[0, 1\)'),
    ({'schedule.warmup_steps': -1}, r'warmup_steps=-1 must be an integer'),
    ({'schedule.warmup_steps': 7}, r'warmup_steps=7 is more than the run\'s '
     r'total_steps=6'),
    ({'image_size': -32}, r'config.image_size=-32 must be'),
    ({'model.patch_size': 0}, r'patch_size=0 must be a positive integer'),
    ({'model.dropout_rate': 1.5}, r'dropout_rate=1.5 must be in \[0, 1\)'),
    ({'mesh.fsdp': 0}, r'config.mesh.fsdp=0 must be an integer >= 1'),
    ({'batch_size': 0}, r'config.batch_size=0 must be an integer >= 1'),
    ({'crop_min_area': 0.0}, r'crop_min_area=0.0 must be in \(0, 1\]'),
    # Fields that only the final evaluation uses, checked before training.
    ({'eval_batch_size': 12},
     r'eval_batch_size=12 must be divisible by the 8 devices'),
    ({'eval_resize': 'crop'}, r"config.eval_resize: Unknown value 'crop'"),
    ({'eval_split': 'tset'}, r"Unknown or invalid split 'tset'"),
    ({'dataset': ''}, r"config.dataset='' names no dataset"),
    ({'eval_split': 'test[:0]'}, r"Split 'test\[:0\]' of dataset 'cifar10' "
     r'holds no examples'),
    ({'pretrained.path': '/nonexistent/ViT-B_16.npz'},
     r'--model=/nonexistent/ViT-B_16.npz: no such file or directory'),
])
def test_bad_config_fails_before_compiling(tfds_data_dir, overrides, match):
  with pytest.raises(ValueError, match=match):
    setup_lib.create_setup(runs.tiny_config(tfds_data_dir, **overrides))


def test_an_image_folder_without_a_test_split_is_refused_before_training(
    cifar_5_class_folder, tfds_data_dir, tmp_path):
  only_train = tmp_path / 'only_train'
  only_train.mkdir()
  (only_train / 'train').symlink_to(cifar_5_class_folder / 'train')
  with pytest.raises(ValueError, match=r"Dataset 'imagefolder:.*' has no "
                     r'default split for this use; pass split= one of '
                     r"\['train'\]"):
    setup_lib.create_setup(runs.tiny_config(
        tfds_data_dir, dataset=f'imagefolder:{only_train}', train_split='',
        eval_split=''))


@pytest.fixture(scope='module')
def cifar_5_class_folder(tfds_data_dir, tmp_path_factory):
  """Real CIFAR-10 photos of 5 classes as an image folder (a new task)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  root = tmp_path_factory.mktemp('cifar5')
  examples = tfds.as_numpy(tfds.load('cifar10', split='test[:1000]',
                                     data_dir=tfds_data_dir, download=False))
  for i, ex in enumerate(examples):
    if ex['label'] < 5:
      split = 'test' if i % 5 == 0 else 'train'
      folder = root / split / f'class{ex["label"]}'
      folder.mkdir(parents=True, exist_ok=True)
      Image.fromarray(ex['image']).save(folder / f'{i}.png')
  return root


@pytest.fixture(scope='module')
def pretrained_workdir(tfds_data_dir, tmp_path_factory):
  """A tiny model pretrained on CIFAR-10 at 32px (a 4x4 patch grid)."""
  workdir = tmp_path_factory.mktemp('pretrain')
  train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=30, log_every=100,
                       checkpoint_every=30), workdir)
  return workdir


@pytest.mark.parametrize('source', ['npz', 'workdir', 'timm', 'hf'])
def test_fine_tune_at_higher_resolution_and_other_classes(
    tfds_data_dir, cifar_5_class_folder, pretrained_workdir, tmp_path, source):
  weights = pretrained_workdir
  if source == 'npz':
    weights = tmp_path / 'pretrained.npz'
    checkpoint.save_npz(weights, runs.final_params(pretrained_workdir))
  elif source in ('timm', 'hf'):  # PyTorch-world folders of the same weights
    sources.write_export(sources.load(pretrained_workdir), tmp_path / 'out',
                         'pre', formats=(source,))
    weights = tmp_path / 'out' / f'pre.{source}'
  config = runs.tiny_config(
      tfds_data_dir, dataset=f'imagefolder:{cifar_5_class_folder}',
      train_split='train', eval_split='test', image_size=48, total_steps=40,
      log_every=1, **{'pretrained.path': str(weights)})
  result = train.train_and_evaluate(config, tmp_path / 'finetune')
  history = runs.losses(result)
  assert history[-10:].mean() < history[:5].mean() - 0.05, history
  params = runs.final_params(tmp_path / 'finetune')
  assert params['Transformer']['posembed_input']['pos_embedding'].shape == (
      1, 6 * 6 + 1, 32)
  assert params['head']['kernel'].shape == (32, 5)
  record = json.loads((tmp_path / 'finetune' / 'adaptation.json').read_text())
  assert record['source_kind'] == source
  assert record['head']['classes'] == [10, 5]
  assert record['position_embedding_grid'] == [[4, 4], [6, 6]]
  assert record['patch_size'] == [[8, 8], [8, 8]]
  assert record['patch_embedding_resized'] is False
  assert record['path'] == str(weights)


def test_fine_tune_with_a_fresh_position_embedding(
    tfds_data_dir, pretrained_workdir, tmp_path):
  config = runs.tiny_config(tfds_data_dir, image_size=48, total_steps=2,
                            **{'pretrained.path': str(pretrained_workdir),
                               'pretrained.posemb_method': 'reinit'})
  setup = setup_lib.create_setup(config)
  state, _, _ = train.create_train_state(setup)
  source = runs.final_params(pretrained_workdir)
  params = jax.device_get(state['params'])
  np.testing.assert_array_equal(  # the rest is the pretrained model's
      params['Transformer']['encoder_norm']['scale'],
      source['Transformer']['encoder_norm']['scale'])
  scratch = runs.tiny_config(tfds_data_dir, image_size=48, total_steps=2)
  scratch_setup = setup_lib.create_setup(scratch)
  fresh, _, _ = train.create_train_state(scratch_setup)
  posemb = lambda p: p['Transformer']['posembed_input']['pos_embedding']
  assert posemb(params).shape == (1, 37, 32)
  np.testing.assert_array_equal(posemb(params),
                                jax.device_get(posemb(fresh['params'])))
  with pytest.raises(ValueError, match=r"posemb_method: Unknown value "
                     r"'nearest'. Allowed: bilinear, bicubic, reinit"):
    setup_lib.create_setup(runs.tiny_config(
        tfds_data_dir, **{'pretrained.posemb_method': 'nearest'}))


def test_fine_tune_resolution_not_divisible_by_the_patch(tfds_data_dir):
  with pytest.raises(ValueError, match=r'Image size 50x50 is not divisible '
                     r'.* 8x8 pixels per token'):
    setup_lib.create_setup(runs.tiny_config(tfds_data_dir, image_size=50))


def test_two_processes_give_the_result_of_one_process_with_8_devices(
    tfds_data_dir, tmp_path):
  overrides = {'input_global_order': True, 'mesh.fsdp': 2,
               'mesh.fsdp_min_size': 256}
  procs = runs.start_processes(tfds_data_dir, tmp_path / 'two', 2, 4,
                               **overrides)
  outputs = [proc.communicate(timeout=600)[0] for proc in procs]
  for proc, output in zip(procs, outputs):
    assert proc.returncode == 0, output
  assert '2 process(es), 8 cpu device(s)' in outputs[0]
  two = json.loads((tmp_path / 'two' / 'metrics.json').read_text())
  one = train.train_and_evaluate(runs.tiny_config(tfds_data_dir, **overrides),
                                 tmp_path / 'one')
  np.testing.assert_allclose(runs.losses(two), runs.losses(one), rtol=2e-4)
  assert two['eval_num_examples'] == one['eval_num_examples'] == 200
  assert abs(two['eval_accuracy'] - one['eval_accuracy']) <= 0.01
  # atol: the attention key bias has a zero true gradient, so Adam turns
  # float noise of order 1e-10 into updates of up to ~lr/100 there.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-4),
               runs.final_params(tmp_path / 'two'),
               runs.final_params(tmp_path / 'one'))


def _nan_learning_rate_from(monkeypatch, bad_step: int):
  """Injects a fault: the schedule turns NaN at `bad_step` (0-based)."""
  create_schedule = optim.create_schedule

  def poisoned(config, total_steps):
    schedule = create_schedule(config, total_steps)
    return lambda s: jax.numpy.where(s >= bad_step, jax.numpy.nan, schedule(s))

  monkeypatch.setattr(optim, 'create_schedule', poisoned)


def test_non_finite_update_stops_the_run_and_keeps_the_last_good_checkpoint(
    tfds_data_dir, tmp_path, monkeypatch):
  _nan_learning_rate_from(monkeypatch, bad_step=4)
  config = runs.tiny_config(tfds_data_dir, total_steps=8, log_every=100)
  with pytest.raises(guards.NonFiniteLossError,
                     match=r'at step 5 .*Last finite metrics: step 4.*'
                     r'Last good checkpoint: step 4'):
    train.train_and_evaluate(config, tmp_path)
  assert runs.complete_steps(tmp_path) == [2, 4]
  monkeypatch.undo()
  params = runs.final_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_non_finite_steps_can_be_skipped(tfds_data_dir, tmp_path, monkeypatch):
  _nan_learning_rate_from(monkeypatch, bad_step=4)
  config = runs.tiny_config(tfds_data_dir, total_steps=7, on_nonfinite='skip')
  result = train.train_and_evaluate(config, tmp_path)
  assert result['skipped_steps'] == 3 and result['step'] == 7
  params = runs.final_params(tmp_path)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_cross_entropy_with_label_smoothing():
  logits = jax.numpy.array([[2.0, 0.0, -1.0]])
  labels = jax.numpy.array([[0.0, 1.0, 0.0]])
  log_p = jax.nn.log_softmax(logits)[0]
  smoothed = 0.9 * labels[0] + 0.1 / 3
  np.testing.assert_allclose(classification.cross_entropy(logits, labels, 0.1),
                             [-(smoothed * log_p).sum()], rtol=1e-6)
  np.testing.assert_allclose(classification.cross_entropy(logits, labels),
                             [-log_p[1]], rtol=1e-6)


def test_bfloat16_compute_trains_close_to_float32(tfds_data_dir, tmp_path):
  f32 = train.train_and_evaluate(  # also periodic evaluation, last at step 4
      runs.tiny_config(tfds_data_dir, total_steps=4, eval_every=2),
      tmp_path / 'f32')
  assert f32['eval_num_examples'] == 200
  bf16 = train.train_and_evaluate(
      runs.tiny_config(tfds_data_dir, total_steps=4,
                       **{'model.dtype': 'bfloat16'}), tmp_path / 'bf16')
  np.testing.assert_allclose(runs.losses(bf16), runs.losses(f32), rtol=0.02)
  params = runs.final_params(tmp_path / 'bf16')
  assert all(x.dtype == np.float32 for x in jax.tree.leaves(params))


def test_progress_lines_average_the_window_and_rates_start_on_line_two(
    tmp_path, caplog, monkeypatch):
  # start, first log, 10 s later, summary
  clock = iter([100.0, 130.0, 140.0, 150.0])
  monkeypatch.setattr(progress_lib, 'time', types.SimpleNamespace(
      time=lambda: next(clock)))
  with progress_lib.MetricWriter(tmp_path, enabled=False) as writer:
    progress = progress_lib.Progress(total_steps=100, batch_size=8,
                                     writer=writer)
    with caplog.at_level('INFO'):
      for loss in (2.5, 1.5):  # steps 9 and 10
        progress.record({'loss': loss, 'learning_rate': 1e-3})
      progress.log(10)
      progress.record({'loss': 1.5, 'learning_rate': 1e-3})
      progress.log(30)
  first, second = [r.getMessage() for r in caplog.records]
  assert 'step 10/100  loss 2.0000 (mean of 2)' in first
  assert 'steps/s' not in first and 'next line' in first
  # 20 steps in 10 s; 70 steps left -> 35 s.
  assert '2.00 steps/s  16 img/s  ETA 00:00:35' in second
  assert progress.summary()['train_loss_history'] == [[10, 2.0], [30, 1.5]]


def test_eta_does_not_wrap_after_a_day():
  assert progress_lib.duration(35) == '00:00:35'
  assert progress_lib.duration(26 * 3600 + 61) == '1d 02:01:01'
  assert progress_lib.duration(10 * 86400) == '10d 00:00:00'


def test_fine_tune_at_another_patch_size_resizes_the_embedding(
    tfds_data_dir, pretrained_workdir, tmp_path):
  """/8 weights fine-tuned as /4 at 48 px: PI-resized kernel, 12x12 grid."""
  config = runs.tiny_config(tfds_data_dir, image_size=48, total_steps=2,
                            **{'model.patch_size': 4,
                               'pretrained.path': str(pretrained_workdir)})
  setup = setup_lib.create_setup(config)
  fresh = jax.device_get(setup.model.init(
      jax.random.key(0), np.zeros((1, 48, 48, 3), np.float32))['params'])
  params, record = finetune.pretrained_params(
      pretrained_workdir, fresh, setup.model, (48, 48), 'bilinear')
  assert params['embedding']['kernel'].shape == (4, 4, 3, 32)
  assert record['patch_size'] == [[8, 8], [4, 4]]
  assert record['patch_embedding_resized'] is True
  assert record['position_embedding_grid'] == [[4, 4], [12, 12]]
