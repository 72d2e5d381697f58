"""Communication of a compiled program, read from its optimized HLO text (``compiled.as_text()``).

Every collective (all-gather, all-reduce, reduce-scatter, all-to-all, ragged-all-to-all, collective-permute; their
``-start``/``-done`` and ``async-start`` forms counted once) is found with the loops it sits in. Each is charged the
bytes one chip receives, the usual ring / bucket figures for a group of g chips:

* all-gather: its output x (g - 1) / g;  reduce-scatter: its input x (g - 1) / g;
* all-reduce: 2 x its size x (g - 1) / g (a reduce-scatter, then an all-gather);
* all-to-all (ragged too): its size x (g - 1) / g;  collective-permute: its size.

A collective inside a ``while`` loop (its body or its condition) counts once per trip: the loop's
``known_trip_count``, else the bound its condition tests (``trip_count``: scanned layers, the decode loop's new
tokens -- an upper bound since rows stop early), else ``while_trips`` for outermost loops (the continuous sampler's
round) and 1 for nested ones (noted). Of a ``conditional`` only the branch that receives the most counts: one
branch runs (the update's completion-width branches each gather the weights anew). Seconds are bytes over the
chip's incoming interconnect bandwidth (``ICI_BYTES_PER_S``), an optimistic bound: every link busy, no latency,
no overlap with compute lost.

``loop_invariant_gathers`` finds the waste issue 30 is about: an all-gather, inside a loop, of a value the loop
carries unchanged (a weight) -- the same gather on every trip, which a layout without it avoids.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

# Per-chip incoming ICI bandwidth, bytes/s (Cloud TPU system architecture pages: v5p 4,800 Gbps, v6e 3,584 Gbps,
# v5e 1,600 Gbps of ICI per chip, all links together). Collectives between slices (DCN) are not modelled apart.
ICI_BYTES_PER_S = {"v5p": 600e9, "v6e": 448e9, "v5e": 200e9}

KINDS = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "ragged-all-to-all", "collective-permute")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
          "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1, "s4": 1, "u4": 1, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_CALLED = re.compile(r"\b(?:calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIPS = re.compile(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)')
_OPERAND = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Instruction:
    name: str
    type: str  # the result type as printed: f32[8,4]{1,0}, or a tuple
    opcode: str
    rest: str  # operands and attributes
    root: bool = False

    @property
    def operands(self) -> list[str]:
        depth = 1
        for end, ch in enumerate(self.rest):  # the operand list ends at the matching ')'
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                return _OPERAND.findall(self.rest[:end])
        return _OPERAND.findall(self.rest)

    def called(self) -> list[str]:
        found = _CALLED.findall(self.rest)
        for group in _BRANCHES.findall(self.rest):
            found += [b.strip().lstrip("%") for b in group.split(",") if b.strip()]
        return found


def parse(hlo: str) -> tuple[dict[str, dict[str, Instruction]], str]:
    """(computations by name -> their instructions by name, the entry computation's name)."""
    computations: dict[str, dict[str, Instruction]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and "=" not in line.split("(")[0]:
                current = computations.setdefault(m.group(2), {})
                entry = m.group(2) if m.group(1) else entry
            continue
        if line.strip() == "}":
            current = None
            continue
        m = _INSTRUCTION.match(line)
        if m:
            current[m.group(2)] = Instruction(m.group(2), m.group(3), m.group(4), m.group(5), bool(m.group(1)))
    return computations, entry


def array_bytes(type_text: str) -> int:
    """Bytes of every array in a printed HLO type (a tuple's elements added up)."""
    return sum(_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
               for dtype, dims in _ARRAY.findall(type_text.split("{")[0] if "(" not in type_text else type_text))


def group_size(rest: str, devices: int) -> int:
    """Chips per replica group: ``{{0,1},{2,3}}``, the iota form ``[groups,size]<=[...]``, or the mesh form
    ``mesh['x'=4,'y'=2] {'x'}``; no groups: every chip."""
    m = re.search(r"replica_groups=\{\{([\d,\s]*)\}", rest)
    if m:
        return len([d for d in m.group(1).split(",") if d.strip()])
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", rest)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", rest)
    if m:
        sizes = dict((k.strip("' "), int(v)) for k, v in (kv.split("=") for kv in m.group(1).split(",")))
        return math.prod(sizes[a.strip("' ")] for a in m.group(2).split(",") if a.strip("' "))
    m = re.search(r"source_target_pairs=\{([^}]*)\}", rest)
    if m:
        return 2
    return devices


@dataclasses.dataclass
class Collective:
    kind: str
    name: str
    computation: str
    bytes_each: float  # received per chip, one execution
    group: int
    trips: int  # executions per program run (the loops around it multiplied)
    in_loop: bool

    @property
    def bytes(self) -> float:
        return self.bytes_each * self.trips


def received_bytes(kind: str, inst: Instruction, operand_type: str, group: int) -> float:
    share = (group - 1) / group if group > 1 else 0.0
    if kind == "all-gather":
        return array_bytes(inst.type) * share
    if kind == "reduce-scatter":
        return array_bytes(operand_type) * share
    if kind == "all-reduce":
        return 2 * array_bytes(inst.type) * share
    if kind in ("all-to-all", "ragged-all-to-all"):
        return array_bytes(inst.type) * share
    return float(array_bytes(inst.type))  # collective-permute


def collectives(hlo: str, devices: int, while_trips: int | None = None) -> tuple[list[Collective], list[str]]:
    """Every collective of the module with its executions per run; (collectives, notes)."""
    computations, entry = parse(hlo)
    found: list[Collective] = []
    notes: list[str] = []

    def walk(name: str, trips: int, loops: int, seen: tuple[str, ...], out: list[Collective]) -> None:
        for inst in computations.get(name, {}).values():
            kind = inst.opcode.removesuffix("-done")
            if inst.opcode.endswith("-start") and inst.opcode != "async-start":
                continue  # counted at its -done, whose type is the result alone
            if kind in KINDS:
                g = group_size(inst.rest, devices)
                operand = computations[name].get(inst.operands[0]) if inst.operands else None
                if inst.opcode.endswith("-done") and operand is not None:  # the -start holds the attributes
                    g = group_size(operand.rest, devices)
                    operand = computations[name].get(operand.operands[0]) if operand.operands else None
                out.append(Collective(kind, inst.name, name, received_bytes(
                    kind, inst, operand.type if operand else inst.type, g), g, trips, loops > 0))
            n = 1
            if inst.opcode == "while":
                n = trip_count(computations, name, inst) or (while_trips if loops == 0 and while_trips else 1)
                if n == 1:
                    notes.append(f"while loop {inst.name}: trip count unknown, its collectives counted once")
            callees = [c for c in inst.called() if c not in seen and c in computations
                       and inst.opcode not in ("async-update", "async-done")]  # an async pair: walked at its start
            if inst.opcode == "conditional":  # one branch runs: the one that receives the most
                branches: list[list[Collective]] = [[] for _ in callees]
                for callee, found_in in zip(callees, branches, strict=True):
                    walk(callee, trips, loops, (*seen, callee), found_in)
                out += max(branches, key=lambda b: sum(c.bytes for c in b), default=[])
                if sum(1 for b in branches if b) > 1:
                    notes.append("a conditional's branch that receives the most is counted")
                continue
            for callee in callees:  # a while's body and condition run once per trip
                walk(callee, trips * n if inst.opcode == "while" else trips,
                     loops + (inst.opcode == "while"), (*seen, callee), out)

    walk(entry, 1, 0, (entry,), found)
    return found, list(dict.fromkeys(notes))


def trip_count(computations, caller: str, loop: Instruction) -> int | None:
    """Trips of ``loop`` (a ``while`` in computation ``caller``): its ``known_trip_count``, else read from its
    condition (looked into where the compiler fused it) -- ``i < N`` on a tuple element that the loop starts at a
    constant (scanned layers): N minus the start; ``i < N and ...`` (a loop that may exit early, as the decode
    loop): that bound. None when unknown."""
    m = _TRIPS.search(loop.rest)
    if m:
        return int(m.group(1))
    cond = computations.get(_attr(loop.rest, "condition") or "", {})
    root = next((i for i in cond.values() if i.root), None)
    if root is None:
        return None
    scope, inputs = cond, {}  # inputs: a fused computation's parameter number -> the condition's instruction
    if root.opcode == "fusion" and (fused := computations.get(_attr(root.rest, "calls") or "")):
        inputs = {_constant(i): cond.get(root.operands[_constant(i)]) for i in fused.values()
                  if i.opcode == "parameter" and _constant(i) < len(root.operands)}
        scope, root = fused, next((i for i in fused.values() if i.root), root)

    def value(name: str) -> Instruction | None:
        inst = scope.get(name)
        return inputs.get(_constant(inst)) if inst is not None and inst.opcode == "parameter" and inputs else inst

    tests = [root] if root.opcode == "compare" else [scope[o] for o in root.operands if o in scope] \
        if root.opcode == "and" else []
    for test in tests:
        if test.opcode != "compare" or "direction=LT" not in test.rest or len(test.operands) != 2:
            continue
        counter, bound = value(test.operands[0]), value(test.operands[1])
        if counter is None or bound is None or counter.opcode != "get-tuple-element" or bound.opcode != "constant":
            continue
        return max(_constant(bound) - _start(computations[caller], loop, int(_attr(counter.rest, "index") or 0)), 1)
    return None


def _start(caller: dict[str, Instruction], loop: Instruction, index: int) -> int:
    """The constant a loop's tuple element ``index`` starts at (0 when not a constant)."""
    init = caller.get(loop.operands[0]) if loop.operands else None
    start = caller.get(init.operands[index]) if init is not None and init.opcode == "tuple" \
        and index < len(init.operands) else None
    return _constant(start) if start is not None and start.opcode == "constant" else 0


def _constant(inst: Instruction) -> int:
    m = re.match(r"\s*(-?\d+)", inst.rest)
    return int(m.group(1)) if m else 0


def _attr(rest: str, key: str) -> str | None:
    m = re.search(rf"\b{key}=%?([\w.\-]+)", rest)
    return m.group(1) if m else None


def summarize(found: list[Collective], bandwidth: float | None) -> dict:
    """Counts and bytes per chip by kind (executions per run), in loops and in all, and the seconds at ``bandwidth``."""
    by_kind: dict[str, dict[str, float]] = defaultdict(lambda: dict(count=0, bytes=0.0))
    for c in found:
        by_kind[c.kind]["count"] += c.trips
        by_kind[c.kind]["bytes"] += c.bytes
    total = sum(c.bytes for c in found)
    return dict(collectives=len(found), executions=sum(c.trips for c in found), bytes_per_chip=total,
                bytes_per_chip_in_loops=sum(c.bytes for c in found if c.in_loop), by_kind=dict(by_kind),
                seconds=None if bandwidth is None else total / bandwidth)


def loop_invariant_gathers(hlo: str) -> list[str]:
    """All-gathers inside a ``while`` body of a value the loop carries unchanged (tuple element i of the body's
    parameter that its root passes through as element i): the same gather on every trip. Their names."""
    computations, _ = parse(hlo)
    invariant: dict[str, set[int]] = {}
    callers: dict[str, list[tuple[str, Instruction]]] = defaultdict(list)
    for cname, body in computations.items():
        for inst in body.values():
            for callee in inst.called():
                callers[callee].append((cname, inst))
            if inst.opcode == "while" and (b := _attr(inst.rest, "body")) in computations:
                invariant[b] = _passed_through(computations[b])
    flagged = []
    for cname, body in computations.items():
        for inst in body.values():
            if inst.opcode in ("all-gather", "all-gather-start"):
                source = _source(computations, callers, cname, inst.operands[0] if inst.operands else "")
                if source is not None and source[1] in invariant.get(source[0], set()):
                    flagged.append(inst.name)
    return flagged


def _passed_through(body: dict[str, Instruction]) -> set[int]:
    """Tuple indices a loop body returns unchanged."""
    root = next((i for i in body.values() if i.root), None)
    params = {i.name for i in body.values() if i.opcode == "parameter"}
    if root is None or root.opcode != "tuple":
        return set()
    same = set()
    for index, operand in enumerate(root.operands):
        inst = body.get(operand)
        if inst is not None and inst.opcode == "get-tuple-element" and inst.operands[0] in params \
                and _attr(inst.rest, "index") == str(index):
            same.add(index)
    return same


_PASS = {"bitcast", "copy", "convert", "reshape", "transpose", "dynamic-slice", "slice", "fusion", "broadcast",
         "copy-start", "copy-done", "optimization-barrier"}


def _source(computations, callers, cname: str, name: str, depth: int = 0) -> tuple[str, int] | None:
    """(while body, tuple index) where the value ``name`` of computation ``cname`` comes from a get-tuple-element
    of a loop body's parameter, following data movement of a single array (a copy, convert, transpose, slice, or a
    fusion of one array operand and scalar indices) and into callers through parameters."""
    if depth > 64:
        return None
    inst = computations[cname].get(name)
    if inst is None:
        return None
    if inst.opcode == "get-tuple-element":
        parent = computations[cname].get(inst.operands[0])
        if parent is not None and parent.opcode == "parameter":
            return cname, int(_attr(inst.rest, "index") or -1)
        return None
    if inst.opcode == "parameter":  # into the caller (a fusion, call or async computation)
        number = re.match(r"\s*(\d+)", inst.rest)
        index = int(number.group(1)) if number else 0
        for caller, site in callers.get(cname, []):
            if site.opcode != "while" and index < len(site.operands):
                return _source(computations, callers, caller, site.operands[index], depth + 1)
        return None
    arrays = [o for o in inst.operands if o in computations[cname] and not _scalar(computations[cname][o].type)]
    if inst.opcode in _PASS and len(arrays) == 1:  # data movement of one array (indices aside), not a computation
        return _source(computations, callers, cname, arrays[0], depth + 1)
    return None


def _scalar(type_text: str) -> bool:
    return all(not dims for _, dims in _ARRAY.findall(type_text))
