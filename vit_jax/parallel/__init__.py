"""Devices: the (data, fsdp) mesh, sharding rules, host batches -> global arrays.

Imports jax and numpy only. `mesh`: the mesh and the parameter and batch
shardings (data parallel, FSDP); `feed`: each process's rows of a global
batch, as jax.Arrays.
"""
