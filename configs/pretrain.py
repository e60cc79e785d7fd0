"""Pretraining from scratch.

  cifar10_quick  ViT (4 layers, width 128, patch 4) on CIFAR-10 at 32px.
      python -m vit_jax.main --config=configs/pretrain.py:cifar10_quick \
          --workdir=/tmp/vit_cifar10_quick
      2026-12-05, 2-core CPU, 1 process, 600 steps (1.5 epochs): 5.4 min
      (2.2 steps/s; start-up, compile and evaluation included), test top-1
      44.99 % (10,000 images). The recipe before (crops from 5 % of the
      area) gave 36.9 %; the sweep: experiments/cifar10_recipe.py and
      experiments/README.md.
  cifar10  The same ViT for 7500 steps (19 epochs), crops from 35 %.
      python -m vit_jax.main --config=configs/pretrain.py:cifar10 \
          --workdir=/tmp/vit_cifar10
      2026-12-05, 2-core CPU, 1 process: 57.5 min (2.2 steps/s), test top-1
      63.3 % (54.0 % at step 2500, 60.5 % at 5000). Before: a 6x192 ViT for
      3000 steps (7.7 epochs), 54.9 % in about an hour.
  cifar10_bit  BiT ResNet-v2 R26x1 (2 units per stage) on CIFAR-10 at 32px with
      the Figure-5 recipe (the ViTs' of 2026-12-04: crops from 5 % of the
      area): the ResNet baseline of experiments/figure5_cifar10.py.
      python -m vit_jax.main --config=configs/pretrain.py:cifar10_bit \
          --workdir=/tmp/bit_cifar10
      2026-12-05, 2-core CPU, 1 process, 600 steps: 16.8 min (0.68 steps/s;
      with a 10-shot evaluation at the end), test top-1 48.7 % (10,000
      images); --config.model.resnet_layers='(1,1,1,1)' (R14x1): 11.4 min,
      49.2 %. experiments/README.md compares both with ViTs and hybrids.
  cifar10_mpp  Self-supervised masked patch prediction (the paper's section 4.6)
      with the cifar10_quick ViT and recipe: 50 % of the patches corrupted,
      their 3-bit mean colour (512 classes) predicted; labels unused.
      python -m vit_jax.main --config=configs/pretrain.py:cifar10_mpp \
          --workdir=/tmp/vit_cifar10_mpp
      2026-12-05, 2-core CPU, 1 process, 600 steps: 6.6 min (1.85 steps/s;
      with the 10/25-shot evaluation), masked-patch accuracy 29.3 % (loss
      2.53, from ln 512 = 6.24) on the test images' corrupted patches;
      frozen features 24.2 % 10-shot, 28.0 % 25-shot. Fine-tuned with
      cifar10_quick for 600 more steps: 50.5 % top-1 against 45.0 % for 600
      and 51.2 % for 1200 steps from scratch
      (experiments/masked_patches_cifar10.py, experiments/README.md).
  imagenet_s16  "Better plain ViT baselines for ImageNet-1k" (arXiv 2205.01580):
      ViT-S/16, GAP head, 90 epochs at batch 1024, Adam lr 1e-3, decoupled wd
      1e-4, 10k warmup steps, cosine, RandAugment(2, 10), mixup 0.2, 224px.
      python -m vit_jax.main --config=configs/pretrain.py:imagenet_s16 \
          --workdir=/data/runs/vit_s16 --config.data_dir=...
      (a workdir is a local or NFS path shared by all hosts)
      Reported: 76.5% top-1 after 90 epochs on a TPUv3-8 in ~7h (the paper);
      not run here (no ImageNet on this machine).

The CIFAR configs read the prepared TFDS copy; point TFDS_DATA_DIR (or
--config.data_dir) at it, e.g. ../shared/data/tensorflow_datasets.
"""
import ml_collections

from configs import common


def _cifar10(config: ml_collections.ConfigDict, width: int, depth: int,
             steps: int, crop_min_area: float) -> ml_collections.ConfigDict:
  config.model_name = 'ViT-Ti_16'
  config.model.update(dict(patch_size=4, hidden_size=width, num_layers=depth,
                           mlp_dim=2 * width, num_heads=width // 64))
  return _cifar10_recipe(config, steps, crop_min_area)


def _cifar10_recipe(config: ml_collections.ConfigDict, steps: int,
                    crop_min_area: float) -> ml_collections.ConfigDict:
  config.dataset = 'cifar10'
  config.image_size = 32
  config.crop_min_area = crop_min_area
  config.batch_size = 128
  config.eval_batch_size = 400  # 10,000 test images, 8 or 16 devices
  config.total_steps = steps
  config.optimizer.name = 'adamw'
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.05
  # 5 % of the run, also when --config.total_steps changes it.
  config.schedule.warmup_steps = config.get_ref('total_steps') // 20
  config.label_smoothing = 0.1
  config.log_every = 50
  config.checkpoint_every = 500
  return config


def get_config(arg: str = 'cifar10') -> ml_collections.ConfigDict:
  config = common.get_config()
  if arg == 'cifar10_quick':
    # Short schedules want mild augmentation: crops of 60-100 % of the image
    # (experiments/cifar10_recipe.py: 0.05 -> 36.9 %, 0.35 -> 43.2 %, 0.6 ->
    # 45.0 %).
    return _cifar10(config, width=128, depth=4, steps=600, crop_min_area=0.6)
  if arg == 'cifar10':
    # The quick ViT for 19 epochs: on 2 cores a longer schedule of the small
    # model beats a bigger model in the same hour (experiments/README.md).
    config = _cifar10(config, width=128, depth=4, steps=7500,
                      crop_min_area=0.35)
    config.eval_every = 2500
    return config
  if arg == 'cifar10_bit':
    # The ResNet baseline with the ViTs' recipe: a BiT ResNet-v2 with two
    # units per stage (an R26x1) on CIFAR-10 at 32px.
    config.model_name = 'BiT-R50x1'
    config.model.resnet_layers = (2, 2, 2, 2)
    return _cifar10_recipe(config, steps=600, crop_min_area=0.05)
  if arg == 'cifar10_mpp':
    # Self-supervised: the quick ViT learns to predict the 3-bit mean colour
    # of corrupted patches; CIFAR-10's labels are not used.
    config = _cifar10(config, width=128, depth=4, steps=600,
                      crop_min_area=0.6)
    config.objective = 'masked_patches'
    config.label_smoothing = 0.0
    config.fewshot.datasets = 'cifar10'  # linear probe of frozen features
    config.fewshot.shots = '10,25'
    return config
  if arg == 'imagenet_s16':
    config.model_name = 'ViT-S_16'
    config.model.classifier = 'gap'
    config.dataset = 'imagenet2012'
    config.train_split = 'train[:99%]'  # minival held out, as in the paper
    config.eval_split = 'train[99%:]'
    config.image_size = 224
    config.eval_resize = 'resize_crop'
    config.batch_size = 1024
    config.eval_batch_size = 1024
    config.total_steps = 90 * 1_281_167 // 1024
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = 1e-3
    # optax scales the decoupled decay by the lr: 0.1 * 1e-3 = big_vision's 1e-4.
    config.optimizer.weight_decay = 0.1
    config.schedule.warmup_steps = 10_000
    config.grad_clip_norm = 1.0
    config.randaugment_layers = 2
    config.randaugment_magnitude = 10
    config.mixup_alpha = 0.2
    config.eval_every = 5000
    config.checkpoint_every = 2000
    return config
  raise ValueError(f'Unknown pretrain config {arg!r}; allowed: cifar10_quick, '
                   'cifar10, cifar10_bit, cifar10_mpp, imagenet_s16.')
