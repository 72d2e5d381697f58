"""``python -m medix_jax.bench learn``: the embedded default run (configs/tiny.yaml) at several seeds and device
counts, each as a user runs it (its own process), and a table of what it learned on the held-out split.

Per run: accuracy after the supervised cold start and after GRPO, the modality tag after GRPO, the wall time, and
the cold start's **perception** -- the share of held-out traces whose lesion colour is right (the synthetic data's
trace names the colour that identifies the answer, ``data.synthetic.COLOUR_NAMES``). GRPO can only learn answers
the policy can see: a cold start that tells two colours apart but not four caps accuracy near 50 %, whatever GRPO
does. A run passes with accuracy >= ``TARGETS["accuracy"]`` and modality >= ``TARGETS["modality"]`` after GRPO,
within ``TARGETS["minutes"]`` (docs/development.md#learning-bench-learn).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

TARGETS = {"accuracy": 0.65, "modality": 0.90, "minutes": 5.0}


def seed_list(text: str) -> list[int]:
    """``"0-4"`` -> [0, 1, 2, 3, 4]; ``"0,2,7"`` -> [0, 2, 7]."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            first, _, last = part.partition("-")
            seeds += range(int(first), int(last or first) + 1)
    except ValueError:
        seeds = []
    if not seeds:
        raise ValueError(f"--seeds {text!r}: give seeds like 0-4 or 0,2,7")
    return seeds


def perception(run_dir: Path, step: int) -> float | None:
    """The share of held-out generations at ``step`` whose trace names the lesion's colour right (None: no cache)."""
    from medix_jax.data.synthetic import COLOUR_NAMES

    cache = run_dir / "eval" / f"step_{step}" / "cache" / "held_out.jsonl"
    truth_file = run_dir / "eval" / "truth.json"
    if not cache.is_file() or not truth_file.is_file():
        return None
    truth = json.loads(truth_file.read_text())
    rows = [r for r in map(json.loads, cache.read_text().splitlines()) if r.get("generation") is not None]
    right = sum(f"{COLOUR_NAMES[truth[r['id']]]} lesion" in r["generation"] for r in rows if r["id"] in truth)
    return right / len(rows) if rows else None


def write_truth(run_dir: Path) -> None:
    """The held-out answers by id (the prepared test split), for ``perception``."""
    import pyarrow.parquet as pq

    source = next((run_dir / "data" / "source").rglob("test-*.parquet"))
    records = pq.read_table(source, columns=["id", "solution"]).to_pylist()
    truth = {r["id"]: r["solution"].split(">", 1)[1].strip() for r in records}
    (run_dir / "eval" / "truth.json").write_text(json.dumps(truth))


def run_one(out: Path, seed: int, devices: int, overrides: list[str]) -> dict:
    run_dir = out / f"seed{seed}-devices{devices}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}
    log = run_dir.with_suffix(".log")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with log.open("w") as sink:
        done = subprocess.run([sys.executable, "-m", "medix_jax.train", f"seed={seed}", f"train.run_dir={run_dir}",
                               "train.export_hf=false", *overrides], env=env, stdout=sink, stderr=subprocess.STDOUT)
    minutes = (time.perf_counter() - start) / 60
    if done.returncode:
        return {"seed": seed, "devices": devices, "error": f"exit {done.returncode}; see {log}", "minutes": minutes}
    results = json.loads((run_dir / "results.json").read_text())
    sft, grpo = results["after SFT"], results["after GRPO"]
    write_truth(run_dir)
    return {"seed": seed, "devices": devices, "minutes": minutes, "sft_accuracy": sft["accuracy"],
            "sft_perception": perception(run_dir, sft["step"]), "accuracy": grpo["accuracy"],
            "modality": grpo["modality"], "perception": perception(run_dir, grpo["step"])}


def passes(row: dict) -> bool:
    return ("error" not in row and row["accuracy"] >= TARGETS["accuracy"] and row["modality"] >= TARGETS["modality"]
            and row["minutes"] <= TARGETS["minutes"])


def table(rows: list[dict]) -> str:
    pct = lambda v: "–" if v is None else f"{100 * v:.1f}"  # noqa: E731
    lines = ["| seed | devices | SFT accuracy | SFT perception | GRPO accuracy | GRPO modality | GRPO perception "
             "| minutes | pass |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['seed']} | {r['devices']} | {r['error']} | | | | | {r['minutes']:.1f} | no |")
            continue
        lines.append(f"| {r['seed']} | {r['devices']} | {pct(r['sft_accuracy'])} | {pct(r['sft_perception'])} | "
                     f"{pct(r['accuracy'])} | {pct(r['modality'])} | {pct(r['perception'])} | {r['minutes']:.1f} | "
                     f"{'yes' if passes(r) else 'no'} |")
    return "\n".join(lines)


def bench_learn(seeds: list[int], devices: list[int], out: str, overrides: list[str]) -> int:
    """Run every (seed, device count) in turn, print the table after each; exit status 1 when any run fails its
    targets."""
    rows = []
    for count in devices:
        for seed in seeds:
            rows.append(run_one(Path(out), seed, count, overrides))
            print(table(rows[-1:]).splitlines()[-1], flush=True)
    print(f"\nheld-out split, after the default run (targets: accuracy >= {100 * TARGETS['accuracy']:.0f} %, modality "
          f">= {100 * TARGETS['modality']:.0f} %, <= {TARGETS['minutes']:g} minutes each)\n")
    print(table(rows))
    (Path(out) / "learn.json").write_text(json.dumps(rows, indent=1))
    return 0 if all(passes(r) for r in rows) else 1


def learn_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,2,7")
    parser.add_argument("--devices", default="1", help="simulated CPU device counts, e.g. 1 or 1,8")
    parser.add_argument("--out", default="runs/learn", help="directory of the runs, their logs and learn.json")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")


def run_learn(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        seeds, devices = seed_list(args.seeds), [int(d) for d in args.devices.split(",")]
    except ValueError as e:
        parser.error(str(e))
    return bench_learn(seeds, devices, args.out, args.overrides)
