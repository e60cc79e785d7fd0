"""Running an exported ViT from its files alone: no Flax, no TensorFlow.

Imports jax, numpy, safetensors and Pillow; never Flax, TensorFlow, Orbax or
optax, so a deployment needs nothing else.

    model = serving.load('export_dir')                   # or its .card.json
    logits = model(model.preprocess(images.load_rgb('cat.jpg'))[None])

`runtime`: `load` and the StableHLO call; `card`: the export card and the
checks of every file against it; `images`: the one image decoder and the
evaluation preprocessing, in numpy.
"""
from vit_jax.serving.card import CARD_SUFFIX
from vit_jax.serving.card import CardError
from vit_jax.serving.card import params_checksum
from vit_jax.serving.card import read_card
from vit_jax.serving.card import read_labels
from vit_jax.serving.runtime import ExportedModel
from vit_jax.serving.runtime import load

__all__ = ['CARD_SUFFIX', 'CardError', 'ExportedModel', 'load',
           'params_checksum', 'read_card', 'read_labels']
