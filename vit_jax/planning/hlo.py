"""The collectives of a compiled program, read from its optimized HLO text.

`collectives(compiled.as_text())` counts every all-reduce, all-gather,
reduce-scatter, all-to-all and collective-permute a device runs per step, and
the bytes of their results (what each device receives), as XLA left them:

  * inside fusions, async wrappers and conditionals too (the call graph from
    the entry computation is followed);
  * a while loop's body counts its trip count times (`known_trip_count`, or
    the `i < N` of its condition, which is how scanned layers and gradient
    accumulation compile);
  * an async pair (`-start` / `-done`) counts once, and so does a collective
    that XLA:TPU's async collective fusion cloned into several fusions (one
    channel id);
  * XLA:TPU writes a reduce-scatter as a fusion that calls an
    `all-reduce-scatter` computation: counted as the reduce-scatter it is.
"""
import dataclasses
import math
import re

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
         'collective-permute')
_BYTES = {'pred': 1, 's4': 1, 'u4': 1, 's8': 1, 'u8': 1, 'f8e4m3fn': 1,
          'f8e5m2': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4,
          's32': 4, 'u32': 4, 'f64': 8, 's64': 8, 'u64': 8, 'c64': 8,
          'c128': 16}
_HEADER = re.compile(r'^(?:ENTRY )?%?([\w.\-]+) \(.*\) -> .* \{$')
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT )?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]\w*)\[([\d,]*)\]')
_CALLS = re.compile(
    r'\b(calls|to_apply|body|condition|true_computation|false_computation)='
    r'%?([\w.\-]+)')
_BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_CHANNEL = re.compile(r'channel_id=(\d+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r'constant\((\d+)\)')


@dataclasses.dataclass
class Collective:
  """One kind of collective: how often a device runs it per step, and bytes."""
  kind: str
  count: int = 0
  bytes: int = 0


@dataclasses.dataclass
class _Instruction:
  name: str
  shape: str
  opcode: str
  rest: str


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape (a tuple's elements summed; layouts ignored)."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    if dtype in _BYTES:
      total += _BYTES[dtype] * math.prod(int(d) for d in dims.split(',') if d)
  return total


def _computations(text: str) -> tuple[dict[str, list[_Instruction]], str]:
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    header = _HEADER.match(line)
    if header:
      current = computations.setdefault(header.group(1), [])
      if line.startswith('ENTRY'):
        entry = header.group(1)
      continue
    if line.startswith('}'):
      current = None
      continue
    match = _INSTRUCTION.match(line) if current is not None else None
    if match:
      current.append(_Instruction(*match.groups()))
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  return computations, entry


def _trip_count(instruction: _Instruction,
                computations: dict[str, list[_Instruction]]) -> int:
  known = _TRIP.search(instruction.rest)
  if known:
    return int(known.group(1))
  condition = dict(_CALLS.findall(instruction.rest)).get('condition')
  bounds = [int(c) for i in computations.get(condition, [])
            if i.opcode == 'constant' for c in _CONSTANT.findall(
                i.opcode + '(' + i.rest)]
  return max(bounds) if bounds else 1


def _tuple_elements(shape: str) -> list[str]:
  """The top-level elements of a tuple shape '(a, (b, c), d)'."""
  elements, depth, start = [], 0, 1
  for i, char in enumerate(shape):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      depth -= 1
    if (char == ',' and depth == 1) or (char == ')' and depth == 0):
      elements.append(shape[start:i].strip())
      start = i + 1
  return elements


def _result_shape(instruction: _Instruction) -> str:
  """The received data: an async all-gather / permute / all-to-all start is
  typed (operands, results[, context]); its results are what arrives."""
  kind = _kind(instruction.opcode)
  if (instruction.opcode.endswith('-start') and kind != 'all-reduce'
      and instruction.shape.startswith('(')):
    elements = _tuple_elements(instruction.shape)
    if len(elements) >= 2:
      return elements[1]
  return instruction.shape


def _kind(opcode: str) -> str | None:
  base = opcode.removesuffix('-start')
  return base if base in KINDS else None


def collectives(hlo_text: str) -> dict[str, Collective]:
  """{kind: Collective} per device per step of the optimized HLO module."""
  computations, entry = _computations(hlo_text)
  found = {kind: Collective(kind) for kind in KINDS}
  seen_channels: set[tuple[str, str, int]] = set()

  def visit(name: str, times: int, path: tuple[str, ...]) -> None:
    if name in path:  # recursion guard
      return
    for instruction in computations.get(name, []):
      calls = _CALLS.findall(instruction.rest)
      callees = [c for key, c in calls if key != 'to_apply']
      branches = _BRANCHES.search(instruction.rest)
      if branches:
        callees += [b.strip().lstrip('%') for b in branches.group(1).split(',')]
      kind = _kind(instruction.opcode)
      scatter = instruction.opcode == 'fusion' and any(
          'all-reduce-scatter' in c for c in callees)
      if scatter:
        kind = 'reduce-scatter'
      if kind:
        channel = _CHANNEL.search(instruction.rest)
        key = (kind, name if not channel else '', int(channel.group(1))
               if channel else id(instruction))
        if key not in seen_channels:
          seen_channels.add(key)
          found[kind].count += times
          found[kind].bytes += times * shape_bytes(_result_shape(instruction))
        if scatter:
          continue  # its inner all-reduce is this reduce-scatter
      if instruction.opcode == 'while':
        body = dict(calls).get('body')
        trips = _trip_count(instruction, computations)
        visit(body, times * trips, path + (name,))
        continue
      for callee in callees:
        visit(callee, times, path + (name,))

  visit(entry, 1, ())
  return found
