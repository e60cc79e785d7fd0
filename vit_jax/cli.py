"""Shared command-line plumbing of the vit_jax tools."""
import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is a usage error: exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.stderr.write(f'error: {e}\nPass --help for usage.\n')
    sys.exit(2)
