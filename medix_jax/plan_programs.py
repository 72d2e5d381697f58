"""The programs of one training step built abstractly for ``plan``: every argument a ``ShapeDtypeStruct`` carrying the
sharding the trainer gives it (``Abstract``), the state each program has resident beside it (``Budget``), and the
programs themselves -- the trainer's own (``rl.programs.StepPrograms``) and the sampler's (``generate/``): the
rollout copy, the static sampler's prefill and decode loop, the continuous sampler's pool prefill and decode round,
and the update's programs.
"""

from __future__ import annotations

import functools
import math

from medix_jax.aot import Program


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

    def batch(self, shape, dtype, axis=0, mesh=None):
        """A batch array split by the ``batch`` rule at ``axis``, as ``parallel.batch_array`` places it (on
        ``mesh``, by default the trainer's)."""
        import jax
        from jax.sharding import NamedSharding

        from medix_jax import parallel

        mesh = mesh or self.mesh
        axes = tuple("batch" if i == axis else None for i in range(len(shape)))
        return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(
            mesh, parallel.logical_spec(axes, shape, mesh)))

    def scalar(self, dtype, mesh=None):
        import jax
        from jax.sharding import NamedSharding, PartitionSpec

        return jax.ShapeDtypeStruct((), dtype, sharding=NamedSharding(mesh or self.mesh, PartitionSpec()))

    def prompts(self, b: int, mesh=None):
        """``b`` prompts at the largest prompt bucket, ``images`` images of ``rows`` layout rows each (split over
        ``mesh``'s batch axes, by default the trainer's)."""
        import jax.numpy as jnp

        from medix_jax.models.qwen_vl.model import ModelInputs
        from medix_jax.models.qwen_vl.vision import VisionInputs

        v, batch = self.cfg.model.vision, functools.partial(self.batch, mesh=mesh)
        vision = None
        if self.images:
            n = self.images * self.rows
            taps = () if self.qwen2_5 else (batch((b, n, 4), jnp.int32), batch((b, n, 4), jnp.float32))
            vision = VisionInputs(batch((b, n, v.patch_dim), jnp.float32), batch((b, self.images, self.rows), bool),
                                  batch((b, n, 2), jnp.int32), batch((b, n // v.merge_unit), jnp.int32), *taps)
        length = self.length
        return ModelInputs(batch((b, length), jnp.int32), batch((b, length), bool),
                           batch((3, b, length), jnp.int32, axis=1), batch((b,), jnp.int32), vision)

    def completions(self, n: int, with_ref: bool, with_sampler: bool = False):
        import jax.numpy as jnp

        from medix_jax.rl.forward import Completions

        new, batch = self.cfg.rollout.max_new_tokens, self.batch
        return Completions(batch((n, new), jnp.int32), batch((n, new), bool), batch((n, new), jnp.float32),
                           batch((n,), jnp.float32), batch((n, new), jnp.float32) if with_ref else None,
                           batch((n, new), jnp.float32) if with_sampler else None)

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
    tx = make_optimizer(train.optim, train.steps * train.ppo_epochs * train.mini_batches, cfg.model.param_dtype)
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
        self.micro, self.kl, self.rollout_mesh = micro, train.loss.kl_coef > 0, programs.rollout_mesh
        self.correct = train.loss.rollout_correction != "none"  # the sampler's log-probs travel beside the old
        self.recompute = recomputes_old_logprobs(train.recompute_old_logprobs, cfg.model, cast,
                                                 train.loss.rollout_correction, rollout.staleness)
        self.rollout_params = a.params if programs.cast is None else jax.tree.map(
            lambda x, sharding: jax.ShapeDtypeStruct(
                x.shape, cast if cast is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype,
                sharding=sharding), a.params, programs.rollout_shardings)
        # What a decode step reads on each chip at least: every decoder weight it holds (not the vision tower; the
        # embedding table only when it is also the output projection).
        self.decode_step_bytes = _per_chip(_decoder_weights(self.rollout_params))
        # An update micro-batch: as many packed rows as a micro-batch has samples (rl/packing.py), several samples a
        # row unless the decoder's attention is cuDNN (PolicyUpdate.samples_per_row).
        self.per_row = packing.samples_per_row(cfg.model.attention, a.mesh.devices.flat[0].platform)
        self.update_rows = micro * g
        params_b, opt_b = _per_chip(a.params), _per_chip(opt_state)
        micro_inputs = _per_chip(a.completions(self.update_rows * self.per_row, self.kl, self.correct)) \
            + _per_chip(a.layout(self.update_rows, self.per_row))  # PolicyUpdate keeps the prompts on the host
        parts = train.mini_batches * train.micro_batches
        self.params_b, self.opt_b = params_b, opt_b
        self.others = {"other micro-batches' completions": micro_inputs * (parts - 1)} if parts > 1 else {}
        self.reference = {"reference params": params_b} if self.kl else {}
        # beside the sampler: the training state (and, sampling from a cast copy, the parameters themselves)
        self.sampling = {**({} if programs.cast is None else {"params": params_b}), "Adam state": opt_b,
                         **self.reference}
        # The copy is released when the update begins (Trainer.update) and made again after it: not resident here.
        self.update = {"Adam state": opt_b, **self.reference}
        self.at_least = "at least (dynamic filtering draws more)" if train.dynamic_filtering else ""
        self.image_text = f" + {a.images} image(s) x {a.rows} rows" if a.images else ", text only"
        self.shapes = dict(parameters=param_count(a.model), params_per_chip=params_b, adam_per_chip=opt_b,
                           rollout_prompts=cfg.data.batch_size, prompt_length=a.length, images=a.images,
                           rows_per_image=a.rows, rollout_rows=cfg.data.batch_size * g,
                           max_new_tokens=rollout.max_new_tokens, micro_batch_prompts=micro,
                           micro_batch_rows=micro * g, kl=self.kl, recompute_old_logprobs=self.recompute,
                           rollout_weights_dtype=None if cast is None else cast.name)


def rollout_programs(cfg, a: Abstract, programs, budget: Budget) -> list[Program]:
    """The rollout copy (cast + reshard), the static sampler's prefill (its decode follows from the prefill's
    outputs: ``decode_program``) and the continuous sampler's pool prefill and decode round. The sampler that
    ``rollout.batching`` does not choose is compiled too, for comparison: it counts neither in the step nor in the
    verdict (``Program.alternative``)."""
    from medix_jax.generate import static

    rollout, train, b, mesh = cfg.rollout, cfg.train, cfg.data.batch_size, programs.rollout_mesh
    out = []
    if programs.cast is not None:
        dtype = "" if programs.cast_dtype is None else f" in {programs.cast_dtype.name}"
        layout = "" if rollout.mesh is None else f", resharded to the rollout mesh {dict(mesh.shape)}"
        out.append(Program(
            "cast", f"rl.policy.cast_floats: the sampler's copy of the parameters{dtype}{layout}",
            programs.cast, (a.params,), 1, "once per step (after the step's updates)",
            {"Adam state": budget.opt_b, **budget.reference}))
    static_runs = train.rollout_batches if rollout.batching == "static" else 0
    prefill_args = (a.graphdef, budget.rollout_params, a.prompts(b, mesh), rollout.max_new_tokens,
                    rollout.num_samples, mesh)
    out.append(Program(
        "prefill", f"generate.static.prefill: {b} prompts x {a.length} tokens{budget.image_text} -> KV cache "
        f"{b * rollout.num_samples} x {a.length + rollout.max_new_tokens}", static.prefill, prefill_args,
        static_runs, budget.at_least or _unused(rollout, "static"), budget.sampling, alternative=not static_runs))
    return [*out, *continuous_programs(cfg, a, budget)]


def _unused(rollout, sampler: str) -> str:
    """The count note of ``sampler``'s programs: empty when ``rollout.batching`` runs it."""
    used = rollout.batching
    return "" if used == sampler else f"not run: rollout.batching is {used} (compiled to compare)"


def decode_program(cfg, a: Abstract, budget: Budget, prefill_out) -> Program:
    """The static sampler's decode loop on the prefill's outputs (``prefill_out``: their abstract values)."""
    import jax.numpy as jnp

    from medix_jax.generate import static

    rollout, mesh = cfg.rollout, budget.rollout_mesh
    rows, new = cfg.data.batch_size * rollout.num_samples, rollout.max_new_tokens
    args = (a.graphdef, budget.rollout_params, *prefill_out, rollout, a.length, _ends(cfg), _key(a, mesh),
            a.batch((rows,), jnp.int32, mesh=mesh), mesh)
    runs = cfg.train.rollout_batches if rollout.batching == "static" else 0
    return Program("decode", f"generate.static.decode: {rows} rows x {new} new tokens (while loop, cache donated)",
                   static.decode, args, runs, budget.at_least or _unused(rollout, "static"), budget.sampling,
                   while_trips=new, alternative=not runs, streamed=new * budget.decode_step_bytes,
                   notes=[f"FLOPs and collectives: the while loop's body x {new} steps (an upper bound: rows stop "
                          "at end tokens)"])


def _decoder_weights(params) -> list:
    """The parameters a decode step reads whole: the decoder's, without the vision tower and without the input
    embedding table when a separate ``lm_head`` is the output projection (only the new tokens' rows are read)."""
    from flax import nnx

    flat = [(".".join(map(str, path)), var) for path, var in nnx.to_flat_state(params)]
    untied = any(name.startswith("lm_head") for name, _ in flat)
    return [var.get_value() for name, var in flat if not name.startswith("visual")
            and not (untied and name.startswith("model.embed_tokens"))]


def _ends(cfg) -> tuple[int, ...]:
    tokens = cfg.model.tokens
    return tokens.end_token_ids if cfg.rollout.stop_token_ids is None else cfg.rollout.stop_token_ids


def _key(a: Abstract, mesh):
    import jax

    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=a.scalar(key.dtype, mesh).sharding)


def continuous_programs(cfg, a: Abstract, budget: Budget) -> list[Program]:
    """The continuous sampler (``generate/continuous.py``): every prompt prefilled once into the pool, and a decode
    round over ``rollout.slots`` slots. A call's rounds together take at most ``ceil(samples / slots) x
    max_new_tokens`` steps (every sample at full length, the slots always full): the round's loop is counted so."""
    import jax.numpy as jnp

    from medix_jax.generate import continuous, static

    rollout, mesh, b = cfg.rollout, budget.rollout_mesh, cfg.data.batch_size
    g, new = rollout.num_samples, rollout.max_new_tokens
    samples = b * g
    slots = rollout.slots or continuous.default_slots(samples, g, mesh)
    runs = cfg.train.rollout_batches if rollout.batching == "continuous" else 0
    note = budget.at_least or _unused(rollout, "continuous")
    pool = Program(
        "pool", f"generate.static.prefill for generate.continuous: {b} prompts x {a.length} tokens"
        f"{budget.image_text} -> the prompt pool", static.prefill,
        (a.graphdef, budget.rollout_params, a.prompts(b, mesh), 0, 1, mesh), runs, note, budget.sampling,
        alternative=not runs)
    empty = (a.graphdef, budget.rollout_params, slots, a.length, samples, new, mesh)
    slot_state = continuous.empty_slots.lower(*empty).compile().out_info
    steps = -(-samples // slots) * new
    decode = Program(
        "round", f"generate.continuous.decode_round: {slots} slots of {a.length} + {new} tokens for {samples} "
        "samples (while loop, slots donated)", continuous.decode_round,
        (a.graphdef, budget.rollout_params, slot_state, rollout, a.length, _ends(cfg), _key(a, mesh), mesh,
         a.scalar(jnp.int32, mesh)), runs, note, budget.sampling, while_trips=steps, alternative=not runs,
        streamed=steps * budget.decode_step_bytes,
        notes=[f"FLOPs and collectives: the loop's body x {steps} steps, ceil({samples} samples / {slots} slots) x "
               f"{new} (an upper bound: samples stop at end tokens)"])
    return [pool, decode]


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
        (a.params, embedded, layout, a.completions(rows * b.per_row, b.kl, b.correct),
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
            {"Adam state": b.opt_b, **({"the other parameter copy": b.params_b} if b.kl else {}),
             **b.others, **held}))
    out.append(Program(
        "optimizer", "rl.policy.apply_updates: clip + AdamW over params and Adam state (donated)", programs.apply,
        (a.params, opt_state, a.params), train.ppo_epochs * train.mini_batches, "ppo_epochs x mini_batches",
        {**b.reference, **b.others}))
    return out


def prefill_outputs(program: Program) -> tuple:
    """The decode's inputs as the prefill returns them (its compiled output shardings; without a compiled prefill,
    the placements the sampler pins them to on the prefill's mesh)."""
    import jax
    from jax.sharding import NamedSharding

    from medix_jax import parallel

    mesh = program.args[-1]
    if program.compiled is not None:
        return program.compiled.out_info
    out = program.fn.trace(*program.args).out_info

    def place(a, axes):
        spec = parallel.logical_spec(axes, a.shape, mesh)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(mesh, spec))

    cache = jax.tree.map(lambda a: place(a, ("layers", "batch", None, "kv_heads", None)), out[0])
    rest = [place(a, ("batch",) + (None,) * (a.ndim - 1)) for a in out[1:]]
    return (cache, *rest)


