"""The run's setup: everything derived from the config before anything compiles.

`create_setup` checks every config value (`training.config`), opens the
dataset and checks its splits (the evaluation's too), builds the model, the
mesh, the schedule and the optimizer, and finds the pretrained weights. Bad
input found here, or anywhere else before the first compile, is a
SetupError: a usage error for the program, one line.
"""
import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import optax

from vit_jax import models
from vit_jax import sources
from vit_jax.data import presets
from vit_jax.parallel import mesh as mesh_lib
from vit_jax.serving import images
from vit_jax.training import config as config_lib
from vit_jax.training import objectives
from vit_jax.training import optim


class SetupError(ValueError):
  """Bad input found before anything compiled: config, data, weights, workdir."""


@contextlib.contextmanager
def before_compiling():
  """Bad input found here is a SetupError (a usage error for the program)."""
  try:
    yield
  except SetupError:
    raise
  except ValueError as e:
    raise SetupError(str(e)) from e


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything derived from the config before anything is compiled."""
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  model: models.VisionTransformer
  info: presets.DatasetInfo
  image_size: tuple[int, int]
  eval_split: str
  total_steps: int
  schedule: Callable[[jax.Array], jax.Array]
  tx: optax.GradientTransformation
  objective: objectives.Objective


def _opened_dataset(config: ml_collections.ConfigDict
                    ) -> tuple[presets.DatasetInfo, str]:
  """(info, eval split) of the config's dataset, its splits checked."""
  # Imported here: only a run reads data (TensorFlow); a plan does not.
  from vit_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  from vit_jax.data import sources as data_sources  # pylint: disable=g-import-not-at-top
  info = pipeline.get_dataset_info(config.dataset, config.data_dir or None,
                                   config.manual_dir or None)
  src = data_sources.open_source(config.dataset, config.data_dir or None,
                                 config.manual_dir or None)
  data_sources.check_split(src, config.dataset,
                           config.train_split or info.train_split)
  return info, data_sources.check_split(
      src, config.dataset, config.eval_split or info.eval_split)


def create_setup(config: ml_collections.ConfigDict,
                 info: presets.DatasetInfo | None = None,
                 devices: Sequence[jax.Device] | None = None) -> Setup:
  """Checks the config and builds the pieces; ValueError (one line) on bad input.

  The dataset is opened (its splits checked, the evaluation's too) and the
  pretrained weights found before any step is compiled. A plan passes the
  dataset's `info` (no data read, no weights needed) and the `devices` of the
  slice it compiles for.
  """
  config_lib.check(config)
  if info is None:
    info, eval_split = _opened_dataset(config)
    if config.pretrained.path:
      sources.kind_of(config.pretrained.path)  # exists and is a model
  else:
    eval_split = config.eval_split or info.eval_split
  devices = list(jax.devices() if devices is None else devices)
  image_size = images.as_size(config.image_size or info.default_resolution)
  model = models.create_model(config.model_name, info.num_classes,
                              **models.options_from_json(config.model.to_dict()))
  model.check_input_shape((1, *image_size, 3))
  objective = objectives.create(config, model, image_size)
  total_steps = config.total_steps or info.default_steps
  config_lib.check_steps(config, total_steps)
  config_lib.check_batch_sizes(config, len(devices),
                               len({d.process_index for d in devices}))
  mesh = mesh_lib.create_mesh(config.mesh.data, config.mesh.fsdp, devices)
  schedule = optim.create_schedule(config, total_steps)
  return Setup(config, mesh, model, info, image_size, eval_split, total_steps,
               schedule, optim.create_optimizer(config, schedule), objective)


def resolved_config(setup: Setup) -> dict[str, Any]:
  """The config as given, and the values its zeros and blanks resolved to."""
  return {'config': setup.config.to_dict(),
          'resolved': {'total_steps': setup.total_steps,
                       'image_size': list(setup.image_size),
                       'num_classes': setup.info.num_classes,
                       'train_split': (setup.config.train_split
                                       or setup.info.train_split),
                       'eval_split': setup.eval_split}}
