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

Each kind also says how many of its runs have a device group that spans
more than one host (`cross_host`: over the network between GPU hosts or
TPU hosts, not only NVLink / ICI within one), and its largest group, from
the replica groups in every format XLA prints (`replica_groups`).
"""
from collections.abc import Sequence
import dataclasses
import math
import re

import numpy as np

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
CALLS = re.compile(
    r'\b(calls|to_apply|body|condition|true_computation|false_computation)='
    r'%?([\w.\-]+)')
BRANCHES = re.compile(r'branch_computations=\{([^}]*)\}')
_CHANNEL = re.compile(r'channel_id=(\d+)')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r'constant\((\d+)\)')
_EXPLICIT_GROUPS = re.compile(r'replica_groups=\{((?:\{[\d,]*\},?)*)\}')
_IOTA_GROUPS = re.compile(
    r'replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?')
_MESH_GROUPS = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([\d,]+)\]"
    r"(?:T\(([\d,]+)\))?\))? \{([^}]*)\}")
_PAIRS = re.compile(r'source_target_pairs=\{((?:\{\d+,\d+\},?)*)\}')


@dataclasses.dataclass
class Collective:
  """One kind of collective: how often a device runs it per step, and bytes."""
  kind: str
  count: int = 0
  bytes: int = 0
  cross_host: int = 0  # runs whose device group spans hosts
  largest_group: int = 0


@dataclasses.dataclass
class Instruction:
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


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """({computation: its instructions}, the entry's name) of an HLO module."""
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
      current.append(Instruction(*match.groups()))
  if entry is None:
    raise ValueError('No ENTRY computation in the HLO text.')
  return computations, entry


def trip_count(instruction: Instruction,
               computations: dict[str, list[Instruction]]) -> int:
  """How often a while loop runs its body."""
  known = _TRIP.search(instruction.rest)
  if known:
    return int(known.group(1))
  condition = dict(CALLS.findall(instruction.rest)).get('condition')
  bounds = [int(c) for i in computations.get(condition, [])
            if i.opcode == 'constant' for c in _CONSTANT.findall(
                i.opcode + '(' + i.rest)]
  return max(bounds) if bounds else 1


def split_list(text: str) -> list[str]:
  """The top-level items of 'a, (b, c), d)...': split at commas outside
  brackets, up to the first unmatched closing bracket (an instruction's
  operand list, or a tuple shape without its opening parenthesis)."""
  items, depth, start = [], 0, 0
  for i, char in enumerate(text):
    if char in '([{':
      depth += 1
    elif char in ')]}':
      if depth == 0:
        break
      depth -= 1
    elif char == ',' and depth == 0:
      items.append(text[start:i].strip())
      start = i + 1
  else:
    i = len(text)
  tail = text[start:i].strip()
  return items + ([tail] if tail else [])


def result_shape(instruction: Instruction) -> str:
  """The received data: an async all-gather / permute / all-to-all start is
  typed (operands, results[, context]); its results are what arrives."""
  kind = _kind(instruction.opcode)
  if (instruction.opcode.endswith('-start') and kind != 'all-reduce'
      and instruction.shape.startswith('(')):
    elements = split_list(instruction.shape[1:])
    if len(elements) >= 2:
      return elements[1]
  return instruction.shape


def _kind(opcode: str) -> str | None:
  base = opcode.removesuffix('-start')
  return base if base in KINDS else None


def _ints(text: str) -> list[int]:
  return [int(x) for x in text.split(',') if x]


def _iota(dims: list[int], perm: list[int] | None) -> np.ndarray:
  """XLA's iota device list: arange reshaped to `dims`, transposed by
  `perm`, flattened."""
  ids = np.arange(math.prod(dims)).reshape(dims)
  return (ids.transpose(perm) if perm else ids).ravel()


def replica_groups(rest: str) -> list[list[int]] | None:
  """The device groups (logical ids) of a collective; [] for one group of
  all devices, None when none is written."""
  pairs = _PAIRS.search(rest)
  if pairs:
    return [_ints(p) for p in re.findall(r'\{([\d,]+)\}', pairs.group(1))]
  explicit = _EXPLICIT_GROUPS.search(rest)
  if explicit:
    return [_ints(g) for g in re.findall(r'\{([\d,]*)\}', explicit.group(1))
            if g]
  iota = _IOTA_GROUPS.search(rest)
  if iota:
    shape = _ints(iota.group(1))
    ids = _iota(_ints(iota.group(2)),
                _ints(iota.group(3)) if iota.group(3) else None)
    return ids.reshape(-1, shape[-1]).tolist()
  mesh = _MESH_GROUPS.search(rest)
  if mesh:
    # Devices laid out on named mesh axes; a group varies the braced axes.
    axes = [(name.strip("'"), int(size)) for name, size in
            (a.split('=') for a in mesh.group(1).split(','))]
    sizes = [size for _, size in axes]
    ids = (_iota(_ints(mesh.group(2)), _ints(mesh.group(3))
                 if mesh.group(3) else None) if mesh.group(2)
           else np.arange(math.prod(sizes))).reshape(sizes)
    chosen = [i for i, (name, _) in enumerate(axes)
              if f"'{name}'" in mesh.group(4)]
    rest_axes = [i for i in range(len(axes)) if i not in chosen]
    group = math.prod(sizes[i] for i in chosen)
    return ids.transpose(rest_axes + chosen).reshape(-1, group).tolist()
  return None


def _group_stats(rest: str, process_of: Sequence[int] | None
                 ) -> tuple[bool, int]:
  """(whether a group spans hosts, the largest group's size)."""
  groups = replica_groups(rest)
  if groups is None:
    return False, 0
  if not groups:  # one group: every device
    groups = [list(range(len(process_of or [0])))]
  largest = max(len(g) for g in groups)
  if process_of is None:
    return False, largest
  return any(len({process_of[d] for d in g}) > 1 for g in groups), largest


def collectives(hlo_text: str, process_of: Sequence[int] | None = None
                ) -> dict[str, Collective]:
  """{kind: Collective} per device per step of the optimized HLO module.

  `process_of[i]`: the host (process index) of the program's logical device
  i (the mesh's devices in order), to tell collectives across hosts.
  """
  computations, entry = parse(hlo_text)
  found = {kind: Collective(kind) for kind in KINDS}
  seen_channels: set[tuple[str, str, int]] = set()

  def visit(name: str, times: int, path: tuple[str, ...]) -> None:
    if name in path:  # recursion guard
      return
    for instruction in computations.get(name, []):
      calls = CALLS.findall(instruction.rest)
      callees = [c for key, c in calls if key != 'to_apply']
      branches = BRANCHES.search(instruction.rest)
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
          found[kind].bytes += times * shape_bytes(result_shape(instruction))
          crosses, largest = _group_stats(instruction.rest, process_of)
          found[kind].cross_host += times if crosses else 0
          found[kind].largest_group = max(found[kind].largest_group, largest)
        if scatter:
          continue  # its inner all-reduce is this reduce-scatter
      if instruction.opcode == 'while':
        body = dict(calls).get('body')
        trips = trip_count(instruction, computations)
        visit(body, times * trips, path + (name,))
        continue
      for callee in callees:
        visit(callee, times, path + (name,))

  visit(entry, 1, ())
  return found
