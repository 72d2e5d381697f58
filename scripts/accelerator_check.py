"""The accelerator check (issue 30): on a lent GPU or TPU host, one command runs five stages, each in a subprocess
under its own time limit (480 s in all; a stage may also use what the stages before it left unused: stage i ends by
the sum of the first i limits), and writes their figures to one JSON.

    bash scripts/gpu/check.sh [--out DIR] [--only env,tests,...] [--dry-run] [--allow-cpu]
    python scripts/accelerator_check.py --platform gpu|tpu [same options]

Stages: ``env`` (python, jax, backend, devices, packages; a cuDNN-attention probe on GPU), ``tests`` (the tests of
the accelerator code paths: attention implementations, the sampler against transformers, a bf16 GSPO step),
``bench_sampler`` and ``bench_train`` (``python -m medix_jax.bench``), ``grpo`` (a short run of the embedded
default, its held-out results). DIR gets ``check.json`` (rewritten after every stage) and ``<stage>.log``: six files.
A failed ``env``, or a backend that is not the accelerator (without ``--allow-cpu``), stops the run.
Stdlib only at import time: jax and the project run in the stages' subprocesses (``--probe env`` is the env stage).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TAIL_LINES = 40  # of a failed stage's output, into check.json
GRACE_S = 3  # after a stage's time limit: SIGTERM, this long, then SIGKILL (its whole process group)
JAX_PLATFORMS = {"gpu": "cuda,cpu", "tpu": "tpu,cpu"}  # fail loudly rather than fall back to the CPU
RUN_DIR = Path(tempfile.gettempdir()) / "medix_accelerator_check" / "run"  # outside --out: a run has many files
TESTS = ["tests/test_attention.py", "tests/test_sampler.py",
         "tests/test_train.py::test_bf16_gspo_first_update_is_exactly_on_policy"]
TESTS_DESELECT = "not shard_map and not sharded"  # these need 8 devices (the CPU suite's simulated ones)
# ~70 s on a 2-core CPU: 600 cold-start steps (no sampling during them) and 60 GRPO steps, saved at the stages' ends
# only; no export; no embedding reward (sentence-transformers and its model are CPU-side extras a host may lack)
GRPO_OVERRIDES = ["sft.steps=600", "sft.sample_every=0", "train.steps=60", "train.save_every=1000",
                  "train.export_hf=false", "rewards.embedding_on=false", "eval.max_samples=64"]
# What the stages import beyond jax, flax, optax, orbax-checkpoint, transformers, torch, safetensors, tqdm and pytest
# (and their requirements): the env stage lists those missing (wheels for them go in .whl/, docs/development.md)
NEEDED = ["grain", "array-record", "tensorflow-datasets", "tensorflow-metadata", "dm-tree", "promise", "immutabledict",
          "importlib-resources", "toml", "wrapt", "cloudpickle", "portpicker", "attrs", "openai", "sniffio", "pillow",
          "pyarrow", "matplotlib", "tensorboardx", "pytest-xdist", "pytest-timeout"]
PACKAGES = ["flax", "optax", "orbax-checkpoint", "transformers", "torch", "safetensors", "pytest", *NEEDED,
            "sentence-transformers", "jax-cuda12-plugin", "jax-cuda12-pjrt", "nvidia-cudnn-cu12", "libtpu"]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}  # lent hosts reach nothing outside


@dataclasses.dataclass
class Stage:
    name: str
    argv: list[str]
    timeout_s: int
    env: dict[str, str] = dataclasses.field(default_factory=dict)  # on top of the driver's environment


def stages(python: str, platform: str, allow_cpu: bool) -> list[Stage]:
    """The five stages in order; their time limits add up to 480 s. The transformers peers of the benchmarks run
    on the host's CPU (~100 s a ``generate`` call on a 2-core CPU), hence two timed runs of the sampler."""
    accel = {} if allow_cpu else {"JAX_PLATFORMS": JAX_PLATFORMS[platform]}
    # tests/conftest.py sets JAX_PLATFORMS=cpu only where unset; the tests compare float32 at 2e-5 and greedy tokens
    # with transformers on the CPU, which TF32 (GPU) or bf16 passes (TPU) matmuls do not meet.
    tests_env = {**accel, "JAX_DEFAULT_MATMUL_PRECISION": "highest", "XLA_PYTHON_CLIENT_PREALLOCATE": "false"}
    pytest = [python, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-n", "0", "-o", "addopts=", "-rfE",
              "--durations=10", "--timeout=120", *TESTS, "-k", TESTS_DESELECT]
    grpo = [python, "-m", "medix_jax.train", f"train.run_dir={RUN_DIR}", *GRPO_OVERRIDES]
    return [Stage("env", [python, "scripts/accelerator_check.py", "--probe", "env"], 40, accel),
            Stage("tests", pytest, 140, tests_env),
            Stage("bench_sampler", [python, "-m", "medix_jax.bench", "sampler", "--runs", "2"], 90, accel),
            Stage("bench_train", [python, "-m", "medix_jax.bench", "train", "--runs", "2"], 80, accel),
            Stage("grpo", grpo, 130, accel)]


# ---------------------------------------------------------------------------------------------------------------
# running a stage


def run_stage(stage: Stage, out: Path, limit_s: float) -> dict:
    """Run ``stage`` for at most ``limit_s`` with its output in ``out/<name>.log``; its record (figures parsed from
    the output)."""
    log = out / f"{stage.name}.log"
    env = {**OFFLINE, **os.environ, "PYTHONUNBUFFERED": "1", **stage.env}
    start = time.perf_counter()
    status, code = "ok", None
    with open(log, "w") as f:
        try:
            proc = subprocess.Popen(stage.argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        except OSError as e:
            f.write(f"could not start: {e}\n")
            status = "error"
        else:
            try:
                code = proc.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                status, code = "timeout", stop(proc)
            if status == "ok" and code != 0:
                status = "failed"
    seconds = time.perf_counter() - start
    text = squeeze(log.read_bytes().decode(errors="replace"))  # read_text: carriage returns become newlines
    log.write_text(text)
    record = dict(name=stage.name, command=shlex.join(stage.argv), env=stage.env, timeout_s=stage.timeout_s,
                  limit_s=round(limit_s, 1), status=status, returncode=code, seconds=round(seconds, 1), log=log.name)
    try:
        record["figures"] = PARSERS[stage.name](text)
    except Exception as e:  # a parser must never lose the record
        record["figures"] = {"parse_error": repr(e)}
    if status != "ok":
        record["tail"] = [line[-1000:] for line in text.splitlines()[-TAIL_LINES:]]
    return record


def squeeze(text: str) -> str:
    """Each line's last carriage-return segment: a progress bar's final state instead of its every redraw (the
    GRPO run's bar alone would be ~100 KB)."""
    lines = []
    for line in text.split("\n"):
        parts = [part.rstrip() for part in line.split("\r")]
        lines.append(next((part for part in reversed(parts) if part), ""))
    return "\n".join(lines)


def stop(proc: subprocess.Popen) -> int | None:
    """SIGTERM the stage's process group (train saves and exits), then SIGKILL after ``GRACE_S``."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


# ---------------------------------------------------------------------------------------------------------------
# parsing the stages' output


def parse_env(text: str) -> dict:
    lines = [line for line in text.splitlines() if line.startswith("ENV ")]
    return json.loads(lines[-1][4:]) if lines else {}


def parse_tests(text: str) -> dict:
    """Counts from pytest's last line (``1 failed, 46 passed, 6 deselected in 119.15s``), the failed ids, the
    slowest tests."""
    figures: dict = {}
    summary = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error|errors|no tests ran)\b", line)
               and re.search(r" in [\d.]+s", line)]
    if summary:
        line = summary[-1].strip("= ")
        for count, what in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?|xfailed|xpassed)", line):
            figures["errors" if what.startswith("error") else what] = int(count)
        found = re.search(r" in ([\d.]+)s", line)
        figures["pytest_seconds"] = float(found.group(1)) if found else None
        figures["summary"] = line
    else:  # no summary (the stage ran out of time): count the progress characters of the tests that finished
        progress = "".join(m.group(1) for m in re.finditer(r"^([.FEsxX]+)\s*(?:\[\s*\d+%\])?$", text, re.M))
        figures.update(passed=progress.count("."), failed=progress.count("F"), skipped=progress.count("s"),
                       errors=progress.count("E"), partial=True)
    for key in ("passed", "failed", "skipped", "errors"):
        figures.setdefault(key, 0)
    figures["failures"] = [line for line in text.splitlines() if line.startswith(("FAILED ", "ERROR "))][:30]
    figures["slowest"] = [f"{m.group(1)}s {m.group(3)} ({m.group(2)})" for m in
                          re.finditer(r"^([\d.]+)s (call|setup|teardown)\s+(\S+)", text, re.M)][:10]
    return figures


def labelled(text: str, label: str, unit: str) -> re.Match | None:
    """The bench line ``  <label> : <x> <unit>  (median of N: 1.00s, 2.00s)``."""
    return re.search(rf"^\s*{re.escape(label)}\s*:\s*([\d.]+) {re.escape(unit)}\s+\(median of (\d+): ([^)]*)\)",
                     text, re.M)


def times(listed: str) -> list[float]:
    return [float(x) for x in re.findall(r"([\d.]+)s", listed)]


def speeds(text: str, ours: str, peer: str) -> dict:
    """``ours_tok_s`` / ``peer_tok_s`` and their timed runs from the bench lines labelled ``ours`` and ``peer``."""
    figures: dict = {}
    for key, label in (("ours", ours), ("peer", peer)):
        found = labelled(text, label, "tokens/s")
        if found:
            figures[f"{key}_tok_s"] = float(found.group(1))
            figures[f"{key}_times_s"] = times(found.group(3))
    return figures


def bench_lines(text: str, head: str) -> list[str]:
    """The bench's own lines: the header (``bench sampler: ...``) and the indented figure lines after it."""
    lines = text.splitlines()
    first = next((i for i, line in enumerate(lines) if line.startswith(head)), None)
    if first is None:
        return []
    return [lines[first]] + [line for line in lines[first + 1:first + 8] if line.startswith("  ")]


def parse_bench_sampler(text: str) -> dict:
    """bench.py ``bench_sampler``'s lines: ours and transformers' tokens/s, the ratio, greedy agreement."""
    figures: dict = {"lines": bench_lines(text, "bench sampler:")}
    head = re.search(r"bench sampler: ([\d.]+)M params, batch (\d+) x (\d+) prompt tokens.*?jax on (\w+)"
                     r"(?: \(([^)]*)\))?, torch (\d+) threads", text)  # the layout in brackets: one device or a mesh
    if head:
        figures.update(params_m=float(head.group(1)), batch=int(head.group(2)), prompt_tokens=int(head.group(3)),
                       jax_platform=head.group(4), layout=head.group(5), torch_threads=int(head.group(6)))
    figures.update(speeds(text, ours="medix_jax sampler", peer="transformers generate"))
    ratio = re.search(r"ratio \(ours / peer\)\s*:\s*([\d.]+)x\s+greedy token agreement ([\d.]+)%", text)
    if ratio:
        figures.update(ratio=float(ratio.group(1)), token_agreement=float(ratio.group(2)) / 100)
    return figures


def parse_bench_train(text: str) -> dict:
    """bench_train.py ``bench_train``'s lines: the update step's tokens/s, FLOPs and MFU, transformers', the ratio."""
    figures: dict = {"lines": bench_lines(text, "bench train:")}
    head = re.search(r"bench train: ([\d.]+)M params, batch (\d+) x \((\d+) prompt \+ (\d+) completion\).*?jax on "
                     r"(\w+), torch (\d+) threads", text)
    if head:
        figures.update(params_m=float(head.group(1)), batch=int(head.group(2)), prompt_tokens=int(head.group(3)),
                       completion_tokens=int(head.group(4)), jax_platform=head.group(5),
                       torch_threads=int(head.group(6)))
    figures.update(speeds(text, ours="medix_jax update step", peer="transformers fwd+bwd"))
    flops = re.search(r"([\d.]+) TFLOP per step \(XLA cost analysis\) -> ([\d.]+) GFLOP/s = ([\d.]+)% of the "
                      r"measured matmul peak ([\d.]+) GFLOP/s", text)
    if flops:
        figures.update(tflop_per_step=float(flops.group(1)), achieved_gflop_s=float(flops.group(2)),
                       mfu=float(flops.group(3)) / 100, matmul_peak_gflop_s=float(flops.group(4)))
    ratio = re.search(r"ratio \(ours / peer\)\s*:\s*([\d.]+)x", text)
    if ratio:
        figures["ratio"] = float(ratio.group(1))
    return figures


def parse_grpo(text: str, run_dir: Path = RUN_DIR) -> dict:
    """The run's held-out results (``run_dir/results.json``) and step times from ``metrics.jsonl``."""
    figures: dict = {"run_dir": str(run_dir)}
    announce = re.search(r"medix_jax\.train: run .*?, (\d+) (\w+) device\(s\)", text)
    if announce:
        figures.update(devices=int(announce.group(1)), jax_platform=announce.group(2))
    results = run_dir / "results.json"
    if results.exists():
        figures["results"] = json.loads(results.read_text())
    else:  # the run stopped after an evaluation but before its end (results.json is written last)
        for path in sorted((run_dir / "eval").glob("step_*/results.json")):
            figures.setdefault("evaluations", {})[path.parent.name] = json.loads(path.read_text()).get("tasks")
    metrics = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()] if metrics.exists() else []
    figures["steps_logged"] = len(rows)
    for stage, part in (("sft", [r for r in rows if "sft_tokens" in r]), ("grpo", [r for r in rows if "sft_tokens"
                                                                                   not in r])):
        figures[f"{stage}_steps_logged"] = len(part)
        if part:
            figures[f"{stage}_first_step_seconds"] = part[0].get("step_seconds")
        for key in ("step_seconds", "update_seconds", "tokens_per_second"):
            values = [r[key] for r in part[1:] if isinstance(r.get(key), (int, float))]  # after the compiling step
            if values:
                figures[f"{stage}_median_{key}"] = round(statistics.median(values), 4)
    done = re.search(r"medix_jax\.train: done, (\d+) steps", text)
    figures["finished_steps"] = int(done.group(1)) if done else None
    return figures


PARSERS = {"env": parse_env, "tests": parse_tests, "bench_sampler": parse_bench_sampler,
           "bench_train": parse_bench_train, "grpo": lambda text: parse_grpo(text)}


# ---------------------------------------------------------------------------------------------------------------
# the env stage's probe (runs in the stage's subprocess)


def probe_env() -> int:
    """Print ``ENV {json}``: python, jax, backend, devices, package versions; on GPU a cuDNN-attention check."""
    import importlib.metadata as metadata

    info: dict = dict(python=sys.version.split()[0], executable=sys.executable, host=socket.gethostname(),
                      cpus=os.cpu_count(), jax_platforms_env=os.environ.get("JAX_PLATFORMS"))
    info["packages"] = {}
    for name in PACKAGES:
        try:
            info["packages"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["packages"][name] = None
    info["missing"] = [name for name in NEEDED if info["packages"][name] is None]
    import jax
    import jax.numpy as jnp

    devices = jax.devices()
    info.update(jax=jax.__version__, jaxlib=metadata.version("jaxlib"), backend=jax.default_backend(),
                device_count=len(devices), device_kinds=sorted({d.device_kind for d in devices}),
                devices=[str(d) for d in devices[:8]], platform_version=devices[0].client.platform_version)
    stats = devices[0].memory_stats() or {}
    info["memory_gib"] = round(stats["bytes_limit"] / 2**30, 2) if "bytes_limit" in stats else None
    x = jnp.arange(256 * 256, dtype=jnp.float32).reshape(256, 256) / 65536
    info["matmul_ok"] = bool(jnp.allclose(x @ jnp.eye(256), x))
    if info["backend"] == "gpu":
        info["cudnn_attention"] = probe_cudnn()
    print("ENV " + json.dumps(info), flush=True)
    return 0


def probe_cudnn(implementation: str = "cudnn") -> dict:
    """medix_jax's cuDNN attention (bf16, left and right padding) against its xla attention in float32."""
    try:
        import jax
        import jax.numpy as jnp
        import numpy as np

        from medix_jax.models import attention as attn

        rng = np.random.default_rng(0)
        b, t, h, kh, d = 2, 256, 4, 2, 64
        q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32) for s in [(b, t, h, d), (b, t, kh, d),
                                                                             (b, t, kh, d)])
        ids = np.zeros((b, t), np.int32)
        ids[0, 10:200], ids[1, :] = 1, 2  # left and right padding; a full row
        ids = jnp.asarray(ids)
        ref = attn.attention(q, k, v, ids, ids, causal=True, implementation="xla")
        half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
        got = jax.jit(lambda q, k, v: attn.attention(q, k, v, ids, ids, causal=True, contiguous=True,
                                                     implementation=implementation))(*half)
        real = np.asarray(ids) != 0
        err = np.abs(np.asarray(got, np.float32) - np.asarray(ref))[real]
        return dict(ok=bool(err.max() < 5e-2), max_abs_err=float(err.max()), mean_abs_err=float(err.mean()))
    except Exception as e:  # recorded, not fatal: the env stage still reports the rest
        return dict(ok=False, error=f"{type(e).__name__}: {e}"[:2000])


# ---------------------------------------------------------------------------------------------------------------
# the driver


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def env_problem(record: dict, platform: str, allow_cpu: bool) -> str | None:
    """Why the run stops after the env stage, or None."""
    if record["status"] != "ok":
        return f"the env stage {record['status']} (exit {record['returncode']}): jax could not start; see env.log"
    backend = record["figures"].get("backend")
    if backend is None:
        return "the env stage printed no ENV line; see env.log"
    if backend != platform and not allow_cpu:
        return (f"jax's default backend is {backend!r}, not {platform!r}: no accelerator (JAX_PLATFORMS="
                f"{JAX_PLATFORMS[platform]}); --allow-cpu runs the stages anyway")
    return None


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="accelerator_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", choices=sorted(JAX_PLATFORMS), default="gpu", help="the accelerator")
    parser.add_argument("--out", help="output folder (default: $OUT if set, else runs/accelerator_check)")
    parser.add_argument("--only", help="comma-separated stages to run, e.g. env,tests")
    parser.add_argument("--dry-run", action="store_true", help="print the stages' commands and limits; run nothing")
    parser.add_argument("--allow-cpu", action="store_true", help="run even when jax's backend is the CPU")
    parser.add_argument("--probe", choices=["env"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe == "env":
        return probe_env()
    out = Path(args.out or os.environ.get("OUT") or ROOT / "runs" / "accelerator_check")
    plan = stages(sys.executable, args.platform, args.allow_cpu)
    names = [s.name for s in plan]
    only = [x.strip() for x in args.only.split(",") if x.strip()] if args.only else names
    unknown = [x for x in only if x not in names]
    if unknown:
        print(f"accelerator_check: unknown stage(s) {', '.join(unknown)}; stages: {', '.join(names)}", file=sys.stderr)
        return 2
    plan = [s for s in plan if s.name in only]
    if args.dry_run:
        print(f"accelerator check (dry run): platform {args.platform}, out {out}, {len(plan)} stages, "
              f"{sum(s.timeout_s for s in plan)} s in all")
        for s in plan:
            env = " ".join(f"{k}={shlex.quote(v)}" for k, v in s.env.items())
            print(f"  {s.name:<14}{s.timeout_s:>4} s  {env + ' ' if env else ''}{shlex.join(s.argv)}")
        print("  (a stage may also use the time that the stages before it left unused)")
        return 0
    return run_all(plan, out, args)


def run_all(plan: list[Stage], out: Path, args) -> int:
    """Run the stages in order, rewriting ``out/check.json`` after each; 0 when every stage passed."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict = dict(check="medix_jax accelerator check", platform=args.platform, allow_cpu=args.allow_cpu,
                        started=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                        git_commit=git_commit(), host=socket.gethostname(), python=sys.executable,
                        budget_s=sum(s.timeout_s for s in plan), stages=[], stopped=None)
    start, budget = time.perf_counter(), 0
    for stage in plan:
        if stage.name == "grpo":
            shutil.rmtree(RUN_DIR, ignore_errors=True)  # a fresh run (a finished one only says where it ended)
        budget += stage.timeout_s  # stage i ends by the sum of the limits so far: time left unused carries over
        record = run_stage(stage, out, max(1.0, budget - (time.perf_counter() - start)))
        report["stages"].append(record)
        report["seconds"] = round(time.perf_counter() - start, 1)
        print(summary(record), flush=True)
        if stage.name == "env":
            report["stopped"] = env_problem(record, args.platform, args.allow_cpu)
        write(out, report)
        if report["stopped"]:
            print(f"accelerator_check: stopped: {report['stopped']}", file=sys.stderr)
            break
    report["ok"] = not report["stopped"] and all(r["status"] == "ok" for r in report["stages"])
    write(out, report)
    print(f"accelerator_check: {'ok' if report['ok'] else 'NOT ok'} in {report['seconds']} s; {out / 'check.json'}")
    return 0 if report["ok"] else 1


def write(out: Path, report: dict) -> None:
    tmp = out / "check.json.tmp"
    tmp.write_text(json.dumps(report, indent=1) + "\n")
    tmp.replace(out / "check.json")


def summary(record: dict) -> str:
    """One line: the stage, its status and time, and its headline figures."""
    f = record["figures"]
    keys = {"env": ("backend", "device_count", "device_kinds", "jax"),
            "tests": ("passed", "failed", "skipped", "errors"),
            "bench_sampler": ("ours_tok_s", "peer_tok_s", "ratio", "token_agreement"),
            "bench_train": ("ours_tok_s", "peer_tok_s", "ratio", "mfu"),
            "grpo": ("finished_steps", "grpo_median_step_seconds")}[record["name"]]
    shown = ", ".join(f"{k} {f[k]}" for k in keys if f.get(k) is not None)
    if record["name"] == "grpo" and "results" in f:
        after = f["results"].get("after GRPO") or {}
        shown += f", held-out accuracy {after.get('accuracy')}"
    return (f"[{record['name']}] {record['status']} (exit {record['returncode']}) in {record['seconds']} s of "
            f"{record['limit_s']}" + (f": {shown}" if shown else ""))


if __name__ == "__main__":
    sys.exit(main())
