"""The paper's setups at their scale (arXiv 2010.11929, Appendix B.1).

  pretrain,B_16 | pretrain,L_16 | pretrain,H_14
      224px, batch 4096, Adam (b1 0.9, b2 0.999), weight decay 0.1, linear
      warmup 10k steps then linear decay, grad-norm clipping 1, 90 epochs of
      ImageNet-21k's 14.2M images (JFT-300M is not public). The dataset is a
      TFDS name you have prepared (--config.dataset); plans read no data and
      take its classes from --num_classes (21843 for ImageNet-21k).
  finetune384,<model> | finetune512,<model>
      SGD momentum 0.9, batch 512, no weight decay, clipping 1, 500 warmup
      steps then cosine, 20k steps on ImageNet at 384 or 512px (518 for
      H_14, whose patches are 14 px), position embedding interpolated.

Planned for TPU v3 slices with `python -m vit_jax.plan` (2026-12-01, jax
0.10.2, libtpu 0.0.42.1, compiled on a 2-core CPU; every row, number and
command in experiments/README.md, "Planning"). The rule: of the plans whose
memory leaves 10 % of a v3 core's usable 15.48 GiB free (XLA's estimates
move between versions), the fastest by the compiler's bound. Layers are
unrolled: scanned layers cost ~4x the temporaries on TPU (B/16: 7.1 vs
1.8 GiB) for a faster compile only.

  pretrain,B_16 on v3:8x8 (128 cores, 32 images each): FSDP over 8, no
      remat: 2.1 GiB, 836 images/s per chip at the bound (DP: 778).
  pretrain,L_16: FSDP 8, no remat: 5.7 GiB, 260 per chip (DP: 8.3, 238).
  pretrain,H_14: FSDP 8, no remat: 13.5 GiB, 97 per chip (DP: 14.0, 87).
  finetune384 on v3:2x2 (8 cores, 64 images each): B_16 DP with remat
      'full' (4.0 GiB; without: 14.4, too tight), L_16 DP without remat
      (13.8), H_14 DP 'full' (13.6; without: 29.2 GiB, does not fit).
  finetune512 on v3:2x2: remat 'full'; B_16 DP (8.8), L_16 DP (13.2),
      H_14 FSDP 8 with two accumulated half-batches: 13.4 GiB (the plan's
      own suggestion; without accumulation 23.9 GiB, DP 29.6).

  <setup>,<model>,h100_8 | <setup>,<model>,h100_4x8  (setup pretrain or
      finetune384) The same runs for one host of 8 H100s or four, with
      cuDNN attention, planned with `python -m vit_jax.plan` for GPUs
      (2026-12-06, jax 0.10.2 with the CUDA plugin, no GPU; every row and
      command in experiments/README.md, "Planning the paper's runs on H100
      hosts", made by experiments/plan_gpus.py). The rule is the TPU
      configs': of the plans leaving 10 % of the 59.3 GiB JAX's allocator
      takes of an H100 free, the fastest by the roofline bound (images/s per
      GPU; a bound, not a measurement). Batches stay the paper's.

  pretrain on h100_8 (512 images per GPU), FSDP over the host's 8 GPUs:
      B_16 no remat: 38.2 GiB, 6,447 images/s per GPU at the bound;
      L_16 two accumulated half-batches: 51.2 GiB, 2,395 (no remat, one
      batch: 73.3 GiB; 'full' remat: 10.5 GiB, 1,690);
      H_14 eight accumulated micro-batches of 64: 31.6 GiB, 985 (four:
      56.2 GiB, inside 59.3 but not the margin; 'full' remat: 19.5 GiB,
      781).
  pretrain on h100_4x8 (128 per GPU), FSDP 8 (within each host): B_16
      9.8 GiB, 6,231; L_16 25.7 GiB, 2,347; H_14 'full' remat 6.6 GiB, 756
      (without: 55.7 GiB, inside 59.3 but not the margin).
  finetune384 on h100_8 (64 per GPU): B_16 data parallel 16.3 GiB, 1,955;
      L_16 DP 43.0 GiB, 724; H_14 FSDP 8 with two accumulated half-batches
      42.8 GiB, 303 (one batch: 60.8 GiB, does not fit).
  finetune384 on h100_4x8 (16 per GPU): B_16 DP 4.7 GiB, 1,622; L_16 DP
      12.6 GiB, 602; H_14 FSDP 8 21.9 GiB, 303.
  Each is the plan of (h100_4x8: --topology=h100:4x8; finetune384:
  --num_classes=1000):

    python -m vit_jax.plan --config=configs/paper.py:pretrain,L_16,h100_8 \
        --topology=h100:8 --num_classes=21843

A TPU plan, and a run (on GPUs name the config with its hosts, e.g.
pretrain,L_16,h100_8):

    python -m vit_jax.plan --config=configs/paper.py:pretrain,L_16 \
        --topology=v3:8x8 --num_classes=21843
    python -m vit_jax.main --config=configs/paper.py:pretrain,L_16 \
        --config.dataset=<your ImageNet-21k TFDS name> --workdir=...
"""
import ml_collections

from configs import common

_PRETRAIN_EPOCHS, _IMAGENET21K_IMAGES = 90, 14_197_122
# Per (setup, model): (fsdp, remat_policy, accum_steps), from the plans.
_PLANNED = {
    ('pretrain', 'B_16'): (8, 'none', 1),
    ('pretrain', 'L_16'): (8, 'none', 1),
    ('pretrain', 'H_14'): (8, 'none', 1),
    ('finetune384', 'B_16'): (1, 'full', 1),
    ('finetune384', 'L_16'): (1, 'none', 1),
    ('finetune384', 'H_14'): (1, 'full', 1),
    ('finetune512', 'B_16'): (1, 'full', 1),
    ('finetune512', 'L_16'): (1, 'full', 1),
    ('finetune512', 'H_14'): (8, 'full', 2),
}
# Per (setup, model, H100 hosts): (fsdp, remat_policy, accum_steps), from the
# GPU plans (docstring); all with cuDNN attention.
_PLANNED_GPU = {
    ('pretrain', 'B_16', 'h100_8'): (8, 'none', 1),
    ('pretrain', 'L_16', 'h100_8'): (8, 'none', 2),
    ('pretrain', 'H_14', 'h100_8'): (8, 'none', 8),
    ('pretrain', 'B_16', 'h100_4x8'): (8, 'none', 1),
    ('pretrain', 'L_16', 'h100_4x8'): (8, 'none', 1),
    ('pretrain', 'H_14', 'h100_4x8'): (8, 'full', 1),
    ('finetune384', 'B_16', 'h100_8'): (1, 'none', 1),
    ('finetune384', 'L_16', 'h100_8'): (1, 'none', 1),
    ('finetune384', 'H_14', 'h100_8'): (8, 'none', 2),
    ('finetune384', 'B_16', 'h100_4x8'): (1, 'none', 1),
    ('finetune384', 'L_16', 'h100_4x8'): (1, 'none', 1),
    ('finetune384', 'H_14', 'h100_4x8'): (8, 'none', 1),
}
_LEARNING_RATES = {'B_16': 1e-3, 'L_16': 1e-3, 'H_14': 1e-3}


def get_config(arg: str = 'pretrain,B_16') -> ml_collections.ConfigDict:
  setup, size, *gpus = arg.split(',')
  known = ({f'{s},{m}' for s, m in _PLANNED}
           | {f'{s},{m},{h}' for s, m, h in _PLANNED_GPU})
  if arg not in known:
    raise ValueError(f'Unknown paper config {arg!r}; allowed: '
                     f'{", ".join(sorted(known))}.')
  config = common.get_config()
  config.model_name = f'ViT-{size}'
  if gpus:
    fsdp, remat, accum = _PLANNED_GPU[(setup, size, gpus[0])]
    config.model.attention_impl = 'cudnn'
  else:
    fsdp, remat, accum = _PLANNED[(setup, size)]
  config.accum_steps = accum
  config.model.scan_layers = False  # unrolled: see the docstring
  config.model.remat_policy = remat
  config.mesh.fsdp = fsdp
  config.model.dtype = 'bfloat16'
  config.grad_clip_norm = 1.0
  if setup == 'pretrain':
    config.dataset = 'imagenet21k'
    config.image_size = 224
    config.batch_size = 4096
    config.eval_batch_size = 4096
    config.total_steps = (_PRETRAIN_EPOCHS * _IMAGENET21K_IMAGES
                          // config.batch_size)
    config.optimizer.name = 'adamw'
    config.optimizer.learning_rate = _LEARNING_RATES[size]
    config.optimizer.weight_decay = 0.1
    config.schedule.name = 'linear'
    config.schedule.warmup_steps = 10_000
    config.eval_resize = 'resize_crop'
    config.checkpoint_every = 5000
    config.eval_every = 10_000
    return config
  config.dataset = 'imagenet2012'
  config.image_size = {'finetune384': 384, 'finetune512': 512}[setup]
  if size == 'H_14':
    config.image_size = {384: 392, 512: 518}[config.image_size]  # 14-px patches
  config.pretrained.posemb_method = 'bilinear'
  config.batch_size = 512
  config.eval_batch_size = 512
  config.total_steps = 20_000
  config.optimizer.name = 'sgd'
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.01
  config.schedule.name = 'cosine'
  config.schedule.warmup_steps = 500
  config.checkpoint_every = 1000
  return config
