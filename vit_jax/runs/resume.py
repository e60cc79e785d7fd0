"""Resuming checks the checkpoint's config against the one given now.

A checkpoint means something only together with the config that made it: the
model and dataset fix what the parameters are, the batch size, seed and split
what the data position counts. Resuming with a config that differs in such a
field is refused with one line listing each difference (old -> new), before
anything is built:

  * FIXED fields can never change on resume (the architecture, the dataset,
    the resolution, the optimizer's kind): start a new workdir that
    fine-tunes from this one (`--config.pretrained.path=<workdir>`).
  * FREE fields never matter to the state (logging, evaluation, checkpoint
    cadence, mesh, multi-host set-up, recomputation): they change silently.
  * Any other field (batch size, learning rate, schedule, total steps, seed,
    augmentation, ...) changes only when named in `--config.resume_accept`
    (comma-separated field names or `group.*`), e.g. to continue a run for
    longer: `--config.total_steps=20000 --config.resume_accept=total_steps`.
    The data position is stored in examples, so a new batch size resumes at
    the same example.
"""
from collections.abc import Mapping
import fnmatch
import json
from typing import Any

import ml_collections

# Patterns over '.'-joined config paths.
FIXED = ('model_name', 'model.patch_size', 'model.hidden_size',
         'model.num_layers', 'model.num_heads', 'model.mlp_dim',
         'model.resnet_layers', 'model.resnet_width', 'model.classifier',
         'model.representation_size', 'model.scan_layers',
         'model.param_dtype', 'dataset', 'image_size', 'optimizer.name',
         'objective', 'masked_patches.target', 'masked_patches.bits',
         'masked_patches.color_grid')
FREE = ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints',
        'eval_batch_size', 'eval_split', 'eval_resize', 'data_dir',
        'manual_dir', 'mesh.*', 'distributed.*', 'on_nonfinite',
        'pretrained.*', 'resume_accept', 'model.remat_policy',
        'model.attention_impl', 'fewshot.*')


class ResumeConfigError(ValueError):
  """The config given differs from the checkpoint's in fields that matter."""


def flatten(config: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update(flatten(value, f'{prefix}{key}.'))
    else:
      flat[prefix + key] = list(value) if isinstance(value, tuple) else value
  return flat


def _matches(path: str, patterns) -> bool:
  return any(fnmatch.fnmatchcase(path, p) for p in patterns)


def accepted_patterns(config: ml_collections.ConfigDict) -> list[str]:
  return [p.strip() for p in str(config.get('resume_accept', '')).split(',')
          if p.strip()]


def check(stored_config_json: str, config: ml_collections.ConfigDict,
          workdir: str, extra: Mapping[str, tuple[Any, Any]] = ()) -> list[str]:
  """Raises ResumeConfigError for refused differences; returns accepted ones.

  `extra` adds facts outside the config as path -> (old, new), e.g. the
  number of processes that the data position was counted over.
  """
  old = flatten(json.loads(stored_config_json))
  new = flatten(config.to_dict())
  accept = accepted_patterns(config)
  diffs = {path: (old[path], new[path]) for path in sorted(set(old) & set(new))
           if old[path] != new[path] and not _matches(path, FREE)}
  diffs.update(dict(extra))
  if not diffs:
    return []
  fixed = [p for p in diffs if _matches(p, FIXED)]
  refused = [p for p in diffs if p not in fixed and not _matches(p, accept)]
  if fixed or refused:
    changes = ', '.join(f'{p} {diffs[p][0]!r} -> {diffs[p][1]!r}'
                        for p in [*fixed, *refused])
    advice = []
    if fixed:
      advice.append(
          f'{", ".join(fixed)} cannot change on resume: to continue from '
          f'these weights, train into a new --workdir with '
          f'--config.pretrained.path={workdir}.')
    if refused:
      advice.append(f'To accept {"the other" if fixed else "the"} '
                    f'change{"s" if len(refused) > 1 else ""}, add '
                    f'--config.resume_accept={",".join(refused)}.')
    raise ResumeConfigError(
        f'{workdir} holds a run with another config: {changes}. '
        + ' '.join(advice))
  return [f'{p} {diffs[p][0]!r} -> {diffs[p][1]!r}' for p in diffs]
