"""Collectives in optimized HLO text: how many run in one execution of the program and how many bytes they carry.

A pure function of the text `jax.jit(...).lower(...).compile().as_text()` returns, for XLA:CPU, GPU and TPU
programs alike; no JAX needed. The text is one device's program, so every figure is per device.

What counts as one collective (one of `OPS`):
- a synchronous instruction (`all-gather(...)`), or the `-start` of an asynchronous pair (`all-gather-start`,
  `all-reduce-start`, `collective-permute-start`); its `-done` is not counted;
- a collective wrapped in `async-start(...), calls=%c`: counted once, through the start (the done is not followed);
- a collective inside a fusion's computation (`fusion(...), calls=%c`, TPU's `kind=kCustom` included). TPU spreads
  one asynchronous collective over several kCustom fusions, each holding a copy of the instruction: a start (its
  computation's result is a `custom-call` to `AsyncCollectiveStart`), continuations that overlap compute with it
  (`"continuation_config"` in their backend_config) and a done (a `custom-call` to `AsyncCollectiveDone`). Only
  the start's copy counts. (Channel ids cannot tell copies from distinct collectives: TPU gave a pipeline's two
  ppermutes, activations and gradients, the same `channel_id`.)
- TPU's reduce-scatter, a fusion of a computation named `all-reduce-scatter...` (an all-reduce and the slice of it
  each device keeps): its all-reduce counts as a reduce-scatter.
- a collective between TPU slices (over DCN): libtpu lowers it to a `send` and a `recv` that the multi-slice
  runtime carries (`_xla_megascale_transfer_type` ONE_TO_ONE, ALL_REDUCE, ALL_GATHER, ...); the `send` counts as
  a collective-permute, all-reduce, all-gather, reduce-scatter or all-to-all, with the array it sends as bytes.

Executions are counted from ENTRY through what it calls; a computation nothing reachable calls is not counted.
A while loop's body counts once per trip, nested loops multiply. The trip count is `known_trip_count` from the
while's backend_config (XLA:CPU and GPU keep it); TPU's optimized HLO drops it, so otherwise it is read from the
loop's counter, as a scan or fori_loop builds it: the condition compares a tuple element with a constant, the
initial tuple sets that element to a constant, and the body adds a constant to it. A loop whose trip count is
neither is counted as one trip and reported in `in_unknown_loops`. Each branch of a conditional counts once,
although one runs (reported in `in_branches`: a pipeline's forward and backward branches, say); a `call` once.

Bytes are the payload of one device's buffer, the usual convention of collective benchmarks (nccl-tests' size):
all-gather, its result (the gathered array); reduce-scatter, its operand (the array before scattering);
all-reduce, all-to-all, collective-permute and collective-broadcast, their operands' total; ragged-all-to-all,
its input buffer (operand 0, an upper bound on what it sends). Sizes are logical (elements x element width,
sub-byte types packed), not the padded size of TPU's tiled layouts.
"""

import re
from typing import NamedTuple

OPS = (
  "all-reduce",
  "all-gather",
  "reduce-scatter",
  "all-to-all",
  "ragged-all-to-all",
  "collective-permute",
  "collective-broadcast",
)
# Fields of each op's entry in `collectives`, in that order internally.
_FIELDS = ("count", "bytes", "in_loops", "in_branches", "in_unknown_loops")

_COMMENT = re.compile(r"/\*.*?\*/")  # `/*index=5*/` inside long tuples and operand lists
_HEADER = re.compile(r"^(ENTRY\s+)?%?([^\s(]+)\s*\(.*->.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([^\s=]+)\s*=\s*")
_ARRAY_SHAPE = re.compile(r"[a-z][a-z0-9]*(?:\[[^\]]*\])?(?:\{[^}]*\})?")
_OPCODE = re.compile(r"\s*([a-z][\w\-]*)\(")
_ARRAY = re.compile(r"([a-z][a-z0-9]*)\[([^\]]*)\]")
_CALLED = re.compile(r"(?:^|, )(calls|to_apply|body|condition|true_computation|false_computation)=%?([^\s,{}]+)")
_BRANCHES = re.compile(r"(?:^|, )branch_computations=\{([^}]*)\}")
_INDEX = re.compile(r"(?:^|, )index=(\d+)")
_DIRECTION = re.compile(r"(?:^|, )direction=(\w+)")
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_ASYNC_DONE = 'custom_call_target="AsyncCollectiveDone"'
_CONTINUATION = '"continuation_config"'
_FLIP = {"LT": "GT", "LE": "GE", "GT": "LT", "GE": "LE"}
_MEGASCALE = re.compile(r'_xla_megascale_transfer_type="(\w+)"')
_MEGASCALE_OPS = {
  "ONE_TO_ONE": "collective-permute",
  "ALL_REDUCE": "all-reduce",
  "ALL_GATHER": "all-gather",
  "REDUCE_SCATTER": "reduce-scatter",
  "ALL_TO_ALL": "all-to-all",
}
# A computation's closing brace, alone or with attributes: TPU's SparseCore computations end
# `}, execution_thread="sparsecore"`. (An instruction's attributes may continue on lines that start `}}, ...`.)
_END = re.compile(r"^\}(?:,\s.*)?\s*$")


class _Instruction(NamedTuple):
  name: str
  shape: str
  opcode: str
  operands: tuple[str, ...]  # operand names; a constant's literal
  attrs: str  # everything after the operand list
  root: bool


def collectives(hlo_text: str) -> dict[str, dict[str, int]]:
  """Per collective op (every one of `OPS`, in that order): `count` (executions in one run of the program, loop
  trips included), `bytes` (their payload, per device, convention in the module docstring), `in_loops` (how many
  of `count` run inside while loops), `in_branches` (how many sit in a conditional's branches, each branch counted
  though one runs: the true count lies between `count - in_branches` and `count`) and `in_unknown_loops` (how many
  sit in a loop whose trip count the text does not give, counted as one trip)."""
  computations, entry = _parse(hlo_text)
  if entry is None:
    raise ValueError("the HLO text has no ENTRY computation")
  totals = _execution(entry, computations, {})
  return {op: dict(zip(_FIELDS, totals[op])) for op in OPS}


def shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape, e.g. `bf16[4,128]{1,0:T(8,128)(2,1)}` or a tuple `(f32[2], s4[3], token[])`: the sum
  over its arrays of elements x element width, packed (`s4[3]` is 2 bytes). A bounded dynamic dimension
  (`f32[<=8]`) counts at its bound."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    elements = 1
    for dim in filter(None, dims.split(",")):
      elements *= int(dim.strip().removeprefix("<="))
    total += (elements * _bits(dtype) + 7) // 8
  return total


def _bits(dtype: str) -> int:
  if dtype == "pred":
    return 8
  if dtype in ("token", "opaque"):
    return 0
  width = re.search(r"\d+", dtype)  # s32, bf16, f8e4m3fn, f4e2m1fn, c64, u4
  if width is None:
    raise ValueError(f"unknown HLO element type {dtype!r}")
  return int(width.group())


def _parse(text: str) -> tuple[dict[str, dict[str, _Instruction]], str | None]:
  """{computation: {instruction name: instruction}} (in text order) and the ENTRY computation's name."""
  computations, entry, current = {}, None, None
  for line in _COMMENT.sub("", text).splitlines():
    if current is None:
      header = _HEADER.match(line)
      if header:
        current = computations.setdefault(header.group(2), {})
        if header.group(1):
          entry = header.group(2)
    elif _END.match(line):
      current = None
    else:
      instruction = _parse_instruction(line)
      if instruction is not None:
        current[instruction.name] = instruction
  return computations, entry


def _parse_instruction(line: str) -> _Instruction | None:
  """`[ROOT] %name = shape opcode(operands), attrs`, where a shape may be a nested tuple and a TPU layout holds
  parentheses (`{1,0:T(8,128)(2,1)}`)."""
  head = _INSTRUCTION.match(line)
  if head is None:
    return None
  start = head.end()
  if line.startswith("(", start):
    end = _closing(line, start) + 1
  else:
    array = _ARRAY_SHAPE.match(line, start)
    if array is None:
      return None
    end = array.end()
  opcode = _OPCODE.match(line, end)
  if opcode is None:
    return None
  close = _closing(line, opcode.end() - 1)
  pieces = _split(line[opcode.end() : close])
  # An operand prints as `%name` (or `f32[8]{0} %name` in some dumps); a constant's operand is its literal.
  operands = pieces if opcode.group(1) == "constant" else [piece.split()[-1].lstrip("%") for piece in pieces]
  root = bool(head.group(1))
  return _Instruction(head.group(2), line[start:end], opcode.group(1), tuple(operands), line[close + 1 :], root)


def _closing(text: str, i: int) -> int:
  """The index of the parenthesis that closes the one at `text[i]`."""
  depth = 0
  for j in range(i, len(text)):
    depth += {"(": 1, ")": -1}.get(text[j], 0)
    if depth == 0:
      return j
  raise ValueError(f"unbalanced parentheses in HLO line: {text[:200]}")


def _split(text: str) -> list[str]:
  """Splits at the commas outside any bracket: `(f32[2], bf16[3,4]{1,0})` is one piece of `x, (f32[2], ...)`."""
  pieces, depth, start = [], 0, 0
  for i, c in enumerate(text):
    if c in "([{":
      depth += 1
    elif c in ")]}":
      depth -= 1
    elif c == "," and depth == 0:
      pieces.append(text[start:i].strip())
      start = i + 1
  pieces.append(text[start:].strip())
  return [p for p in pieces if p]


def _called(instruction: _Instruction) -> dict[str, list[str]]:
  """{attribute: [computation, ...]} for the computations an instruction names (`calls=`, `body=`, ...)."""
  called = {}
  for key, name in _CALLED.findall(instruction.attrs):
    called.setdefault(key, []).append(name.lstrip("%"))
  for branches in _BRANCHES.findall(instruction.attrs):
    called.setdefault("branch_computations", []).extend(b.strip().lstrip("%") for b in branches.split(","))
  return called


def _execution(name: str, computations: dict, memo: dict) -> dict[str, list[int]]:
  """{op: [count, bytes, in_loops, in_branches, in_unknown_loops]} for one execution of computation `name`: its
  collectives and those of the fusions and async computations it calls, plus the loops, branches and calls it runs."""
  if name in memo:
    return memo[name]
  _defined(name, computations)
  totals = {op: [0] * len(_FIELDS) for op in OPS}
  for instruction, table, role in _inlined(name, computations, "own"):
    op = instruction.opcode.removesuffix("-start")
    if op == "send":  # a collective between slices, when the multi-slice runtime carries it
      transfer = _MEGASCALE.search(instruction.attrs)
      op = _MEGASCALE_OPS.get(transfer.group(1)) if transfer else None
      if op is not None and role != "echo":
        totals[op][0] += 1
        totals[op][1] += shape_bytes(_split(instruction.shape[1:-1])[0])  # (data, context, token)
      continue
    if op in OPS:
      if role != "echo":
        op = "reduce-scatter" if op == "all-reduce" and role == "reduce-scatter" else op
        totals[op][0] += 1
        totals[op][1] += _payload(op, instruction, table)
      continue
    called = _called(instruction)
    if instruction.opcode == "while":
      trips = _trip_count(instruction, table, computations)
      # The condition runs once more than the body; a loop of unknown trip count counts both once, flagged.
      body, condition = called["body"][0], called["condition"][0]
      for callee, runs in ((body, trips), (condition, None if trips is None else trips + 1)):
        for op, (count, size, _, branched, unknown) in _execution(callee, computations, memo).items():
          if runs is None:
            add = (count, size, count, branched, count)
          else:
            add = (runs * count, runs * size, runs * count, runs * branched, runs * unknown)
          totals[op] = [a + b for a, b in zip(totals[op], add)]
    elif instruction.opcode == "conditional":  # each branch once: only one runs, so an upper bound, flagged
      branches = ("branch_computations", "true_computation", "false_computation")
      for callee in (callee for key in branches for callee in called.get(key, [])):
        for op, (count, size, looped, _, unknown) in _execution(callee, computations, memo).items():
          totals[op] = [a + b for a, b in zip(totals[op], (count, size, looped, count, unknown))]
    elif instruction.opcode in ("call", "call-start"):  # call-start: an asynchronous call (SparseCore offloads)
      for callee in called.get("to_apply", []):
        for op, add in _execution(callee, computations, memo).items():
          totals[op] = [a + b for a, b in zip(totals[op], add)]
  memo[name] = totals
  return totals


def _inlined(name: str, computations: dict, role: str):
  """(instruction, its computation's table, role) for the instructions of `name` and, depth first, of the fusion and
  async-start computations it calls: the instructions one execution of `name` runs itself. The role of a collective
  is "own", "reduce-scatter" (inside TPU's reduce-scatter fusion) or "echo" (a copy in the continuation or done of
  TPU's async collective fusion, not counted). A `-done` or `async-update` is not followed: its computation is the
  start's."""
  table = computations[name]
  for instruction in table.values():
    yield instruction, table, role
    if instruction.opcode in ("fusion", "async-start"):
      for callee in _called(instruction).get("calls", []):
        callee = _defined(callee, computations)
        inner = role
        if _CONTINUATION in instruction.attrs or any(_ASYNC_DONE in i.attrs for i in computations[callee].values()):
          inner = "echo"
        elif role == "own" and callee.startswith("all-reduce-scatter"):
          inner = "reduce-scatter"
        yield from _inlined(callee, computations, inner)


def _defined(name: str, computations: dict) -> str:
  if name not in computations:
    raise ValueError(f"the HLO text calls computation {name!r} but does not define it")
  return name


def _payload(op: str, instruction: _Instruction, table: dict[str, _Instruction]) -> int:
  if op == "all-gather":
    elements = _split(instruction.shape[1:-1]) if instruction.shape.startswith("(") else []
    if instruction.opcode.endswith("-start") and len(elements) >= 2:  # (operands, results): the gathered arrays
      return shape_bytes(elements[1])
    return shape_bytes(instruction.shape)
  operands = [table[o].shape for o in instruction.operands if o in table]
  if op == "ragged-all-to-all":
    operands = operands[:1]
  return sum(shape_bytes(shape) for shape in operands)


def _trip_count(loop: _Instruction, table: dict[str, _Instruction], computations: dict) -> int | None:
  """The while's trip count: XLA's `known_trip_count`, else what its counter says, else None."""
  known = _KNOWN_TRIPS.search(loop.attrs)
  if known:
    return int(known.group(1))
  called = _called(loop)
  condition = computations[_defined(called["condition"][0], computations)]
  body = computations[_defined(called["body"][0], computations)]
  opcode, attrs, operands = _operation(_root(condition), condition, computations)
  direction = _DIRECTION.search(attrs) if opcode == "compare" else None
  if direction is None or direction.group(1) not in _FLIP or len(operands) != 2:
    return None
  left, right = operands
  relation = direction.group(1)
  if _constant(right) is None:  # `limit > i` reads as `i < limit`
    left, right, relation = right, left, _FLIP[relation]
  index, limit = _tuple_index(condition, left), _constant(right)
  if index is None or limit is None or not loop.operands:
    return None
  # The counter's first value is element `index` of the tuple the while starts from.
  start = _through_copies(table, loop.operands[0])
  if start is None or start.opcode != "tuple" or index >= len(start.operands):
    return None
  first = _constant(_through_copies(table, start.operands[index]))
  # Its step: the body's result tuple sets element `index` to the counter plus (or minus) a constant.
  result = _root(body)
  step = None
  if result.opcode == "tuple" and index < len(result.operands) and result.operands[index] in body:
    opcode, _, operands = _operation(_through_copies(body, result.operands[index]), body, computations)
    if opcode in ("add", "subtract") and len(operands) == 2:
      a, b = operands
      if opcode == "add" and _tuple_index(body, b) == index:
        a, b = b, a
      if _tuple_index(body, a) == index and _constant(b) is not None:
        step = _constant(b) if opcode == "add" else -_constant(b)
  if first is None or not step:
    return None
  if relation in ("LT", "LE") and step > 0:
    span = limit - first + (step if relation == "LE" else 0)
  elif relation in ("GT", "GE") and step < 0:
    span, step = first - limit + (-step if relation == "GE" else 0), -step
  else:
    return None
  return max(0, -(-span // step))


def _operation(instruction: _Instruction, table: dict, computations: dict) -> tuple[str, str, list]:
  """(opcode, attributes, operand instructions, seen through copies) of an instruction, or of the one operation a
  fusion wraps (XLA:CPU wraps a loop's compare and its counter's add): the fused root, its parameters replaced by
  the fusion's operands."""
  if instruction.opcode != "fusion":
    return instruction.opcode, instruction.attrs, [_through_copies(table, o) for o in instruction.operands]
  fused = computations[_defined(_called(instruction)["calls"][0], computations)]
  root = _root(fused)
  operands = []
  for name in root.operands:
    inner = _through_copies(fused, name)
    if inner is not None and inner.opcode == "parameter":
      k = int(inner.operands[0])
      inner = _through_copies(table, instruction.operands[k]) if k < len(instruction.operands) else None
    operands.append(inner)
  return root.opcode, root.attrs, operands


def _root(computation: dict[str, _Instruction]) -> _Instruction:
  return next((i for i in computation.values() if i.root), list(computation.values())[-1])


def _through_copies(table: dict[str, _Instruction], name: str) -> _Instruction | None:
  instruction = table.get(name)
  while instruction is not None and instruction.opcode in ("copy", "bitcast") and instruction.operands:
    instruction = table.get(instruction.operands[0])
  return instruction


def _constant(instruction: _Instruction | None) -> int | None:
  if instruction is None or instruction.opcode != "constant" or not re.fullmatch(r"-?\d+", instruction.operands[0]):
    return None
  return int(instruction.operands[0])


def _tuple_index(table: dict[str, _Instruction], instruction: _Instruction | None) -> int | None:
  """k when the instruction is element k of the computation's parameter (`get-tuple-element(param), index=k`)."""
  if instruction is None or instruction.opcode != "get-tuple-element":
    return None
  source = _through_copies(table, instruction.operands[0])
  index = _INDEX.search(instruction.attrs)
  return int(index.group(1)) if source is not None and source.opcode == "parameter" and index else None
