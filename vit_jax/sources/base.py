"""A whole model, wherever it came from: architecture, weights, eval protocol.

A `Source` holds the architecture (rebuilt for inference with
INFERENCE_OPTIONS), its parameters as our model's own tree (numpy, encoder
blocks unrolled), the resolution, label names, the eval preprocessing and what
it was loaded from. Google's original names exist only in the files written
(`original_flat`) and inside the exported function (`exported_logits_fn`).
"""
from collections.abc import Mapping, Sequence
import dataclasses
from typing import Any, Callable

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vit_jax.base import errors
from vit_jax.base import limits
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout
from vit_jax.checkpoint import posemb
from vit_jax import models
from vit_jax.serving import classifier as serving_classifier
from vit_jax.serving import images

# Overrides for the exported/served model: params come unrolled, and remat,
# scan and cuDNN attention only matter for training or on one platform.
INFERENCE_OPTIONS = dict(scan_layers=False, remat_policy='none',
                         attention_impl='xla')


def inference_options(model_name: str) -> dict[str, Any]:
  """INFERENCE_OPTIONS that the architecture of `model_name` has (a BiT
  ResNet has none of them)."""
  fields = models.model_fields(model_name)
  return {k: v for k, v in INFERENCE_OPTIONS.items() if k in fields}


@dataclasses.dataclass(frozen=True)
class Source:
  """A model to export, run or inspect: architecture, params, eval protocol."""
  model: models.Model  # with INFERENCE_OPTIONS
  model_name: str
  params: dict[str, Any]  # our linen tree, numpy, blocks unrolled
  image_size: tuple[int, int]
  label_names: list[str] | None
  preprocessing: images.Preprocessing  # eval: resize, interpolation, scaling
  step: int | None
  origin: dict[str, Any]  # what the card records as its source

  def __post_init__(self):
    # Every source's resolution (from a config.json, a card, a flag) is
    # bounded here, before a model is run or a position embedding resized.
    check_image_size(self.image_size, self.origin.get('path', self.model_name))


def check_image_size(image_size: Sequence[int], source: str) -> None:
  """limits.LimitError if a side of `image_size` is over limits.INPUT_SIDE."""
  limits.INPUT_SIDE.check(max(image_size), f'{source}: input size '
                          f'{"x".join(map(str, image_size))}')


def inference_params(params: Any) -> dict[str, Any]:
  """Any params tree (any published layout, scanned or not) -> our unrolled
  linen tree of numpy arrays."""
  flat = arrays.flatten(jax.device_get(params))
  flat = layout.unstack_blocks(layout.to_linen_layout(flat))
  return arrays.unflatten({k: np.asarray(v) for k, v in flat.items()})


def original_flat(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our linen tree -> flat arrays under Google's original names (the files')."""
  return {k: np.asarray(v) for k, v in layout.to_original_layout(
      arrays.flatten(params)).items()}


def check_shapes(model: models.VisionTransformer, params: Mapping[str, Any],
                 image_size: tuple[int, int], source: str, what: str) -> None:
  """One ValueError listing every param the model lacks, wants or reshapes."""
  init = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_size, 3))))['params']
  want = {k: tuple(v.shape) for k, v in arrays.flatten(init).items()}
  have = {k: tuple(np.shape(v)) for k, v in arrays.flatten(params).items()}
  problems = [f'{k}: file {have.get(k, "-")}, model {want.get(k, "-")}'
              for k in sorted(set(want) | set(have))
              if want.get(k) != have.get(k)]
  if problems:
    raise ValueError(f'{source} does not fit {what}:'
                     + errors.listing('params that differ', problems, 20))


def at_image_size(source: Source, image_size: Sequence[int]) -> Source:
  """`source` at another resolution: its position embedding resized.

  The patch grid part is interpolated bilinearly (`checkpoint.posemb`), as
  fine-tuning at a new resolution does; the class-token slot is kept.
  """
  image_size = tuple(int(s) for s in image_size)
  check_image_size(image_size, source.origin.get('path', source.model_name))
  source.model.check_input_shape((1, *image_size, 3))
  if layout.POSEMB not in arrays.flatten(source.params):  # a ResNet
    return dataclasses.replace(source, image_size=image_size)
  old_grid = source.model.token_grid(source.image_size)
  grid = source.model.token_grid(image_size)
  if grid == old_grid:
    return dataclasses.replace(source, image_size=image_size)
  logging.info('Position embedding resized from %s to %s.', old_grid, grid)
  flat = arrays.flatten(source.params)
  flat[layout.POSEMB] = posemb.interpolate_posemb(
      flat[layout.POSEMB], grid, old_grid=old_grid,
      num_prefix_tokens=source.model.posemb_prefix_tokens)
  return dataclasses.replace(source, params=arrays.unflatten(flat),
                             image_size=image_size)


def logits_fn(model: models.VisionTransformer,
              preprocessing: images.Preprocessing = images.Preprocessing()
              ) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
  """(linen params, float32 pixels in [0, 255]) -> logits."""
  def fn(params, pixels):
    # Cast up first: bfloat16 weights then compute like float32 ones rounded.
    params = jax.tree.map(lambda v: v.astype(model.param_dtype), params)
    x = images.normalize(pixels.astype(jnp.float32), preprocessing)
    return model.apply({'params': params}, x, train=False)
  return fn


def exported_logits_fn(model: models.VisionTransformer,
                       preprocessing: images.Preprocessing
                       ) -> Callable[[dict[str, Any], jax.Array], jax.Array]:
  """`logits_fn` taking the flat original-named params of the exported files."""
  fn = logits_fn(model, preprocessing)
  return lambda flat, pixels: fn(
      arrays.unflatten(layout.to_linen_layout(flat)), pixels)


def check_classifier(source: Source) -> None:
  """ValueError unless `source` has a classifier head (a self-supervised
  encoder has none)."""
  if not source.model.num_classes:
    raise ValueError(
        f'{source.origin["path"]} has no classifier head (a '
        f'{source.origin.get("objective", "feature")} model: its output is '
        'features): fine-tune it first (--config.pretrained.path=...), or '
        'evaluate its features with --fewshot.')


def classifier(source: Source) -> serving_classifier.Classifier:
  """`source` run with the model code, as predict and evaluate call it."""
  check_classifier(source)
  fn = jax.jit(logits_fn(source.model, source.preprocessing))
  params = jax.device_put(source.params)
  return serving_classifier.Classifier(
      lambda pixels: np.asarray(fn(params, pixels)), source.image_size,
      source.preprocessing, source.label_names or serving_classifier.numbered(
          source.model.num_classes),
      f'{source.model_name} from {source.origin["path"]}')
