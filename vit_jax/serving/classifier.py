"""A classifier of pixels, however the model was loaded.

predict and evaluate run a model on batches of float32 [B, H, W, 3] pixels
in [0, 255] (`images.eval_pixels`); a `Classifier` is that function with the
resolution, preprocessing and label names it needs. `from_export` runs an
export's StableHLO function, without the model code; `sources.classifier`
builds one from a Source, with it.
"""
from collections.abc import Callable
import dataclasses
import os

import numpy as np

from vit_jax.serving import card as card_lib
from vit_jax.serving import images
from vit_jax.serving import runtime


@dataclasses.dataclass(frozen=True)
class Classifier:
  """What predict and evaluate need of a model, however it was loaded."""
  logits: Callable[[np.ndarray], np.ndarray]  # float32 [B, H, W, 3] 0..255
  image_size: tuple[int, int]
  preprocessing: images.Preprocessing
  label_names: list[str]
  description: str


def numbered(num_classes: int) -> list[str]:
  return [f'class_{i}' for i in range(num_classes)]


def from_export(path: str | os.PathLike) -> Classifier:
  """The StableHLO function of the export at `path` (card or folder)."""
  served = runtime.load(path)
  return Classifier(served, served.image_size, served.preprocessing,
                    served.label_names or numbered(served.num_classes),
                    f'StableHLO export {served.card_path}')


def with_labels(classifier: Classifier, labels: str | os.PathLike
                ) -> Classifier:
  return dataclasses.replace(classifier, label_names=card_lib.read_labels(
      labels, len(classifier.label_names)))
