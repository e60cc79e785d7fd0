"""What a compiled GPU step's kernels move and call, from its optimized HLO.

`bytes_moved(text)` is the HBM traffic per device per step under the
roofline's usual model: every kernel XLA launches (a fusion, a cuBLAS or
cuDNN custom call, a copy, a collective, a sort ...) reads each of its
operands and writes its result once, nothing is reused from cache between
kernels. Refinements that follow what the kernel really touches:

  * a fused parameter read only through slices (a layer's weights out of a
    stack, a micro-batch out of the batch) counts the slices' bytes;
  * a fusion that updates a buffer in place (its root a dynamic-update-slice
    of a parameter) counts the update, not the buffer, once written;
  * a while loop's body counts its trip count times, every branch of a
    conditional once (an upper bound), an async collective once (its start);
  * instructions that launch nothing (parameters, constants, tuples,
    bitcasts, loop and call wrappers) count nothing themselves.

`custom_calls(text)` counts, per step (loops counted), each custom-call
target (cuBLAS GEMMs `__cublas$gemm`, cuDNN fused attention
`__cudnn$fmha...`) and each fusion XLA hands to a backend by kind (Triton
`__triton_gemm`, cuDNN `__cudnn$fusion`).
"""
import collections
import re
from collections.abc import Iterator

from vit_jax.planning import hlo

_NO_KERNEL = {'parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast',
              'while', 'conditional', 'call', 'after-all', 'partition-id',
              'replica-id', 'async-start', 'async-update', 'async-done',
              'opt-barrier', 'add-dependency'}
_NAME = re.compile(r'%([\w.\-]+)')
_TARGET = re.compile(r'custom_call_target="([^"]+)"')
_FUSION_KIND = re.compile(r'"fusion_backend_config":\{"kind":"(__[^"]+)"')
_SLICES = ('dynamic-slice', 'slice')


def _walk(text: str) -> Iterator[tuple[hlo.Instruction, int,
                                       dict[str, list[hlo.Instruction]],
                                       dict[str, str]]]:
  """(instruction, runs per step, all computations, {name: shape} of the
  instruction's computation) of every kernel-level instruction."""
  computations, entry = hlo.parse(text)

  def visit(name: str, times: int, path: tuple[str, ...]):
    if name in path:
      return
    shapes = {i.name: i.shape for i in computations.get(name, [])}
    for instruction in computations.get(name, []):
      yield instruction, times, computations, shapes
      calls = dict(hlo.CALLS.findall(instruction.rest))
      if instruction.opcode == 'while':
        yield from visit(calls.get('body'),
                         times * hlo.trip_count(instruction, computations),
                         path + (name,))
      elif instruction.opcode in ('call', 'async-start'):
        callee = calls.get('to_apply') or calls.get('calls')
        yield from visit(callee, times, path + (name,))
      elif instruction.opcode == 'conditional':
        branches = hlo.BRANCHES.search(instruction.rest)
        names = ([b.strip().lstrip('%') for b in branches.group(1).split(',')]
                 if branches else [calls.get('true_computation'),
                                   calls.get('false_computation')])
        for branch in names:
          yield from visit(branch, times, path + (name,))

  yield from visit(entry, 1, ())


def _operand_bytes(operand: str, shapes: dict[str, str]) -> int:
  """Bytes of an operand, typed ('f32[8]{0} %x') or named ('%x') only, as
  XLA:GPU prints them."""
  if '[' in operand:
    return hlo.shape_bytes(operand)
  name = _NAME.findall(operand)
  return hlo.shape_bytes(shapes.get(name[0], '')) if name else 0


def _fusion_bytes(instruction: hlo.Instruction, operands: list[str],
                  shapes: dict[str, str], body: list[hlo.Instruction]) -> int:
  """Bytes a fusion reads and writes, slices and in-place updates seen."""
  params = {i.name: int(i.rest.split(')')[0]) for i in body
            if i.opcode == 'parameter'}
  uses = collections.defaultdict(list)  # param: [(user, operand index)]
  for i in body:
    for position, operand in enumerate(hlo.split_list(i.rest)):
      for used in _NAME.findall(operand):
        if used in params:
          uses[used].append((i, position))
  root = body[-1] if body else None  # XLA prints the root last
  in_place = None
  if root is not None and root.opcode == 'dynamic-update-slice':
    target = _NAME.findall(hlo.split_list(root.rest)[0])
    in_place = target[0] if target and target[0] in params else None
  read = 0
  for name, index in params.items():
    if name == in_place or index >= len(operands):
      continue
    if uses[name] and all(u.opcode in _SLICES and position == 0
                          for u, position in uses[name]):
      read += sum(hlo.shape_bytes(u.shape) for u, _ in uses[name])
    else:
      read += _operand_bytes(operands[index], shapes)
  if in_place is not None:
    body_shapes = {i.name: i.shape for i in body}
    written = _operand_bytes(hlo.split_list(root.rest)[1], body_shapes)
  else:
    written = hlo.shape_bytes(instruction.shape)
  return read + written


def bytes_moved(hlo_text: str) -> int:
  """HBM bytes per device per step (module docstring for the model)."""
  total = 0
  for instruction, times, computations, shapes in _walk(hlo_text):
    opcode = instruction.opcode
    if opcode in _NO_KERNEL or opcode.endswith('-done'):
      continue
    operands = hlo.split_list(instruction.rest)
    if opcode == 'fusion':
      callee = dict(hlo.CALLS.findall(instruction.rest)).get('calls')
      moved = _fusion_bytes(instruction, operands, shapes,
                            computations.get(callee, []))
    else:
      result = instruction.shape
      if opcode.endswith('-start') and result.startswith('('):
        # (operands, results[, context]): count the results once.
        result = hlo.result_shape(instruction)
      moved = (sum(_operand_bytes(o, shapes) for o in operands)
               + hlo.shape_bytes(result))
    total += times * moved
  return total


def custom_calls(hlo_text: str) -> dict[str, int]:
  """{custom-call target or backend fusion kind: runs per device per step}."""
  found = collections.Counter()
  for instruction, times, _, _ in _walk(hlo_text):
    if instruction.opcode == 'custom-call':
      target = _TARGET.search(instruction.rest)
      found[target.group(1) if target else '?'] += times
    elif instruction.opcode == 'fusion':
      kind = _FUSION_KIND.search(instruction.rest)
      if kind:
        found[kind.group(1)] += times
  return dict(sorted(found.items()))
