"""Fine-tuning a pretrained ViT at a higher resolution (Google's protocol).

Defaults of "An Image is Worth 16x16 Words", Appendix B.1.1: SGD momentum
0.9, batch 512, no weight decay, global-norm clipping at 1, 500 warmup steps
then cosine decay, 384px with the position embedding interpolated
(bilinear), plain resize for evaluation; 10k steps for CIFAR, 20k for
ImageNet, lr 0.03 (CIFAR) / 0.01 (ImageNet) here by default.

Argument: "<dataset>" or "<dataset>,<model>", where <model> is a registry
name or "pretrain:<arg>" for the architecture of configs/pretrain.py:<arg>
(to fine-tune one of our own pretraining runs), e.g.
  python -m vit_jax.main --config=configs/finetune.py:cifar10,ViT-B_16 \
      --config.pretrained.path=ViT-B_16.npz --workdir=/tmp/ft_cifar10
  python -m vit_jax.main --config=configs/finetune.py:cifar10,pretrain:cifar10 \
      --config.pretrained.path=/tmp/vit_cifar10 --config.image_size=64 ...
Datasets: cifar10, cifar100, oxford_iiit_pet, oxford_flowers102,
imagenet2012. Not run here: no official weights can be fetched on this
machine and a ViT-B/16 at 384px needs an accelerator.
"""
import ml_collections

from configs import common
from configs import pretrain

_STEPS_AND_LR = {
    'cifar10': (10_000, 0.03), 'cifar100': (10_000, 0.03),
    'oxford_iiit_pet': (500, 0.01), 'oxford_flowers102': (500, 0.01),
    'imagenet2012': (20_000, 0.01),
}


def get_config(arg: str = 'cifar10,ViT-B_16') -> ml_collections.ConfigDict:
  dataset, _, model_name = arg.partition(',')
  if dataset not in _STEPS_AND_LR:
    raise ValueError(f'Unknown fine-tuning dataset {dataset!r}; allowed: '
                     f'{", ".join(_STEPS_AND_LR)}.')
  steps, lr = _STEPS_AND_LR[dataset]
  config = common.get_config()
  if model_name.startswith('pretrain:'):
    source = pretrain.get_config(model_name.removeprefix('pretrain:'))
    config.model_name = source.model_name
    config.model = source.model
  else:
    config.model_name = model_name or 'ViT-B_16'
  config.dataset = dataset
  config.image_size = 384
  config.eval_resize = 'resize'
  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = steps
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = lr
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = min(500, steps // 10)
  config.grad_clip_norm = 1.0
  config.pretrained.posemb_method = 'bilinear'
  config.checkpoint_every = 1000
  return config
