"""Ahead-of-time fit check: will one GRPO training step of this config fit on a TPU slice, and how long might it take?

``python -m medix_jax.plan --config RUN.yaml [--config MESH.yaml] --topology v5p-64 [k=v ...]``

The idea of MaxText's ``train_compile.py``, for an RL step: with libtpu installed (``jax[tpu]``) JAX can describe
a TPU slice that is not attached (``jax.experimental.topologies``), and ``jit(...).lower(...).compile()`` then runs
the real TPU compiler for it on this CPU machine. Every program one training step runs is compiled that way, with
every argument an abstract ``ShapeDtypeStruct`` carrying the sharding the real code gives it, so no array is ever
allocated. The programs are the trainer's own (``rl.programs.StepPrograms``, built the same way) and the
sampler's (``generate/``), not re-implementations:

* with ``rollout.weights_dtype`` or ``rollout.mesh``, ``cast`` -- the sampler's copy of the parameters in that
  dtype and layout (once per step);
* the continuous sampler (``rollout.batching: continuous``, the default): ``pool`` -- ``generate.static.prefill`` of
  ``data.batch_size`` prompts at the largest prompt and image buckets, once each; ``round`` --
  ``generate.continuous.decode_round``, the decode loop over ``rollout.slots`` slots;
* the static sampler: ``prefill`` -- the same prompts -> a KV cache of batch x G rows; ``decode`` -- the whole
  sampling ``while_loop`` over the donated cache. The sampler not chosen is compiled to compare (not in the step
  or the verdict);
* ``embed`` (``vision``) -- a mini-batch's prompts through the vision tower and embeddings (it also runs inside
  prefill);
* ``gradients`` (``update``) -- one update micro-batch of packed rows on the embedded prompts, every completion
  width branch, and ``embed_gradients`` (``vision_grad``) -- the gradient through the embedding, per mini-batch;
* ``logprobs`` -- the old / reference log-prob forward (when ``kl_coef > 0`` or recomputing);
* ``apply`` (``optimizer``) -- clip + AdamW (parameters and Adam state donated).

Per program and chip it prints the compiler's memory analysis (argument, temporary, output, alias bytes), plus the
training state that is resident on the device while the program runs without being one of its arguments (Adam
moments during sampling, the reference policy, the gradient accumulator, the step's other micro-batches); a
program fits when both together are within the chip's HBM and the compiler did not raise ``RESOURCE_EXHAUSTED``.
FLOPs are counted from the program's jaxpr (``aot.count_flops``: XLA's ``cost_analysis`` counts a loop body once,
20-40x low for scanned layers); bytes accessed come from ``cost_analysis`` (per loop body: a lower bound) and from
the matmul operands of the jaxpr; communication from the collectives of the optimized HLO, loops multiplied by
their trips (``comms``; ``--dump-hlo DIR`` writes each program's HLO). The step time is a roofline estimate from
the three. Exit status 1 when a program does not fit, 2 on a configuration error.

jax is imported only after the arguments are read: the platform (CPU, with N host devices for ``cpu:N``) must be
set before it initialises.
"""

from __future__ import annotations

import dataclasses
import functools
import json
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
from medix_jax.plan_programs import build_programs, prefill_outputs

# Slice names (as Cloud TPU spells them: cores for v5p, chips for v5e / v6e) -> libtpu topology names.
TOPOLOGIES = {
    "v5p-8": "v5p:2x2x1", "v5p-16": "v5p:2x2x2", "v5p-32": "v5p:2x2x4", "v5p-64": "v5p:4x4x2",
    "v5p-128": "v5p:4x4x4", "v5e-4": "v5e:2x2", "v5e-8": "v5e:2x4", "v5e-16": "v5e:4x4", "v5e-64": "v5e:8x8",
    "v6e-4": "v6e:2x2", "v6e-8": "v6e:2x4", "v6e-16": "v6e:4x4", "v6e-32": "v6e:4x8", "v6e-64": "v6e:8x8",
    "v6e-256": "v6e:16x16",
}
PROGRAMS = ("cast", "prefill", "decode", "pool", "round", "vision", "update", "vision_grad", "logprobs", "optimizer")
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
             flops_per_chip=r["flops"] / n, matmul_operand_bytes_per_chip=r["matmul_operand_bytes"] / n,
             streamed_bytes_per_chip=p.streamed)
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
    streamed = f", weights streamed {p.streamed:.3g} (each step reads the chip's weights)" if p.streamed else ""
    out.append(f"  bytes accessed/chip: {xla}matmul operands {r['matmul_operand_bytes'] / n:.3g} (global / chips)"
               f"{streamed}")
    if "communication" in r:
        out.append(f"  communication/chip: {communication_line(r['communication'])}")
    out += [f"  note: {note}" for note in p.notes]
    out += [f"  verdict: {line}", ""]
    return out


def communication_line(c: dict) -> str:
    """One line of a program's collectives (``comms.summarize``)."""
    if not c["collectives"]:
        return "no collectives"
    kinds = ", ".join(f"{k} {v['count']:g} x = {gib(v['bytes'])} GiB" for k, v in sorted(c["by_kind"].items()))
    seconds = "" if c["seconds"] is None else f" = {c['seconds']:.4g} s at ICI bandwidth"
    return (f"{c['executions']:g} collectives per run ({c['collectives']} in the program), {gib(c['bytes_per_chip'])} "
            f"GiB received ({gib(c['bytes_per_chip_in_loops'])} inside loops){seconds}: {kinds}")


def step_estimate(programs: list[Program], generation: str, n: int, dynamic: bool) -> tuple[list[str], dict]:
    """Roofline seconds per step: each program's runs x max(FLOPs/chip / peak, bytes/chip / HBM bandwidth,
    bytes received/chip / ICI bandwidth) -- the three ceilings, assuming each overlaps the others."""
    from medix_jax.comms import ICI_BYTES_PER_S

    if generation not in PEAKS:
        return [f"step time: no peak figures for {generation}", ""], {}
    (peak, bandwidth), ici = PEAKS[generation], ICI_BYTES_PER_S[generation]
    lines = [f"step time estimate ({generation}: {peak / 1e12:.0f} TFLOP/s bf16 dense, {bandwidth / 1e9:,.0f} GB/s "
             f"HBM, {ici / 1e9:,.0f} GB/s ICI in per chip): runs x max(FLOPs/chip / peak, bytes/chip / HBM, "
             "received/chip / ICI)"]
    total = communication = 0.0
    for p in programs:
        r = p.result
        terms = dict(compute=r["flops"] / n / peak,
                     memory=max(r.get("xla_bytes_accessed", 0.0), r["matmul_operand_bytes"] / n, p.streamed)
                     / bandwidth,
                     communication=(r.get("communication") or {}).get("bytes_per_chip", 0.0) / ici)
        bound = max(terms, key=lambda k: terms[k])
        r.update(seconds_each=terms[bound], runs_per_step=p.count, bound=bound, seconds_terms=terms)
        total += p.count * r["seconds_each"]
        communication += p.count * terms["communication"]
        lines.append(f"  {p.name:<10} x {p.count:<4g} {r['seconds_each']:10.4g} s each ({bound}-bound; "
                     f"communication {terms['communication']:.4g} s) = {p.count * r['seconds_each']:9.4g} s  "
                     f"{p.count_note}")
    lines += [f"  step: {'at least ' if dynamic else ''}{total:.4g} s, of which {communication:.4g} s of collectives "
              "(a roofline: overlap losses and host time left out; decode FLOPs and collectives are upper bounds "
              "(rows stop early), XLA's bytes a lower bound)", ""]
    return lines, dict(step_seconds=total, communication_seconds=communication, peak_flops=peak,
                       hbm_bandwidth=bandwidth, ici_bandwidth=ici)


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


def compile_all(programs: list[Program], decode_program, only: set[str], generation: str, n: int, hbm,
                dump_hlo: Path | None) -> list[Program]:
    """Compile the programs named in ``only`` one at a time (the static decode after its prefill), print each one's
    block, write its HLO to ``dump_hlo``, free its executable; the programs compiled."""
    from medix_jax.comms import ICI_BYTES_PER_S

    done: list[Program] = []

    def run(program: Program) -> None:
        compile_program(program, n, ICI_BYTES_PER_S.get(generation))
        if dump_hlo and program.hlo:
            dump_hlo.mkdir(parents=True, exist_ok=True)
            (dump_hlo / f"{program.name}.hlo.txt").write_text(program.hlo)
        program.hlo = ""
        done.append(program)
        for line in program_lines(program, hbm, n):
            print(line, flush=True)

    for program in programs:
        if program.name in only:
            run(program)
        if program.name == "prefill" and "decode" in only:
            decode = decode_program(prefill_outputs(program))
            run(decode)
            decode.compiled = None
        program.compiled = None  # free the executable
    return done


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
    parser.add_argument("--dump-hlo", type=Path, metavar="DIR",
                        help="write each program's optimized HLO text to DIR/PROGRAM.hlo.txt")
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
    done = compile_all(programs, decode_program, only, generation, len(devices), hbm, args.dump_hlo)
    lines, estimate = step_estimate(done, generation, len(devices), cfg.train.dynamic_filtering)
    for line in lines:
        say(line)
    failures = [p for p in done if not p.result["fits"] and not p.alternative]
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
