"""The fine-tuning start: pretrained weights adapted to the model being trained.

`--config.pretrained.path` names any model `sources.load` reads: an `.npz`
in any published layout, a training workdir (read without disturbing a run
that may still write it), an export, a timm or Hugging Face folder, or a Hub
id (`hf-hub:timm/vit_base_patch16_224.augreg_in21k`). Its weights are fitted to the new
model (`checkpoint.load_pretrained`): a new head for the new classes, the
patch embedding resized to a new patch size (FlexiViT's PI-resize), the
position embedding resized to the new patch grid with
`pretrained.posemb_method` ('bilinear' as Google's fine-tuning, 'bicubic' as
timm, 'reinit' to learn positions afresh), and a record says what changed.
"""
import os
from typing import Any

import numpy as np

from vit_jax import checkpoint
from vit_jax import sources
from vit_jax.checkpoint import arrays
from vit_jax.checkpoint import layout
from vit_jax.checkpoint import posemb
from vit_jax import models


def _source_weights(path: str | os.PathLike
                    ) -> tuple[dict[str, Any], str, tuple[int, int] | None,
                               str]:
  """(params, kind, patch grid or None to infer, pretraining objective) of
  the weights at `path`."""
  kind = sources.kind_of(path)
  if kind == 'npz':
    return checkpoint.load_npz(path), kind, None, 'classification'
  # A workdir, export, timm, Hugging Face, Hub id; a self-supervised workdir
  # gives its encoder (no prediction head, no mask token).
  source = sources.load(path)
  return (source.params, kind, source.model.token_grid(source.image_size),
          source.origin.get('objective', 'classification'))


def pretrained_params(path: str | os.PathLike, fresh: dict[str, Any],
                      model: models.VisionTransformer,
                      image_size: tuple[int, int], posemb_method: str
                      ) -> tuple[dict[str, Any], dict[str, Any]]:
  """The weights at `path` adapted to `model` at `image_size`; what changed.

  `fresh` (the model's own initial params) gives the new head and, with
  posemb_method='reinit', the position embedding. The record, which the
  trainer writes to the workdir as adaptation.json, says which head, grid
  and pre-logits were adapted.
  """
  weights, kind, old_grid, objective = _source_weights(path)
  new_grid = model.token_grid(image_size)
  params = checkpoint.load_pretrained(
      weights, fresh, model, new_grid=new_grid, old_grid=old_grid,
      posemb_method='bilinear' if posemb_method == 'reinit' else posemb_method)
  classes = lambda p: p['head']['kernel'].shape[-1] if 'head' in p else 0
  record = {
      'source_kind': kind, 'path': os.fspath(path),
      # masked_patches: the prediction head and mask token were dropped.
      'pretraining_objective': objective,
      'head': {'classes': [classes(weights), classes(params)],
               're_initialised': True},
  }
  if 'Transformer' not in params:  # a ResNet: nothing else to adapt
    return params, record
  if posemb_method == 'reinit':
    params['Transformer']['posembed_input'] = fresh['Transformer'][
        'posembed_input']
  old_posemb = layout.to_linen_layout(
      arrays.flatten(weights))[layout.POSEMB]
  new_posemb = params['Transformer']['posembed_input']['pos_embedding']
  prefix = new_posemb.shape[1] - new_grid[0] * new_grid[1]
  old_grid = old_grid or posemb.infer_grid(old_posemb.shape[1] - prefix)
  patch = lambda p: tuple(np.shape(p['embedding']['kernel'])[:2])
  record.update({
      'posemb_method': posemb_method,
      'position_embedding_grid': [list(old_grid), list(new_grid)],
      'position_embedding_resized': tuple(old_grid) != tuple(new_grid),
      'pre_logits': ['pre_logits' in weights, 'pre_logits' in params],
      'patch_size': [list(patch(weights)), list(patch(params))],
      'patch_embedding_resized': patch(weights) != patch(params),
  })
  return params, record
