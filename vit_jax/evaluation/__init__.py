"""Measuring a trained model: classification metrics and inspection.

Imports jax and numpy (and the model code); never TensorFlow. `classification`:
top-1/top-5, loss, per-class accuracy and the confusion matrix over a whole
split, shared by the trainer's evaluation and `python -m vit_jax.evaluate`;
`fewshot`: few-shot linear accuracy on frozen features (the paper's quick
measure); `inspection`: the arrays behind the paper's figures (attention
rollout, position-embedding similarity, embedding filters, attention
distance).
"""
