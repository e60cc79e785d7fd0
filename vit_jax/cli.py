"""Shared command-line plumbing of the vit_jax tools."""
import sys
from typing import NoReturn

from absl import flags


def usage_error(message: str) -> NoReturn:
  """One `error:` line and exit status 2, the tools' usage-error convention."""
  sys.stderr.write(f'error: {message}\nPass --help for usage.\n')
  sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, but a bad flag is a usage error: exit status 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    usage_error(str(e))
