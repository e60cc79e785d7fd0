"""Vision Transformer in JAX/Flax: models, checkpoints, input pipelines, training."""
