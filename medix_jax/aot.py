"""Compiling one program ahead of time and judging it: FLOPs counted from its jaxpr (``count_flops``), memory from
the compiler's analysis, the compiler's own out-of-memory report in short, and whether it fits a chip's HBM with the
training state resident beside it (``verdict``). ``plan`` builds the step's programs and reports on them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import sys
import tempfile
import time
from typing import Any

GIB = 1024**3


def gib(x: float) -> str:
    """Bytes as GiB, to 2 decimals (3 significant digits below 0.01)."""
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB or x == 0 else f"{x / GIB:.2g}"


# ----------------------------------------------------------------------------------------------------------------
# FLOPs from the program itself


def count_flops(jaxpr, while_trips: int | None = None) -> tuple[float, float, list[str]]:
    """(FLOPs, matmul operand bytes, notes) of a (closed) jaxpr, over the whole program (global shapes).

    ``dot_general`` counts ``2 x batch x M x N x K`` (convolutions likewise per output element; ``ragged_dot``, a
    grouped matmul, ``2 x M x N x K`` with each of the M rows in one group); elementwise work
    is not counted. Sub-programs are walked recursively: ``scan`` bodies x ``length``, ``while`` bodies x
    ``while_trips`` (outermost loops only: an upper bound when the loop may exit early; counted once, with a
    note, when not given or nested),
    ``cond`` takes its most expensive branch, ``shard_map`` bodies (per-shard shapes) x the devices they are
    mapped over, and every other primitive carrying a jaxpr (pjit, closed_call, custom_vjp/jvp, remat) once. A
    ``pallas_call`` adds its ``cost_estimate``; one without is not counted (noted). Operand bytes are the dots'
    inputs and outputs at their dtypes, with the same multipliers."""
    from jax.extend import core

    notes: list[str] = []

    def walk(jaxpr, in_while: bool = False) -> tuple[float, float]:
        jaxpr = jaxpr.jaxpr if isinstance(jaxpr, core.ClosedJaxpr) else jaxpr
        flops = nbytes = 0.0
        for eqn in jaxpr.eqns:
            name, params = eqn.primitive.name, eqn.params
            if name == "dot_general":
                (lhs_c, rhs_c), (lhs_b, rhs_b) = params["dimension_numbers"]
                lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
                free = math.prod(d for i, d in enumerate(rhs.shape) if i not in (*rhs_c, *rhs_b))
                flops += 2.0 * math.prod(lhs.shape) * free
                nbytes += sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
            elif name == "ragged_dot_general":  # grouped matmul (mixture of experts): each lhs row meets one group
                numbers = params["ragged_dot_dimension_numbers"]
                (_, rhs_c), (_, rhs_b) = numbers.dot_dimension_numbers
                lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
                skip = (*rhs_c, *rhs_b, *numbers.rhs_group_dimensions)
                flops += 2.0 * math.prod(lhs.shape) * math.prod(d for i, d in enumerate(rhs.shape) if i not in skip)
                nbytes += sum(_nbytes(v.aval) for v in (*eqn.invars[:2], *eqn.outvars))
            elif name == "conv_general_dilated":
                rhs, out = eqn.invars[1].aval, eqn.outvars[0].aval
                out_features = rhs.shape[params["dimension_numbers"].rhs_spec[0]]
                flops += 2.0 * math.prod(out.shape) * math.prod(rhs.shape) / out_features
                nbytes += sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars))
            elif name == "scan":
                f, b = walk(params["jaxpr"], in_while)
                flops, nbytes = flops + f * params["length"], nbytes + b * params["length"]
            elif name == "while":
                f, b = walk(params["body_jaxpr"], True)
                trips = 1 if in_while else while_trips or 1
                if trips == 1:
                    notes.append(f"a{' nested' if in_while else ''} while loop's body is counted once (trip count "
                                 "unknown)")
                flops, nbytes = flops + f * trips, nbytes + b * trips
            elif name == "cond":
                costs = [walk(branch, in_while) for branch in params["branches"]]
                if len({f for f, _ in costs}) > 1:
                    notes.append("a cond's most expensive branch is counted (an upper bound; e.g. full attention in "
                                 "every vision block)")
                f, b = max(costs)
                flops, nbytes = flops + f, nbytes + b
            elif name == "shard_map":
                mesh = params["mesh"]
                manual = params.get("newly_manual_axes") or params.get("manual_axes") or mesh.axis_names
                shards = math.prod(mesh.shape[a] for a in manual)
                f, b = walk(params["jaxpr"], in_while)
                flops, nbytes = flops + f * shards, nbytes + b * shards
            elif name == "pallas_call":
                estimate = params.get("cost_estimate")
                if estimate is None:
                    notes.append(f"pallas_call {params.get('name', '')!r} has no cost_estimate: its "
                                 "FLOPs are not counted")
                else:
                    flops, nbytes = flops + estimate.flops, nbytes + estimate.bytes_accessed
            else:
                for sub in core.jaxprs_in_params(params):
                    f, b = walk(sub, in_while)
                    flops, nbytes = flops + f, nbytes + b
        return flops, nbytes

    flops, nbytes = walk(jaxpr)
    return flops, nbytes, list(dict.fromkeys(notes))


def _nbytes(aval) -> int:
    import numpy as np

    return math.prod(aval.shape) * np.dtype(aval.dtype).itemsize if hasattr(aval, "shape") else 0


# ----------------------------------------------------------------------------------------------------------------
# Compiling one program


@dataclasses.dataclass
class Program:
    name: str
    what: str  # the function compiled and its shapes, one line
    fn: Any  # a jitted function
    args: tuple
    count: float  # runs per training step (0: inside other programs)
    count_note: str = ""
    resident: dict[str, int] = dataclasses.field(default_factory=dict)  # per-chip bytes live beside the program
    while_trips: int | None = None
    alternative: bool = False  # compiled for comparison, not run by this config: in neither the verdict nor the step
    streamed: float = 0.0  # per-chip bytes a run reads at least: a decode loop reads the chip's weights every step
    notes: list[str] = dataclasses.field(default_factory=list)
    result: dict = dataclasses.field(default_factory=dict)
    compiled: Any = None
    hlo: str = ""  # the optimized HLO text, kept while ``compiled`` is


@contextlib.contextmanager
def capture_stderr(box: list[str]):
    """Capture file descriptor 2 (libtpu logs there: start-up noise, the compiler's out-of-memory report)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box.append(tmp.read().decode(errors="replace"))


_REPORT_LINE = re.compile(r"^\s*[\d.]+\w*\(\s*[\d.]+%\);\s*([\d.]+)(\w*);\s*\d+;\s*(\d+);\s*(.+?)\s*$")
_USED = re.compile(r"Used ([\d.]+\w*) of ([\d.]+\w*) hbm")
_SHAPE = re.compile(r"(?:(\d+)×)?([a-z]+)(\d*)\[([\d,]*)\]")


def _largest_allocations(log: str, top: int = 3) -> list[str]:
    """The biggest allocations of libtpu's out-of-memory report, each named by the value that fills it (one
    allocation is shared by values that are never live together)."""
    named = []
    for m in filter(None, map(_REPORT_LINE.match, log.splitlines())):
        shapes = []
        for _, kind, bits, dims in _SHAPE.findall(m.group(4)):
            width = 1 if kind == "pred" else max(int(bits or 8), 8) // 8
            shapes.append((width * math.prod(int(d) for d in dims.split(",") if d), f"{kind}{bits}[{dims}]"))
        if shapes:
            name = max(shapes)[1]
            shared = f", shared by {m.group(3)} values" if int(m.group(3)) > 1 else ""
            named.append(f"{m.group(1)}{m.group(2)} {name}{shared}")
        if len(named) == top:
            break
    return named


def _oom_summary(message: str, log: str) -> tuple[str, str]:
    """The compiler's own words on an out-of-memory, and in short: 'used X of Y' and the largest allocations of
    its report (libtpu logs it to stderr)."""
    used = _USED.search(log)
    largest = _largest_allocations(log)
    first = message.strip().splitlines()[0] if message.strip() else "RESOURCE_EXHAUSTED"
    short = "; ".join(([f"used {used.group(1)} of {used.group(2)}"] if used else [])
                      + ([f"largest allocations: {'; '.join(largest)}"] if largest else []))
    return first[:300], short or first[:300]


def compile_program(program: Program, devices: int = 1, ici_bandwidth: float | None = None) -> None:
    """Trace (for FLOPs), lower and compile ``program``; fill ``program.result``, its ``communication`` read from
    the optimized HLO (``comms``: collectives per run over ``devices`` chips, seconds at ``ici_bandwidth``)."""
    import jax

    from medix_jax import comms

    start = time.perf_counter()
    r = program.result
    r.update(flops=0.0, matmul_operand_bytes=0.0, error=None, resident=dict(program.resident))
    log: list[str] = []
    compiled = None
    try:
        traced = program.fn.trace(*program.args)
        r["flops"], r["matmul_operand_bytes"], notes = count_flops(traced.jaxpr, program.while_trips)
        program.notes += notes
        with capture_stderr(log):
            compiled = traced.lower().compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" in str(e):
            r["error"], r["error_short"] = _oom_summary(str(e), log[0] if log else "")
        else:
            r["error"] = r["error_short"] = f"did not compile: {_first_line(e)}"
    except Exception as e:  # noqa: BLE001 -- a program that cannot be built is reported, and the others still run
        r["error"] = r["error_short"] = f"did not trace or compile: {type(e).__name__}: {_first_line(e)}"
    finally:
        if log and log[0].strip():  # compiler warnings, or its out-of-memory report
            sys.stderr.write(f"[{program.name}] {log[0]}")
            sys.stderr.flush()
    r["compile_seconds"] = time.perf_counter() - start
    program.compiled = compiled
    if compiled is None:
        return
    m = compiled.memory_analysis()
    memory = dict(argument=m.argument_size_in_bytes, temporary=m.temp_size_in_bytes, output=m.output_size_in_bytes,
                  alias=m.alias_size_in_bytes)
    memory["total"] = memory["argument"] + memory["output"] - memory["alias"] + memory["temporary"]
    r["memory"] = memory
    cost = compiled.cost_analysis()
    cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
    r["xla_flops"] = float(cost.get("flops", 0.0))
    r["xla_bytes_accessed"] = float(cost.get("bytes accessed", 0.0))
    program.hlo = compiled.as_text()
    found, notes = comms.collectives(program.hlo, devices, program.while_trips)
    r["communication"] = comms.summarize(found, ici_bandwidth)
    program.notes += notes


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def verdict(program: Program, hbm: float | None) -> tuple[bool, str, str]:
    """(fits, verdict line, the reason in a few words)."""
    r = program.result
    if (r.get("error") or "").startswith("did not"):
        return False, f"FAILED: {r['error']}", r["error_short"]
    if r.get("error"):
        return False, f"DOES NOT FIT: the compiler ran out of memory: {r['error_short']}", r["error_short"]
    memory, resident = r["memory"], sum(r["resident"].values())
    need = memory["total"] + resident
    if hbm is None:
        return True, f"compiled; {gib(need)} GiB per device with its resident state (cpu: no memory limit)", ""
    terms = {k: memory[k] for k in ("argument", "temporary", "output")}
    terms.update({f"resident {k}": v for k, v in r["resident"].items()})
    big = max(terms, key=lambda k: terms[k])
    biggest = f"biggest term {big} {gib(terms[big])} GiB"
    if need > hbm * GIB:
        return False, f"DOES NOT FIT: {gib(need)} GiB > {hbm} GiB HBM; {biggest}", f"{gib(need)} GiB; {biggest}"
    return True, f"fits: {gib(need)} of {hbm} GiB ({need / (hbm * GIB):.0%}); {biggest}", ""
