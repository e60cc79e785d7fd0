"""Input pipelines (tf.data): the only package that imports TensorFlow.

`sources`: TFDS datasets and image folders as record streams; `pipeline`:
deterministic, resumable training streams and exactly-once evaluation, as
global jax.Arrays; `preprocess` and `augment`: the TensorFlow image ops;
`tf`: TensorFlow itself, imported quietly. `presets` (splits, classes and
defaults known without reading a dataset) is the one TensorFlow-free module.
"""
