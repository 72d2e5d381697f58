"""Ahead-of-time fit check: will one GRPO training step of this config fit on a TPU slice, and how long might it take?

``python -m medix_jax.plan --config RUN.yaml [--config MESH.yaml] --topology v5p-64 [k=v ...]``

The idea of MaxText's ``train_compile.py``, for an RL step: with libtpu installed (``jax[tpu]``) JAX can describe
a TPU slice that is not attached (``jax.experimental.topologies``), and ``jit(...).lower(...).compile()`` then runs
the real TPU compiler for it on this CPU machine. Every program one training step runs is compiled that way, with
every argument an abstract ``ShapeDtypeStruct`` carrying the sharding the real code gives it, so no array is ever
allocated. The programs are the functions the trainer itself runs, imported, not re-implemented:

* ``generate.static.prefill`` -- ``data.batch_size`` prompts at the largest prompt and image buckets -> KV cache;
* ``generate.static.decode`` -- the whole sampling ``while_loop`` over the donated cache (batch x G rows);
* ``rl.trainer._embed`` (``vision``) -- a mini-batch's prompts through the vision tower and embeddings (it also
  runs inside prefill);
* ``rl.trainer._gradients`` -- one update micro-batch on the embedded prompts, jitted as ``Trainer.__init__`` jits
  it, and ``rl.trainer._embed_gradients`` (``vision_grad``) -- the gradient through the embedding, per mini-batch;
* ``rl.trainer._logprobs`` -- the old / reference log-prob forward (when ``kl_coef > 0`` or recomputing);
* the optimizer apply (``trainer.apply_updates``; parameters and Adam state donated);
* with ``rollout.weights_dtype``, the cast of the sampler's copy of the parameters (``rl.trainer._cast_floats``).

Per program and chip it prints the compiler's memory analysis (argument, temporary, output, alias bytes), plus the
training state that is resident on the device while the program runs without being one of its arguments (Adam
moments during sampling, the reference policy, the gradient accumulator, the step's other micro-batches); a
program fits when both together are within the chip's HBM and the compiler did not raise ``RESOURCE_EXHAUSTED``.
FLOPs are counted from the program's jaxpr (``count_flops``: XLA's ``cost_analysis`` counts a loop body once,
20-40x low for scanned layers); bytes accessed come from ``cost_analysis`` (per loop body: a lower bound) and from
the matmul operands of the jaxpr. The step time is a roofline estimate from both. Exit status 1 when a program does
not fit, 2 on a configuration error.

jax is imported only after the arguments are read: the platform (CPU, with N host devices for ``cpu:N``) must be
set before it initialises.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path

GIB = 1024**3
# Slice names (as Cloud TPU spells them: cores for v5p, chips for v5e / v6e) -> libtpu topology names.
TOPOLOGIES = {
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:4x4x2",
    "v5p-128": "v5p:4x4x4", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16",
}
PROGRAMS = ("cast", "prefill", "decode", "vision", "update", "vision_grad", "logprobs", "optimizer")
HBM_GIB = {"v5p": 95.74, "v6e": 31.25, "v5e": 15.75}  # per chip, as the TPU compiler counts it
PEAKS = {"v5p": (459e12, 2765e9), "v6e": (918e12, 1640e9), "v5e": (197e12, 819e9)}  # bf16 dense FLOP/s, HBM B/s


def resolve_topology(name: str) -> tuple[str, str, int | None]:
    """``(generation, libtpu topology name, None)`` for a TPU slice, ``("cpu", "cpu:N", N)`` for N host devices."""
    if name.startswith("cpu:"):
        count = name.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ValueError(f"--topology {name}: give cpu:N with N >= 1")
        return "cpu", name, int(count)
    topology = TOPOLOGIES.get(name, name)
    generation = topology.split(":", 1)[0]
    if ":" not in topology or generation not in HBM_GIB:
        raise ValueError(f"--topology {name}: use one of {', '.join(TOPOLOGIES)}, a libtpu name such as v5p:4x4x2 "
                         f"(generations {', '.join(HBM_GIB)}), or cpu:N")
    return generation, topology, None


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
    fn: object  # a jitted function
    args: tuple
    count: float  # runs per training step (0: inside other programs)
    count_note: str = ""
    resident: dict[str, int] = dataclasses.field(default_factory=dict)  # per-chip bytes live beside the program
    while_trips: int | None = None
    notes: list[str] = dataclasses.field(default_factory=list)
    result: dict = dataclasses.field(default_factory=dict)
    compiled: object = None


@contextlib.contextmanager
def _stderr_to(box: list[str]):
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


def compile_program(program: Program) -> None:
    """Trace (for FLOPs), lower and compile ``program``; fill ``program.result``."""
    import jax

    start = time.perf_counter()
    r = program.result
    r.update(flops=0.0, matmul_operand_bytes=0.0, error=None, resident=dict(program.resident))
    log: list[str] = []
    compiled = None
    try:
        traced = program.fn.trace(*program.args)
        r["flops"], r["matmul_operand_bytes"], notes = count_flops(traced.jaxpr, program.while_trips)
        program.notes += notes
        with _stderr_to(log):
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
        return True, f"compiled; {_g(need)} GiB per device with its resident state (cpu: no memory limit)", ""
    terms = {k: memory[k] for k in ("argument", "temporary", "output")}
    terms.update({f"resident {k}": v for k, v in r["resident"].items()})
    big = max(terms, key=terms.get)
    biggest = f"biggest term {big} {_g(terms[big])} GiB"
    if need > hbm * GIB:
        return False, f"DOES NOT FIT: {_g(need)} GiB > {hbm} GiB HBM; {biggest}", f"{_g(need)} GiB; {biggest}"
    return True, f"fits: {_g(need)} of {hbm} GiB ({need / (hbm * GIB):.0%}); {biggest}", ""


# ----------------------------------------------------------------------------------------------------------------
# The step's programs, built abstractly


def _per_chip(tree) -> int:
    """Bytes of one device's shard of every ``ShapeDtypeStruct`` in ``tree``."""
    import jax
    import numpy as np

    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree) if a is not None)


def build_programs(cfg, mesh, images: int, image_rows: int | None) -> tuple[list[Program], dict]:
    """The programs of one training step with abstract arguments, and the shapes they were built at."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec

    from medix_jax import parallel
    from medix_jax.models.qwen_vl.model import ModelInputs, abstract_model, param_count
    from medix_jax.models.qwen_vl.vision import VisionInputs, window_rows
    from medix_jax.generate import static
    from medix_jax.rl import grpo, packing, trainer

    model_cfg, train, rollout, buckets = cfg.model, cfg.train, cfg.rollout, cfg.buckets
    rules = {**parallel.DEFAULT_RULES, **cfg.sharding_rules}
    replicated = NamedSharding(mesh, PartitionSpec())
    sds = jax.ShapeDtypeStruct

    model = abstract_model(model_cfg)
    graphdef, state = nnx.split(model, nnx.Param)
    shardings = parallel.param_shardings(state, mesh, rules)
    flat = nnx.to_flat_state(state)
    for path, var in flat:
        var.set_value(sds(var.shape, var.dtype, sharding=shardings[path]))
    params = nnx.from_flat_state(flat)
    param_shardings = jax.tree.map(lambda a: a.sharding, params)

    def batch(shape, dtype, axis=0):  # the batch rule, as parallel.batch_array places a batch
        axes = tuple("batch" if i == axis else None for i in range(len(shape)))
        return sds(shape, dtype, sharding=NamedSharding(mesh, parallel.logical_spec(axes, shape, mesh)))

    vision_cfg = model_cfg.vision
    qwen2_5 = model_cfg.family == "qwen2_5_vl"  # windowed attention; Qwen3-VL: full attention, a position table
    rows = max(buckets.rows_per_image) if image_rows is None else image_rows
    unit = window_rows(vision_cfg) if qwen2_5 else vision_cfg.merge_unit
    if images and (rows % unit or rows % vision_cfg.merge_unit):
        raise ValueError(f"--image-rows {rows} must be a multiple of "
                         + (f"the attention window's {unit} rows" if qwen2_5 else f"the merge unit's {unit} rows"))
    length = max(buckets.prompt_lengths)

    def prompts(b):
        vision = None
        if images:
            n = images * rows
            taps = () if qwen2_5 else (batch((b, n, 4), jnp.int32), batch((b, n, 4), jnp.float32))
            vision = VisionInputs(batch((b, n, vision_cfg.patch_dim), jnp.float32), batch((b, images, rows), bool),
                                  batch((b, n, 2), jnp.int32), batch((b, n // vision_cfg.merge_unit), jnp.int32),
                                  *taps)
        return ModelInputs(batch((b, length), jnp.int32), batch((b, length), bool),
                           batch((3, b, length), jnp.int32, axis=1), batch((b,), jnp.int32), vision)

    g, new = rollout.num_samples, rollout.max_new_tokens
    step_prompts, parts = cfg.data.batch_size * train.rollout_batches, train.mini_batches * train.micro_batches
    if step_prompts % parts:
        raise ValueError(f"{step_prompts} prompts per step (data.batch_size x train.rollout_batches) do not divide "
                         f"into train.mini_batches x train.micro_batches = {parts}")
    micro = step_prompts // parts
    kl = train.loss.kl_coef > 0
    # rollout.weights_dtype: the sampler runs a copy of the parameters cast to it (as Trainer.rollout_model does)
    cast = trainer.rollout_dtype(params, rollout)
    rollout_params = params if cast is None else jax.tree.map(
        lambda a: sds(a.shape, cast if jnp.issubdtype(a.dtype, jnp.floating) else a.dtype, sharding=a.sharding),
        params)
    recompute = trainer.recomputes_old_logprobs(train, model_cfg, cast)

    tx = trainer.make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches)
    opt_shardings = trainer.optimizer_shardings(tx, params, mesh)
    opt_state = jax.tree.map(lambda a, s: sds(a.shape, a.dtype, sharding=s), jax.eval_shape(tx.init, params),
                             opt_shardings)

    def completions(n, with_ref):
        return trainer.Completions(batch((n, new), jnp.int32), batch((n, new), bool), batch((n, new), jnp.float32),
                                   batch((n,), jnp.float32), batch((n, new), jnp.float32) if with_ref else None)

    # An update micro-batch: as many packed rows as a micro-batch has samples (rl/packing.py), several samples a row
    # unless the decoder's attention is cuDNN (Trainer.samples_per_row).
    per_row = packing.samples_per_row(model_cfg.attention, mesh.devices.flat[0].platform)
    update_rows = micro * g
    layout = packing.Layout(*(batch(shape, jnp.int32, axis=int(len(shape) == 3))
                              for shape in packing.shapes(update_rows, length, new, per_row)))

    scalar = lambda dtype: sds((), dtype, sharding=replicated)  # noqa: E731
    params_b, opt_b = _per_chip(params), _per_chip(opt_state)
    # Trainer.update keeps the prompts on the host until used
    micro_inputs = _per_chip(completions(update_rows * per_row, kl)) + _per_chip(layout)
    copy = {} if cast is None else {"rollout weights copy": _per_chip(rollout_params)}
    others = {"other micro-batches' completions": micro_inputs * (parts - 1)} if parts > 1 else {}
    reference = {"reference params": params_b} if kl else {}
    # beside the sampler: the training state (and, sampling from a cast copy, the parameters themselves)
    sampling_resident = {**({} if cast is None else {"params": params_b}), "Adam state": opt_b, **reference}
    update_resident = {"Adam state": opt_b, **reference, **copy}  # the copy lives until the first optimizer update
    shapes = dict(parameters=param_count(model), params_per_chip=params_b, adam_per_chip=opt_b,
                  rollout_prompts=cfg.data.batch_size, prompt_length=length, images=images, rows_per_image=rows,
                  rollout_rows=cfg.data.batch_size * g, max_new_tokens=new, micro_batch_prompts=micro,
                  micro_batch_rows=micro * g, kl=kl, recompute_old_logprobs=recompute,
                  rollout_weights_dtype=None if cast is None else cast.name)
    at_least = "at least (dynamic filtering draws more)" if train.dynamic_filtering else ""
    image_text = f" + {images} image(s) x {rows} rows" if images else ", text only"

    programs = []
    if cast is not None:
        cast_fn = jax.jit(functools.partial(trainer._cast_floats, dtype=cast), out_shardings=param_shardings)
        programs.append(Program(
            "cast", f"rl.trainer._cast_floats: the rollout copy of the parameters in {cast.name}", cast_fn, (params,),
            1, "once per step (after the step's updates)", {"Adam state": opt_b, **reference}))
    prefill_args = (graphdef, rollout_params, prompts(cfg.data.batch_size), new, g, mesh)
    programs.append(Program(
        "prefill", f"generate.static.prefill: {cfg.data.batch_size} prompts x {length} tokens{image_text} -> KV cache "
        f"{cfg.data.batch_size * g} x {length + new}", static.prefill, prefill_args, train.rollout_batches,
        at_least, sampling_resident))

    weights_step = shapes["parameters"] * jnp.dtype(model_cfg.dtype).itemsize / mesh.shape["tensor"]
    gathered = [f"where XLA all-gathers fsdp-sharded weights, every decode step reads about {weights_step / GIB:.2f} "
                f"GiB of them on every chip ({model_cfg.dtype} parameters / tensor): not in the operand bytes, which "
                "are global / chips"] if mesh.shape["fsdp"] > 1 else []
    ends = model_cfg.tokens.end_token_ids if rollout.stop_token_ids is None else rollout.stop_token_ids
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))

    def decode_program(prefill_out):
        args = (graphdef, rollout_params, *prefill_out, rollout, length, ends,
                sds(key.shape, key.dtype, sharding=replicated), batch((cfg.data.batch_size * g,), jnp.int32), mesh)
        return Program("decode", f"generate.static.decode: {cfg.data.batch_size * g} rows x {new} new tokens (while "
                       f"loop, cache donated)", static.decode, args, train.rollout_batches, at_least,
                       sampling_resident, while_trips=new,
                       notes=[f"FLOPs: the while loop's body x {new} steps (an upper bound: rows stop at end tokens)",
                              *(["the static sampler, compiled as the bound: rollout.batching continuous (the "
                                 "default) decodes in rollout.slots rows over a cache of that many rows, plus one "
                                 "prompt-length row per prompt (rl/continuous.py): with the default slots (a quarter "
                                 "of the samples), less memory than this"]
                                if rollout.batching == "continuous" else []),
                              *gathered])

    # The update: a mini-batch's prompts embedded once (vision tower), micro-batches of completions on them, the
    # gradient through the embedding once per mini-batch (rl/trainer.py).
    mini = micro * train.micro_batches
    runs = (train.mini_batches if kl else 0) + (train.mini_batches - 1 if recompute else 0)  # old / reference
    embed = jax.jit(trainer._embed, static_argnums=(0, 3, 4))
    shapes_out = jax.eval_shape(functools.partial(trainer._embed, graphdef, chunks=train.micro_batches, mesh=mesh),
                                params, prompts(mini))
    embedded = jax.tree.map(lambda a: batch(a.shape, a.dtype, axis=a.ndim - 3), shapes_out)  # [.., M, P, hidden]
    held = {"mini-batch prompt embeddings and their cotangent sum": 2 * _per_chip(embedded)}
    programs.append(Program(
        "vision", f"rl.trainer._embed: a mini-batch's {mini} prompts x {length} tokens{image_text}, "
        f"{train.micro_batches} chunks of {micro}", embed,
        (graphdef, params, prompts(mini), train.micro_batches, mesh), train.ppo_epochs * train.mini_batches + runs,
        "ppo_epochs x mini_batches, + once per mini-batch for old / reference log-probs (also inside prefill)",
        {**update_resident, **others}))

    gradients = jax.jit(functools.partial(trainer._gradients, param_shardings=param_shardings, mesh=mesh),
                        static_argnums=(0, 7, 8, 9))
    totals = grpo.Totals(scalar(jnp.float32), scalar(jnp.float32))
    # At the full completion width: the trainer's narrower branches (trainer.completion_widths) need less.
    grad_args = (graphdef, params, embedded, layout, completions(update_rows * per_row, kl), totals, scalar(bool),
                 train.loss, rollout.temperature, (new,), scalar(jnp.int32))
    accumulator = {"gradient accumulator": params_b} if train.micro_batches > 1 else {}
    programs.append(Program(
        "update", f"rl.trainer._gradients: micro-batch of {update_rows} packed rows x ({length} + {new}) tokens "
        f"(up to {per_row} samples a row) on {mini} embedded prompts", gradients, grad_args, train.ppo_epochs * parts,
        "ppo_epochs x mini_batches x micro_batches", {**update_resident, **accumulator, **others, **held}))
    embed_gradients = jax.jit(functools.partial(trainer._embed_gradients, param_shardings=param_shardings,
                                                mesh=mesh), static_argnums=(0, 5), donate_argnums=(4,))
    programs.append(Program(
        "vision_grad", f"rl.trainer._embed_gradients: the gradient through the embedding of {mini} prompts"
        f"{image_text}, {train.micro_batches} chunks of {micro}", embed_gradients,
        (graphdef, params, prompts(mini), embedded, params, train.micro_batches),
        train.ppo_epochs * train.mini_batches, "ppo_epochs x mini_batches", {**update_resident, **others, **held}))

    if runs:
        why = " and ".join(w for w, on in (("reference (kl_coef > 0)", kl), ("old (recompute)", recompute)) if on)
        logprobs = jax.jit(trainer._logprobs, static_argnums=(0, 5, 6, 7))
        programs.append(Program(
            "logprobs", f"rl.trainer._logprobs ({why}): {update_rows} packed rows x ({length} + {new}) tokens",
            logprobs, (graphdef, params, embedded, layout, completions(update_rows * per_row, False),
                       rollout.temperature, mesh, (new,), scalar(jnp.int32)), runs * train.micro_batches,
            "once per micro-batch per step" + (" for the reference" if kl else "")
            + (", and for old log-probs of every mini-batch but the first" if recompute else ""),
            {"Adam state": opt_b, **({"the other parameter copy": params_b} if kl else {}), **copy, **others,
             **held}))

    apply = jax.jit(functools.partial(trainer.apply_updates, tx), donate_argnums=(0, 1),
                    out_shardings=(param_shardings, opt_shardings, replicated))
    programs.append(Program(
        "optimizer", "apply_updates: clip + AdamW over params and Adam state (donated)", apply,
        (params, opt_state, params), train.ppo_epochs * train.mini_batches, "ppo_epochs x mini_batches",
        {**reference, **copy, **others}))
    return programs, dict(shapes, decode_program=decode_program)


def _prefill_outputs(program: Program, mesh):
    """The decode's inputs as the prefill returns them (its compiled output shardings; without a compiled prefill,
    the placements the sampler pins them to)."""
    import jax
    from jax.sharding import NamedSharding

    from medix_jax import parallel

    if program.compiled is not None:
        return program.compiled.out_info
    out = program.fn.trace(*program.args).out_info

    def place(a, axes):
        spec = parallel.logical_spec(axes, a.shape, mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    cache = jax.tree.map(lambda a: place(a, ("layers", "batch", None, "kv_heads", None)), out[0])
    rest = [place(a, ("batch",) + (None,) * (a.ndim - 1)) for a in out[1:]]
    return (cache, *rest)


# ----------------------------------------------------------------------------------------------------------------
# Report


def _g(x: float) -> str:
    """Bytes as GiB, to 2 decimals (3 significant digits below 0.01)."""
    return f"{x / GIB:.2f}" if x >= 0.01 * GIB or x == 0 else f"{x / GIB:.2g}"


def header(cfg, shapes, topology, devices, mesh, hbm, configs) -> list[str]:
    s, t = shapes, cfg.train
    return [
        f"medix_jax.plan: {' + '.join(configs)} on {topology}: {len(devices)} x {devices[0].device_kind}"
        + (f", {hbm} GiB HBM each" if hbm else " (cpu: no memory limit)") + f"; mesh {dict(mesh.shape)}",
        f"model: {s['parameters']:,} parameters ({cfg.model.param_dtype} storage, {cfg.model.dtype} compute); per "
        f"chip: params {_g(s['params_per_chip'])} GiB, Adam state {_g(s['adam_per_chip'])} GiB"
        + (f", reference params {_g(s['params_per_chip'])} GiB" if s["kl"] else ""),
        f"step: {t.rollout_batches} x {s['rollout_prompts']} prompts x G={cfg.rollout.num_samples}; {t.ppo_epochs} "
        f"epoch(s) x {t.mini_batches} mini x {t.micro_batches} micro-batches of {s['micro_batch_prompts']} prompts "
        f"({s['micro_batch_rows']} rows); old log-probs {'recomputed' if s['recompute_old_logprobs'] else 'sampled'}"
        f", KL {'on' if s['kl'] else 'off'}",
        "",
    ]


def program_lines(p: Program, hbm: float | None, n: int) -> list[str]:
    """A program's block of the report (and its verdict into ``p.result``)."""
    r = p.result
    fits, line, short = verdict(p, hbm)
    r.update(fits=fits, verdict=line, reason=short, what=p.what, notes=p.notes, count_note=p.count_note,
             flops_per_chip=r["flops"] / n, matmul_operand_bytes_per_chip=r["matmul_operand_bytes"] / n)
    if "memory" in r:
        r["with_resident"] = r["memory"]["total"] + sum(r["resident"].values())
        r["hbm_fraction"] = r["with_resident"] / (hbm * GIB) if hbm else None
    out = [f"[{p.name}] {p.what}  (traced + compiled in {r['compile_seconds']:.1f} s)"]
    if "memory" in r:
        m = r["memory"]
        share = f" = {m['total'] / (hbm * GIB):.1%} of HBM" if hbm else ""
        out.append(f"  memory/chip GiB: argument {_g(m['argument'])}, temporary {_g(m['temporary'])}, output "
                   f"{_g(m['output'])}, alias {_g(m['alias'])}; total {_g(m['total'])}{share}")
    if r["resident"]:
        out.append("  resident beside it, GiB/chip: " + ", ".join(f"{k} {_g(v)}" for k, v in r["resident"].items()))
    xla = f"; XLA cost_analysis {r['xla_flops']:.3g}/chip (loop bodies once)" if "xla_flops" in r else ""
    out.append(f"  FLOPs: {r['flops']:.3g} global, {r['flops'] / n:.3g} per chip{xla}")
    xla = f"XLA {r['xla_bytes_accessed']:.3g} (loop bodies once: a lower bound), " if "xla_bytes_accessed" in r else ""
    out.append(f"  bytes accessed/chip: {xla}matmul operands {r['matmul_operand_bytes'] / n:.3g} (global / chips)")
    out += [f"  note: {note}" for note in p.notes]
    out += [f"  verdict: {line}", ""]
    return out


def step_estimate(programs: list[Program], generation: str, n: int, dynamic: bool) -> tuple[list[str], dict]:
    """Roofline seconds per step: each program's runs x max(FLOPs/chip / peak, bytes/chip / bandwidth)."""
    if generation not in PEAKS:
        return [f"step time: no peak figures for {generation}", ""], {}
    peak, bandwidth = PEAKS[generation]
    lines = [f"step time estimate ({generation}: {peak / 1e12:.0f} TFLOP/s bf16 dense, {bandwidth / 1e9:,.0f} GB/s "
             "HBM per chip): runs x max(FLOPs/chip / peak, bytes/chip / bandwidth)"]
    total = 0.0
    for p in programs:
        r = p.result
        compute = r["flops"] / n / peak
        memory = max(r.get("xla_bytes_accessed", 0.0), r["matmul_operand_bytes"] / n) / bandwidth
        r.update(seconds_each=max(compute, memory), runs_per_step=p.count,
                 bound="compute" if compute >= memory else "memory")
        total += p.count * r["seconds_each"]
        lines.append(f"  {p.name:<10} x {p.count:<4g} {r['seconds_each']:10.4g} s each ({r['bound']}-bound) = "
                     f"{p.count * r['seconds_each']:9.4g} s  {p.count_note}")
    lines += [f"  step: {'at least ' if dynamic else ''}{total:.4g} s (a roofline: no collectives, overlap losses or "
              "host time; decode FLOPs are an upper bound, XLA's bytes a lower bound)", ""]
    return lines, dict(step_seconds=total, peak_flops=peak, hbm_bandwidth=bandwidth)


# ----------------------------------------------------------------------------------------------------------------
# Entry point


def _set_platform(count: int | None) -> None:
    """CPU as the platform (TPU programs compile for the described topology, not an attached one); for ``cpu:N``
    N host devices. Must happen before jax is imported."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TPU_STDERR_LOG_LEVEL", "2")  # libtpu's out-of-memory report names the largest buffers
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: another libtpu process may run
    if count is not None:
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={count}"])


def _devices(topology: str, count: int | None):
    import jax

    if count is not None:
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise RuntimeError(f"cpu:{count} needs {count} host devices, jax has {len(devices)} (was jax imported "
                               "before XLA_FLAGS was set?)")
        return devices[:count]
    from jax.experimental import topologies

    log: list[str] = []
    try:
        with _stderr_to(log):  # libtpu's start-up warnings about an absent TPU
            return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 -- a missing libtpu or an unknown topology, explained
        raise RuntimeError(f"cannot describe TPU topology {topology} ({type(e).__name__}: {str(e)[:300]}); libtpu "
                           "comes with `pip install 'jax[tpu]'`") from None


def main(argv=None) -> int:
    from medix_jax import cli

    parser = cli.parser("medix_jax.plan", __doc__)
    parser.add_argument("--config", action="append", required=True,
                        help="YAML config; repeat to layer files, e.g. a run config then a mesh preset")
    parser.add_argument("--topology", required=True,
                        help=f"{', '.join(TOPOLOGIES)}, a libtpu name such as v5p:4x4x2, or cpu:N")
    parser.add_argument("--images", type=int, default=1, help="images per prompt (0: text only)")
    parser.add_argument("--image-rows", type=int, default=None,
                        help="vision layout rows per image (default: the largest buckets.rows_per_image)")
    parser.add_argument("--only", help=f"compile only these programs, comma-separated ({', '.join(PROGRAMS)})")
    parser.add_argument("--json", type=Path, help="also write every figure to this JSON file")
    parser.add_argument("overrides", nargs="*", help="dotted overrides as train takes them, e.g. data.batch_size=8")
    args = parser.parse_intermixed_args(argv)
    only = set(PROGRAMS) if args.only is None else set(args.only.split(","))
    if not only or only - set(PROGRAMS):
        parser.error(f"--only {args.only}: choose from {', '.join(PROGRAMS)}")
    try:
        generation, topology, count = resolve_topology(args.topology)
    except ValueError as e:
        parser.error(str(e))
    _set_platform(count)

    from medix_jax import parallel
    from medix_jax.config import ConfigError, load_config

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"medix_jax.plan: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:
        print(f"medix_jax.plan: {e}. The model architecture comes from `checkpoint`'s config.json, which is not "
              "here: name it with an override such as model.preset=qwen2_5_vl_3b or model.preset=qwen3_vl_8b (plan "
              "loads no weights)", file=sys.stderr)
        return 2
    try:
        devices = _devices(topology, count)
        mesh = parallel.make_mesh(dataclasses.asdict(cfg.mesh), devices)
        programs, shapes = build_programs(cfg, mesh, args.images, args.image_rows)
    except (ValueError, RuntimeError) as e:
        print(f"medix_jax.plan: {e}", file=sys.stderr)
        return 2
    hbm = HBM_GIB.get(generation)
    decode_program = shapes.pop("decode_program")
    say = functools.partial(print, flush=True)
    for line in header(cfg, shapes, topology, devices, mesh, hbm, args.config):
        say(line)
    done: list[Program] = []

    def run(program: Program) -> None:
        compile_program(program)
        done.append(program)
        for line in program_lines(program, hbm, len(devices)):
            say(line)

    for program in programs:
        if program.name in only:
            run(program)
        if program.name == "prefill" and "decode" in only:
            decode = decode_program(_prefill_outputs(program, mesh))
            run(decode)
            decode.compiled = None
        program.compiled = None  # free the executable
    lines, estimate = step_estimate(done, generation, len(devices), cfg.train.dynamic_filtering)
    for line in lines:
        say(line)
    failures = [p for p in done if not p.result["fits"]]
    failed = lambda p: (p.result["error"] or "").startswith("did not")  # noqa: E731 -- else: out of memory
    broken = [f"{p.name} ({p.result['reason']})" for p in failures if failed(p)]
    too_big = [f"{p.name} ({p.result['reason']})" for p in failures if not failed(p)]
    verb = "fit" if hbm else "compiled (cpu: no memory limit)"
    summary = (f"plan: {len(done) - len(failures)} of {len(done)} programs {verb} on {topology} ({len(devices)} x "
               f"{devices[0].device_kind}, mesh {dict(mesh.shape)})"
               + (f"; DOES NOT FIT: {', '.join(too_big)}" if too_big else "")
               + (f"; FAILED: {', '.join(broken)}" if broken else "")
               + (f"; step {'>=' if cfg.train.dynamic_filtering else '~'} {estimate['step_seconds']:.3g} s (roofline)"
                  if estimate else ""))
    say(summary)
    if args.json:
        figures = dict(topology=topology, devices=len(devices), device_kind=devices[0].device_kind,
                       mesh=dict(mesh.shape), hbm_gib=hbm, configs=args.config, overrides=args.overrides,
                       shapes=shapes, programs={p.name: p.result for p in done}, fits=not failures,
                       summary=summary, **estimate)
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
