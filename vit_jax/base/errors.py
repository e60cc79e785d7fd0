"""The wording of error messages, shared by every module that reports one.

One message per problem, saying what was wrong and what to do: `did_you_mean`
for a misspelt name, `listing` for everything that differs between two trees
of arrays (all at once, not the first only).
"""
from collections.abc import Iterable, Sequence
import difflib

MAX_LISTED = 25


def close_matches(name: str, allowed: Iterable[str], n: int = 1,
                  cutoff: float = 0.6) -> list[str]:
  return difflib.get_close_matches(str(name), [str(a) for a in allowed], n=n,
                                   cutoff=cutoff)


def did_you_mean(name: str, allowed: Iterable[str], n: int = 1,
                 cutoff: float = 0.6) -> str:
  """' Did you mean 'x'?' (with a leading space), or '' if nothing is close."""
  close = [repr(c) for c in close_matches(name, allowed, n, cutoff)]
  if not close:
    return ''
  options = close[0] if len(close) == 1 else (
      f'{", ".join(close[:-1])} or {close[-1]}')
  return f' Did you mean {options}?'


def unknown(kind: str, name: str, allowed: Sequence[str], n: int = 1,
            cutoff: float = 0.6) -> str:
  """"Unknown <kind> 'x'. Did you mean 'y'? Allowed: a, b, c."."""
  return (f'Unknown {kind} {name!r}.{did_you_mean(name, allowed, n, cutoff)} '
          f'Allowed: {", ".join(map(str, allowed))}.')


def listing(title: str, lines: Sequence[str], limit: int = MAX_LISTED,
            indent: str = '  ') -> str:
  """'\\n  title (N):\\n    a\\n    b ... and K more', or '' for no lines."""
  if not lines:
    return ''
  shown = list(lines)[:limit]
  more = (f'\n{indent}  ... and {len(lines) - len(shown)} more'
          if len(lines) > len(shown) else '')
  body = f'\n{indent}  '.join(shown)
  return f'\n{indent}{title} ({len(lines)}):\n{indent}  {body}{more}'
