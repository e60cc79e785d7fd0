"""Defaults shared by every experiment config; each config overrides a few.

Every field here exists so that `--config.<field>=...` can override it (the
config is locked: a misspelt field is an error).
"""
import ml_collections

from vit_jax import models

# Every VisionTransformer option a config may override, with its type
# (bfloat16 compute: --config.model.dtype=bfloat16; square patches as one int).
MODEL_OPTIONS = models.option_types()


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Model: a registry name (vit_jax.models.MODELS) and field overrides;
  # None keeps the registry's value.
  config.model_name = 'ViT-Ti_16'
  config.model = ml_collections.ConfigDict(
      {name: ml_collections.FieldReference(None, field_type=field_type)
       for name, field_type in MODEL_OPTIONS.items()})

  # Data: TFDS name (or 'imagefolder:/path'); empty splits/size -> presets.
  config.dataset = 'cifar10'
  config.data_dir = ''  # '' -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.manual_dir = ''
  config.train_split = ''
  config.eval_split = ''
  config.image_size = 0  # 0 -> the dataset preset's resolution
  config.eval_resize = 'resize'  # Google's fine-tuning protocol; or 'resize_crop'
  config.crop_min_area = 0.05  # inception crop: 5-100 % of the image area
  config.randaugment_layers = 0  # 0 disables RandAugment
  config.randaugment_magnitude = 10
  config.mixup_alpha = 0.0
  config.cutmix_alpha = 0.0
  # True: every process reads the whole split and keeps its slice of each
  # global batch, so batches (and results) do not depend on the number of
  # processes. Cheap for CIFAR-sized data, costly for ImageNet on many hosts.
  config.input_global_order = False

  # Fine-tuning: start from these weights (an .npz in any published layout,
  # or a training workdir), adapting the head and resizing the position
  # embedding ('bilinear' as Google's fine-tuning, 'bicubic' as timm, or
  # 'reinit' to learn it afresh).
  config.pretrained = ml_collections.ConfigDict(dict(
      path='', posemb_method='bilinear'))

  # Optimisation.
  config.batch_size = 512  # global, over all devices and processes
  config.eval_batch_size = 512
  config.accum_steps = 1  # micro-batches per step (gradient accumulation)
  config.total_steps = 0  # 0 -> the dataset preset's default
  config.label_smoothing = 0.0
  config.grad_clip_norm = 1.0
  config.optimizer = ml_collections.ConfigDict(dict(
      name='sgd', learning_rate=0.03, momentum=0.9, nesterov=False,
      accumulator_dtype='float32', b1=0.9, b2=0.999, eps=1e-8,
      weight_decay=0.0, mu_dtype='float32',
      # Regex over '/'-joined param paths; '^(?!head/)' = linear probe.
      freeze='',
      # 'regex:factor,...', e.g. 'Transformer/encoderblock_[0-5]/:0.1'.
      lr_multipliers=''))
  config.schedule = ml_collections.ConfigDict(dict(
      name='cosine', warmup_steps=500, end_learning_rate=0.0))
  config.on_nonfinite = 'stop'  # or 'skip' (keep the previous state)

  # What is optimised: 'classification' (the labels) or 'masked_patches'
  # (self-supervised masked patch prediction, the paper's section 4.6; labels
  # unused; options in vit_jax.training.masked_patches).
  config.objective = 'classification'
  config.masked_patches = ml_collections.ConfigDict(dict(
      corrupt_rate=0.5, mask_rate=0.8, random_rate=0.1, target='color',
      bits=3, color_grid=1))

  # Devices: mesh.data=-1 takes all devices not used by fsdp.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1,
                                               fsdp_min_size=2**14))
  # Multi-host: set coordinator_address (or $JAX_COORDINATOR_ADDRESS), or
  # auto=True where JAX detects the cluster (TPU pods, SLURM, ...). If a
  # process dies, the others abort once it has missed heartbeats this long.
  # Each process waits at most wait_s for the others to start.
  config.distributed = ml_collections.ConfigDict(dict(
      coordinator_address='', num_processes=1, process_id=0, auto=False,
      heartbeat_timeout_s=100, wait_s=300))

  # Few-shot linear evaluation of the pre-logits (vit_jax.evaluation.fewshot):
  # comma-separated datasets ('' = off) and shot counts; at each evaluation
  # (every_steps=0) or every `every_steps` steps, and at the end. Splits ''
  # -> each dataset's train / evaluation split.
  config.fewshot = ml_collections.ConfigDict(dict(
      datasets='', shots='1,5,10,25', every_steps=0, seed=0, l2_reg=1024.0,
      train_split='', test_split=''))

  # Bookkeeping.
  config.log_every = 50
  config.eval_every = 0  # 0: evaluate at the end only
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  # Resuming refuses a config that differs from the checkpoint's in fields
  # that change what the state means; name the changes to accept here,
  # comma-separated ('total_steps', 'optimizer.*'). See vit_jax.runs.resume.
  config.resume_accept = ''
  return config
