"""A training run's directory on disk (the workdir), for its writer and its readers.

Imports jax and Orbax, never Flax, optax or TensorFlow.

    workdir/
      LOCK             the live run's holder (`lock`); one writer at a time
      config.json      the resolved config of the latest start or resume
      checkpoints/<step>/{state,meta}   Orbax steps (`state_checkpoint`)
      metrics.json     the final result, written once the run is done
      adaptation.json  what fine-tuning adapted (head, position grid)
      events.out.tfevents.*            TensorBoard summaries

`state_checkpoint`: the trainer's saves and resumes; `reader`: read-only
access for every other program; `lock`: one writer per workdir; `resume`:
the config checks of a resume.
"""
