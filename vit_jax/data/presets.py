"""What is known of a dataset without reading it: splits, classes, defaults.

TensorFlow-free, so that a plan (`vit_jax.planning`) can size a run on a
dataset that is not on this machine. The presets give the splits, classes,
resolution and steps of Google's ViT fine-tuning configs (a held-out tail
of train for validation); ReaL and v2 are evaluation-only ImageNet sets.
"""
import dataclasses

@dataclasses.dataclass(frozen=True)
class Preset:
  train_split: str | None
  eval_split: str
  num_classes: int
  resolution: int
  steps: int
  label_key: str = 'label'
  multi_label_key: str | None = None  # Yielded as bool [B, C] 'real_labels'.


PRESETS = {
    'cifar10': Preset('train[:98%]', 'test', 10, 384, 10_000),
    'cifar100': Preset('train[:98%]', 'test', 100, 384, 10_000),
    'oxford_iiit_pet': Preset('train[:90%]', 'test', 37, 384, 500),
    'oxford_flowers102': Preset('train', 'test', 102, 384, 500),
    'imagenet2012': Preset('train[:99%]', 'validation', 1000, 384, 20_000),
    'imagenet2012_real': Preset(None, 'validation', 1000, 384, 0,
                                label_key='original_label',
                                multi_label_key='real_label'),
    'imagenet_v2': Preset(None, 'test', 1000, 384, 0),
}
FOLDER_PRESET = Preset('train', 'test', 0, 224, 500)
OTHER_TFDS_DEFAULTS = (224, 10_000)  # resolution, steps for non-preset names.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  name: str
  num_classes: int
  train_split: str | None  # None for eval-only datasets (ImageNet ReaL, v2).
  eval_split: str | None
  num_train_examples: int
  num_eval_examples: int
  default_resolution: int
  default_steps: int
  label_names: list[str] | None = None


def preset_info(dataset: str) -> DatasetInfo:
  """The DatasetInfo a preset gives, without reading any data; ValueError
  for a dataset that is no preset (its classes must then be given)."""
  base = dataset.split('/')[0].split(':')[0]
  if base not in PRESETS:
    raise ValueError(
        f'{dataset!r} is no preset ({", ".join(PRESETS)}): its number of '
        'classes is not known without reading it; pass --num_classes.')
  p = PRESETS[base]
  return DatasetInfo(name=dataset, num_classes=p.num_classes,
                     train_split=p.train_split, eval_split=p.eval_split,
                     num_train_examples=0, num_eval_examples=0,
                     default_resolution=p.resolution, default_steps=p.steps)
