"""Pod runs planned without a pod: the real train step compiled for TPU slices.

Imports jax, Flax, optax and libtpu (only when a plan is made); never
TensorFlow. `plan`: `make_plan` and its report; `topology`: a slice's
devices; `chips`: peak FLOP/s and HBM per chip; `hlo`: the collectives of a
compiled program; `flops`: matmul FLOPs of a traced program, loops counted.
"""
