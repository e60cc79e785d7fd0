"""TensorFlow, imported once for the data package, with two start-up habits undone.

It must never reserve accelerator memory (JAX owns the GPUs), and its C++
start-up notices (oneDNN, CPU features, "All log messages before
absl::InitializeLog()"), which since TensorFlow 2.20 ignore
TF_CPP_MIN_LOG_LEVEL, are dropped from stderr. Anything else it prints
while importing still shows. The data modules take `tf` from here.
"""
import os
import re
import sys
import tempfile

_NOTICES = re.compile(
    r'All log messages before absl::InitializeLog|oneDNN custom operations '
    r'are on|cpu_feature_guard|To enable the following instructions')


def _import_tensorflow():
  if 'tensorflow' in sys.modules:
    return sys.modules['tensorflow']
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      import tensorflow  # pylint: disable=g-import-not-at-top
    finally:
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode(errors='replace').splitlines(True):
        if not _NOTICES.search(line):
          sys.stderr.write(line)
  try:
    tensorflow.config.set_visible_devices([], 'GPU')
  except (RuntimeError, ValueError):  # TF already initialized: nothing to hide.
    pass
  return tensorflow


tf = _import_tensorflow()
