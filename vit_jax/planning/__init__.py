"""Pod and GPU runs planned without them: the real train step compiled for
TPU slices and NVIDIA GPU hosts.

Imports jax, Flax, optax and libtpu or the CUDA plugin (only when a plan is
made); never TensorFlow. `plan`: `make_plan`; `report`: its text;
`topology`: the devices of a slice or of GPU hosts; `chips` and `gpus`:
published peaks, memory and bandwidth (and GPUs' target descriptions);
`roofline`: per-device figures and the GPU roofline; `hlo`: the collectives
of a compiled program; `kernels`: the HBM bytes and custom calls of a
compiled GPU program; `flops`: matmul FLOPs of a traced program, loops
counted; `host_input`: the CPU cores the input pipeline needs.
"""
