"""Weights in the PyTorch ecosystem's formats: timm and Hugging Face.

Imports numpy and `models`, never torch, TensorFlow, optax or Orbax: state dicts
are flat dicts of numpy arrays in PyTorch's layouts (safetensors reads and
writes them); models are read through their fields only.

`timm`: timm's VisionTransformer names and config.json; `hf`: Hugging Face
transformers' ViT names and configs. Reading such checkpoints from folders,
files and Hub ids: `vit_jax.sources.pytorch`.
"""
