"""Ahead-of-time fit check: will one GRPO training step of this config fit on a TPU slice, and how long might it take?

``python -m medix_jax.plan --config RUN.yaml [--config MESH.yaml] --topology v5p-64 [k=v ...]``

The idea of MaxText's ``train_compile.py``, for an RL step: with libtpu installed (``jax[tpu]``) JAX can describe
a TPU slice that is not attached (``jax.experimental.topologies``), and ``jit(...).lower(...).compile()`` then runs
the real TPU compiler for it on this CPU machine. Every program one training step runs is compiled that way, with
every argument an abstract ``ShapeDtypeStruct`` carrying the sharding the real code gives it, so no array is ever
allocated. The programs are the trainer's own (``rl.programs.StepPrograms``, built the same way) and the
sampler's (``generate/``), not re-implementations:

* ``generate.static.prefill`` -- ``data.batch_size`` prompts at the largest prompt and image buckets -> KV cache;
* ``generate.static.decode`` -- the whole sampling ``while_loop`` over the donated cache (batch x G rows);
* ``embed`` (``vision``) -- a mini-batch's prompts through the vision tower and embeddings (it also runs inside
  prefill);
* ``gradients`` (``update``) -- one update micro-batch of packed rows on the embedded prompts, every completion
  width branch, and ``embed_gradients`` (``vision_grad``) -- the gradient through the embedding, per mini-batch;
* ``logprobs`` -- the old / reference log-prob forward (when ``kl_coef > 0`` or recomputing);
* ``apply`` (``optimizer``) -- clip + AdamW (parameters and Adam state donated);
* with ``rollout.weights_dtype``, ``cast`` -- the sampler's copy of the parameters in that dtype.

Per program and chip it prints the compiler's memory analysis (argument, temporary, output, alias bytes), plus the
training state that is resident on the device while the program runs without being one of its arguments (Adam
moments during sampling, the reference policy, the gradient accumulator, the step's other micro-batches); a
program fits when both together are within the chip's HBM and the compiler did not raise ``RESOURCE_EXHAUSTED``.
FLOPs are counted from the program's jaxpr (``aot.count_flops``: XLA's ``cost_analysis`` counts a loop body once,
20-40x low for scanned layers); bytes accessed come from ``cost_analysis`` (per loop body: a lower bound) and from
the matmul operands of the jaxpr. The step time is a roofline estimate from both. Exit status 1 when a program does
not fit, 2 on a configuration error.

jax is imported only after the arguments are read: the platform (CPU, with N host devices for ``cpu:N``) must be
set before it initialises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from pathlib import Path

from medix_jax.aot import (
    GIB,
    Program,
    capture_stderr,
    compile_program,
    gib,
    verdict,
)

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
# The step's programs, built abstractly


def _per_chip(tree) -> int:
    """Bytes of one device's shard of every ``ShapeDtypeStruct`` in ``tree``."""
    import jax
    import numpy as np

    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize
               for a in jax.tree.leaves(tree) if a is not None)


class Abstract:
    """Abstract arguments of the step's programs for ``cfg`` on ``mesh``: every array a ``ShapeDtypeStruct`` with the
    sharding the trainer gives it (the parameters by the sharding rules, batches by the ``batch`` rule)."""

    def __init__(self, cfg, mesh, images: int, image_rows: int | None):
        import jax
        from flax import nnx

        from medix_jax import parallel
        from medix_jax.models.qwen_vl.model import abstract_model
        from medix_jax.models.qwen_vl.vision import window_rows

        self.cfg, self.mesh, self.images = cfg, mesh, images
        model = abstract_model(cfg.model)
        self.model = model
        self.graphdef, state = nnx.split(model, nnx.Param)
        shardings = parallel.param_shardings(state, mesh, {**parallel.DEFAULT_RULES, **cfg.sharding_rules})
        flat = nnx.to_flat_state(state)
        for path, var in flat:
            var.set_value(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=shardings[path]))
        self.params = nnx.from_flat_state(flat)
        vision_cfg = cfg.model.vision
        self.qwen2_5 = cfg.model.family == "qwen2_5_vl"  # windowed attention; Qwen3-VL: full attention, a table
        self.rows = max(cfg.buckets.rows_per_image) if image_rows is None else image_rows
        unit = window_rows(vision_cfg) if self.qwen2_5 else vision_cfg.merge_unit
        if images and (self.rows % unit or self.rows % vision_cfg.merge_unit):
            raise ValueError(f"--image-rows {self.rows} must be a multiple of "
                             + (f"the attention window's {unit} rows" if self.qwen2_5
                                else f"the merge unit's {unit} rows"))
        self.length = max(cfg.buckets.prompt_lengths)

    def batch(self, shape, dtype, axis=0):
        """A batch array split by the ``batch`` rule at ``axis``, as ``parallel.batch_array`` places it."""
        import jax
        from jax.sharding import NamedSharding

        from medix_jax import parallel

        axes = tuple("batch" if i == axis else None for i in range(len(shape)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
            self.mesh, parallel.logical_spec(axes, shape, self.mesh)))

    def scalar(self, dtype):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(self.mesh, PartitionSpec()))

    def prompts(self, b: int):
        """``b`` prompts at the largest prompt bucket, ``images`` images of ``rows`` layout rows each."""
        import jax.numpy as jnp

        from medix_jax.models.qwen_vl.model import ModelInputs
        from medix_jax.models.qwen_vl.vision import VisionInputs

        v, batch = self.cfg.model.vision, self.batch
        vision = None
        if self.images:
            n = self.images * self.rows
            taps = () if self.qwen2_5 else (batch((b, n, 4), jnp.int32), batch((b, n, 4), jnp.float32))
            vision = VisionInputs(batch((b, n, v.patch_dim), jnp.float32), batch((b, self.images, self.rows), bool),
                                  batch((b, n, 2), jnp.int32), batch((b, n // v.merge_unit), jnp.int32), *taps)
        length = self.length
        return ModelInputs(batch((b, length), jnp.int32), batch((b, length), bool),
                           batch((3, b, length), jnp.int32, axis=1), batch((b,), jnp.int32), vision)

    def completions(self, n: int, with_ref: bool):
        import jax.numpy as jnp

        from medix_jax.rl.forward import Completions

        new, batch = self.cfg.rollout.max_new_tokens, self.batch
        return Completions(batch((n, new), jnp.int32), batch((n, new), bool), batch((n, new), jnp.float32),
                           batch((n,), jnp.float32), batch((n, new), jnp.float32) if with_ref else None)

    def layout(self, rows: int, per_row: int):
        import jax.numpy as jnp

        from medix_jax.rl import packing

        return packing.Layout(*(self.batch(shape, jnp.int32, axis=int(len(shape) == 3))
                                for shape in packing.shapes(rows, self.length, self.cfg.rollout.max_new_tokens,
                                                            per_row)))


def build_programs(cfg, mesh, images: int, image_rows: int | None) -> tuple[list[Program], dict]:
    """The programs of one training step (``rl.programs.StepPrograms``, as the trainer builds them, and the
    sampler's) with abstract arguments, and the shapes they were built at."""
    import jax

    from medix_jax.rl.policy import make_optimizer
    from medix_jax.rl.programs import StepPrograms

    train, rollout = cfg.train, cfg.rollout
    step_prompts, parts = cfg.data.batch_size * train.rollout_batches, train.mini_batches * train.micro_batches
    if step_prompts % parts:
        raise ValueError(f"{step_prompts} prompts per step (data.batch_size x train.rollout_batches) do not divide "
                         f"into train.mini_batches x train.micro_batches = {parts}")
    a = Abstract(cfg, mesh, images, image_rows)
    tx = make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches)
    programs = StepPrograms(a.graphdef, a.params, mesh, micro_batches=train.micro_batches, loss=train.loss,
                            rollout=rollout, tx=tx)
    opt_state = jax.eval_shape(programs.init, a.params)
    budget = Budget(cfg, a, programs, opt_state, step_prompts // parts)
    return [*rollout_programs(cfg, a, programs, budget), *update_programs(cfg, a, programs, opt_state, budget)], \
        dict(budget.shapes, decode_program=functools.partial(decode_program, cfg, a, budget))


class Budget:
    """What one step holds per chip beside each program (``resident`` state) and the shapes reported."""

    def __init__(self, cfg, a: Abstract, programs, opt_state, micro: int):
        import jax
        import jax.numpy as jnp

        from medix_jax.models.qwen_vl.model import param_count
        from medix_jax.rl import packing
        from medix_jax.rl.policy import recomputes_old_logprobs

        train, rollout = cfg.train, cfg.rollout
        g, cast = rollout.num_samples, programs.cast_dtype
        self.micro, self.kl = micro, train.loss.kl_coef > 0
        self.recompute = recomputes_old_logprobs(train.recompute_old_logprobs, cfg.model, cast)
        self.rollout_params = a.params if cast is None else jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, cast if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                                           sharding=x.sharding), a.params)
        # An update micro-batch: as many packed rows as a micro-batch has samples (rl/packing.py), several samples a
        # row unless the decoder's attention is cuDNN (PolicyUpdate.samples_per_row).
        self.per_row = packing.samples_per_row(cfg.model.attention, a.mesh.devices.flat[0].platform)
        self.update_rows = micro * g
        params_b, opt_b = _per_chip(a.params), _per_chip(opt_state)
        micro_inputs = _per_chip(a.completions(self.update_rows * self.per_row, self.kl)) \
            + _per_chip(a.layout(self.update_rows, self.per_row))  # PolicyUpdate keeps the prompts on the host
        parts = train.mini_batches * train.micro_batches
        self.params_b, self.opt_b = params_b, opt_b
        self.copy = {} if cast is None else {"rollout weights copy": _per_chip(self.rollout_params)}
        self.others = {"other micro-batches' completions": micro_inputs * (parts - 1)} if parts > 1 else {}
        self.reference = {"reference params": params_b} if self.kl else {}
        # beside the sampler: the training state (and, sampling from a cast copy, the parameters themselves)
        self.sampling = {**({} if cast is None else {"params": params_b}), "Adam state": opt_b, **self.reference}
        self.update = {"Adam state": opt_b, **self.reference, **self.copy}  # the copy lives until the first update
        self.at_least = "at least (dynamic filtering draws more)" if train.dynamic_filtering else ""
        self.image_text = f" + {a.images} image(s) x {a.rows} rows" if a.images else ", text only"
        self.shapes = dict(parameters=param_count(a.model), params_per_chip=params_b, adam_per_chip=opt_b,
                           rollout_prompts=cfg.data.batch_size, prompt_length=a.length, images=a.images,
                           rows_per_image=a.rows, rollout_rows=cfg.data.batch_size * g,
                           max_new_tokens=rollout.max_new_tokens, micro_batch_prompts=micro,
                           micro_batch_rows=micro * g, kl=self.kl, recompute_old_logprobs=self.recompute,
                           rollout_weights_dtype=None if cast is None else cast.name)


def rollout_programs(cfg, a: Abstract, programs, budget: Budget) -> list[Program]:
    """The rollout cast (``rollout.weights_dtype``) and the static sampler's prefill."""
    from medix_jax.generate import static

    rollout, train, b = cfg.rollout, cfg.train, cfg.data.batch_size
    out = []
    if programs.cast is not None:
        out.append(Program(
            "cast", f"rl.policy.cast_floats: the rollout copy of the parameters in {programs.cast_dtype.name}",
            programs.cast, (a.params,), 1, "once per step (after the step's updates)",
            {"Adam state": budget.opt_b, **budget.reference}))
    prefill_args = (a.graphdef, budget.rollout_params, a.prompts(b), rollout.max_new_tokens, rollout.num_samples,
                    a.mesh)
    out.append(Program(
        "prefill", f"generate.static.prefill: {b} prompts x {a.length} tokens{budget.image_text} -> KV cache "
        f"{b * rollout.num_samples} x {a.length + rollout.max_new_tokens}", static.prefill, prefill_args,
        train.rollout_batches, budget.at_least, budget.sampling))
    return out


def decode_program(cfg, a: Abstract, budget: Budget, prefill_out) -> Program:
    """The static sampler's decode loop on the prefill's outputs (``prefill_out``: their abstract values)."""
    import jax
    import jax.numpy as jnp

    from medix_jax.generate import static

    rollout, mesh, model_cfg = cfg.rollout, a.mesh, cfg.model
    rows, new = cfg.data.batch_size * rollout.num_samples, rollout.max_new_tokens
    ends = model_cfg.tokens.end_token_ids if rollout.stop_token_ids is None else rollout.stop_token_ids
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    args = (a.graphdef, budget.rollout_params, *prefill_out, rollout, a.length, ends,
            jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=a.scalar(key.dtype).sharding),
            a.batch((rows,), jnp.int32), mesh)
    weights_step = budget.shapes["parameters"] * jnp.dtype(model_cfg.dtype).itemsize / mesh.shape["tensor"]
    gathered = [f"where XLA all-gathers fsdp-sharded weights, every decode step reads about {weights_step / GIB:.2f} "
                f"GiB of them on every chip ({model_cfg.dtype} parameters / tensor): not in the operand bytes, which "
                "are global / chips"] if mesh.shape["fsdp"] > 1 else []
    continuous = ["the static sampler, compiled as the bound: rollout.batching continuous (the default) decodes in "
                  "rollout.slots rows over a cache of that many rows, plus one prompt-length row per prompt "
                  "(generate/continuous.py): with the default slots (a quarter of the samples), less memory than "
                  "this"] if rollout.batching == "continuous" else []
    return Program("decode", f"generate.static.decode: {rows} rows x {new} new tokens (while loop, cache donated)",
                   static.decode, args, cfg.train.rollout_batches, budget.at_least, budget.sampling,
                   while_trips=new, notes=[f"FLOPs: the while loop's body x {new} steps (an upper bound: rows stop "
                                           "at end tokens)", *continuous, *gathered])


def update_programs(cfg, a: Abstract, programs, opt_state, budget: Budget) -> list[Program]:
    """The update's programs: a mini-batch's prompts embedded once (vision tower), micro-batches of packed
    completions on them, the gradient through the embedding once per mini-batch, old / reference log-probabilities,
    the optimizer (``rl/update.py``)."""
    import jax
    import jax.numpy as jnp

    from medix_jax.rl import grpo

    train, b = cfg.train, budget
    micro, length, rows = b.micro, a.length, b.update_rows
    mini = micro * train.micro_batches
    runs = (train.mini_batches if b.kl else 0) + (train.mini_batches - 1 if b.recompute else 0)  # old / reference
    shapes_out = jax.eval_shape(programs.embed, a.params, a.prompts(mini))
    embedded = jax.tree.map(lambda x: a.batch(x.shape, x.dtype, axis=x.ndim - 3), shapes_out)  # [.., M, P, hidden]
    held = {"mini-batch prompt embeddings and their cotangent sum": 2 * _per_chip(embedded)}
    accumulator = {"gradient accumulator": b.params_b} if train.micro_batches > 1 else {}
    layout, width = a.layout(rows, b.per_row), a.scalar(jnp.int32)
    widths = "/".join(map(str, programs.widths))
    out = [Program(
        "vision", f"rl.programs.embed: a mini-batch's {mini} prompts x {length} tokens{b.image_text}, "
        f"{train.micro_batches} chunks of {micro}", programs.embed, (a.params, a.prompts(mini)),
        train.ppo_epochs * train.mini_batches + runs,
        "ppo_epochs x mini_batches, + once per mini-batch for old / reference log-probs (also inside prefill)",
        {**b.update, **b.others}), Program(
        "update", f"rl.programs.gradients: micro-batch of {rows} packed rows x ({length} + {widths}) tokens "
        f"(up to {b.per_row} samples a row) on {mini} embedded prompts", programs.gradients,
        (a.params, embedded, layout, a.completions(rows * b.per_row, b.kl),
         grpo.Totals(a.scalar(jnp.float32), a.scalar(jnp.float32)), a.scalar(bool), width),
        train.ppo_epochs * train.mini_batches * train.micro_batches, "ppo_epochs x mini_batches x micro_batches",
        {**b.update, **accumulator, **b.others, **held}), Program(
        "vision_grad", f"rl.programs.embed_gradients: the gradient through the embedding of {mini} prompts"
        f"{b.image_text}, {train.micro_batches} chunks of {micro}", programs.embed_gradients,
        (a.params, a.prompts(mini), embedded, a.params), train.ppo_epochs * train.mini_batches,
        "ppo_epochs x mini_batches", {**b.update, **b.others, **held})]
    if runs:
        why = " and ".join(w for w, on in (("reference (kl_coef > 0)", b.kl), ("old (recompute)", b.recompute)) if on)
        out.append(Program(
            "logprobs", f"rl.programs.logprobs ({why}): {rows} packed rows x ({length} + {widths}) tokens",
            programs.logprobs, (a.params, embedded, layout, a.completions(rows * b.per_row, False), width),
            runs * train.micro_batches, "once per micro-batch per step" + (" for the reference" if b.kl else "")
            + (", and for old log-probs of every mini-batch but the first" if b.recompute else ""),
            {"Adam state": b.opt_b, **({"the other parameter copy": b.params_b} if b.kl else {}), **b.copy,
             **b.others, **held}))
    out.append(Program(
        "optimizer", "rl.policy.apply_updates: clip + AdamW over params and Adam state (donated)", programs.apply,
        (a.params, opt_state, a.params), train.ppo_epochs * train.mini_batches, "ppo_epochs x mini_batches",
        {**b.reference, **b.copy, **b.others}))
    return out


def prefill_outputs(program: Program, mesh) -> tuple:
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


def header(cfg, shapes, topology, devices, mesh, hbm, configs) -> list[str]:
    s, t = shapes, cfg.train
    return [
        f"medix_jax.plan: {' + '.join(configs)} on {topology}: {len(devices)} x {devices[0].device_kind}"
        + (f", {hbm} GiB HBM each" if hbm else " (cpu: no memory limit)") + f"; mesh {dict(mesh.shape)}",
        f"model: {s['parameters']:,} parameters ({cfg.model.param_dtype} storage, {cfg.model.dtype} compute); per "
        f"chip: params {gib(s['params_per_chip'])} GiB, Adam state {gib(s['adam_per_chip'])} GiB"
        + (f", reference params {gib(s['params_per_chip'])} GiB" if s["kl"] else ""),
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
        out.append(f"  memory/chip GiB: argument {gib(m['argument'])}, temporary {gib(m['temporary'])}, output "
                   f"{gib(m['output'])}, alias {gib(m['alias'])}; total {gib(m['total'])}{share}")
    if r["resident"]:
        out.append("  resident beside it, GiB/chip: " + ", ".join(f"{k} {gib(v)}" for k, v in r["resident"].items()))
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
        with capture_stderr(log):  # libtpu's start-up warnings about an absent TPU
            return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as e:  # noqa: BLE001 -- a missing libtpu or an unknown topology, explained
        raise RuntimeError(f"cannot describe TPU topology {topology} ({type(e).__name__}: {str(e)[:300]}); libtpu "
                           "comes with `pip install 'jax[tpu]'`") from None


def summary_line(done: list[Program], failures: list[Program], topology: str, devices, mesh, hbm, dynamic: bool,
                 estimate: dict) -> str:
    """The report's last line: how many programs fit, which do not (out of memory) or failed, the step estimate."""
    failed = lambda p: (p.result["error"] or "").startswith("did not")  # noqa: E731 -- else: out of memory
    broken = [f"{p.name} ({p.result['reason']})" for p in failures if failed(p)]
    too_big = [f"{p.name} ({p.result['reason']})" for p in failures if not failed(p)]
    verb = "fit" if hbm else "compiled (cpu: no memory limit)"
    return (f"plan: {len(done) - len(failures)} of {len(done)} programs {verb} on {topology} ({len(devices)} x "
            f"{devices[0].device_kind}, mesh {dict(mesh.shape)})"
            + (f"; DOES NOT FIT: {', '.join(too_big)}" if too_big else "")
            + (f"; FAILED: {', '.join(broken)}" if broken else "")
            + (f"; step {'>=' if dynamic else '~'} {estimate['step_seconds']:.3g} s (roofline)" if estimate else ""))


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
            decode = decode_program(prefill_outputs(program, mesh))
            run(decode)
            decode.compiled = None
        program.compiled = None  # free the executable
    lines, estimate = step_estimate(done, generation, len(devices), cfg.train.dynamic_filtering)
    for line in lines:
        say(line)
    failures = [p for p in done if not p.result["fits"]]
    summary = summary_line(done, failures, topology, devices, mesh, hbm, cfg.train.dynamic_filtering, estimate)
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
