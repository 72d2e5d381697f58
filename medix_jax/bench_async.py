"""``python -m medix_jax.bench async``: GRPO steps of the embedded default (configs/tiny.yaml, GRPO only) with the
LLM judge on, at each ``rollout.staleness`` (0: the synchronous step, the peer), each in its own process as a
user runs it, against a judge on 127.0.0.1 that answers every request after a fixed latency (``SlowJudge``: an
OpenAI-compatible chat-completions server speaking the reference prompt; the verdict cache is off, so every
non-exact answer waits for it). Prints the median step time of each, its parts and its ratio to staleness 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

WARMUP_STEPS = 3  # steps left out of the medians (compilation)


class SlowJudge:
    """A judge on 127.0.0.1 (``url``) that replies after ``latency_s``: YES when the reference prompt's prediction
    equals its ground truth (case-insensitive), NO otherwise; requests are served concurrently."""

    def __init__(self, latency_s: float):
        latency = latency_s

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                predicted, _, truth = prompt.partition("\nPredicted:")[2].rpartition("\nGround Truth:")
                time.sleep(latency)
                reply = "YES" if predicted.strip().lower() == truth.strip().lower() else "NO"
                payload = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": reply}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def run_one(out: Path, staleness: int, devices: int, steps: int, url: str, overrides: list[str]) -> dict:
    """One run's medians (seconds) after ``WARMUP_STEPS``: step, rollout (sampling), waits for rewards / the batch,
    update; and its final composite reward."""
    run_dir = out / f"staleness{staleness}-devices{devices}"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
    env = {**os.environ, "XLA_FLAGS": " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])}
    args = [sys.executable, "-m", "medix_jax.train", f"train.run_dir={run_dir}", "sft.steps=0", f"train.steps={steps}",
            f"train.save_every={steps}", "train.export_hf=false", "eval.split=null", f"rollout.staleness={staleness}",
            f"rewards.judge.url={url}", "rewards.judge.cache_size=0", *overrides]
    out.mkdir(parents=True, exist_ok=True)
    with run_dir.with_suffix(".log").open("w") as sink:
        done = subprocess.run(args, env=env, stdout=sink, stderr=subprocess.STDOUT)
    if done.returncode:
        raise RuntimeError(f"staleness {staleness}: exit {done.returncode}; see {run_dir.with_suffix('.log')}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][WARMUP_STEPS:]

    def median(key):
        return statistics.median(r.get(key, 0.0) for r in rows)

    return {"staleness": staleness, "step": median("step_seconds"), "rollout": median("rollout_seconds"),
            "reward_wait": median("reward_wait_seconds"), "batch_wait": median("rollout_wait_seconds"),
            "update": median("update_seconds"), "reward": rows[-1].get("reward_composite_mean", float("nan")),
            "steps": len(rows)}


def bench_async(stalenesses: list[int], devices: int, steps: int, latency_s: float, out: str,
                overrides: list[str]) -> list[dict]:
    judge = SlowJudge(latency_s)
    try:
        rows = [run_one(Path(out), k, devices, steps, judge.url, overrides) for k in stalenesses]
    finally:
        judge.close()
    base = rows[0]["step"]
    print(f"bench async: GRPO steps of configs/tiny.yaml on {devices} CPU device(s), judge latency {latency_s:g} s "
          f"per request (127.0.0.1, cache off); medians of {rows[0]['steps']} steps after {WARMUP_STEPS}")
    print("| staleness | step s | sampling s | reward wait s | batch wait s | update s | ratio to staleness "
          f"{stalenesses[0]} | final reward |\n|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['staleness']} | {r['step']:.3f} | {r['rollout']:.3f} | {r['reward_wait']:.3f} | "
              f"{r['batch_wait']:.3f} | {r['update']:.3f} | {r['step'] / base:.2f} | {r['reward']:.3f} |")
    return rows


def async_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--staleness", default="0,1,2", help="rollout.staleness values; the first is the baseline")
    parser.add_argument("--devices", type=int, default=8, help="simulated CPU devices")
    parser.add_argument("--steps", type=int, default=23, help="GRPO steps per run (the first 3 are not timed)")
    parser.add_argument("--latency", type=float, default=0.3, help="seconds the judge takes per request")
    parser.add_argument("--out", default="runs/bench_async", help="directory of the runs and their logs")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides for every run")


def run_async(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        stalenesses = [int(k) for k in args.staleness.split(",")]
    except ValueError:
        parser.error(f"--staleness {args.staleness!r}: give values like 0,1,2")
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than {WARMUP_STEPS}")
    bench_async(stalenesses, args.devices, args.steps, args.latency, args.out, args.overrides)
    return 0
