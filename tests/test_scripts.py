"""Launch scripts: shellcheck-clean, and their --dry-run prints the exact cloud commands for the arguments given."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = sorted(ROOT.glob("scripts/**/*.sh")) + [ROOT / ".ci" / "run"]
POD = ROOT / "scripts" / "tpu" / "pod.sh"


def test_scripts_pass_shellcheck():
    shellcheck = Path(sys.executable).with_name("shellcheck")
    out = subprocess.run([str(shellcheck), *map(str, SCRIPTS)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def pod(*args, env=None):
    return subprocess.run(["bash", str(POD), *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, **(env or {})})


def commands(out):
    return [shlex.split(line) for line in out.stdout.splitlines()]


def test_create_setup_launch_logs_delete_dry_run():
    base = ["--name", "medix", "--zone", "us-east5-a", "--project", "p", "--dry-run"]
    (create,) = commands(pod("create", *base, "--type", "v5p-64", "--spot"))
    assert create == ["gcloud", "compute", "tpus", "tpu-vm", "create", "medix", "--zone=us-east5-a", "--project=p",
                      "--accelerator-type=v5p-64", "--version=v2-alpha-tpuv5", "--spot"]
    (create,) = commands(pod("create", *base, "--type", "v6e-64"))
    assert "--version=v2-alpha-tpuv6e" in create and "--spot" not in create
    archive, scp, ssh = commands(pod("setup", *base))
    assert archive[:2] == ["git", "archive"] and scp[4] == "scp" and "--worker=all" in scp
    assert "scripts/setup.sh" in ssh[-1] and "MEDIX_EXTRAS=tpu" in ssh[-1]
    (launch,) = commands(pod("launch", *base, "--", "--config", "configs/qwen2_5_vl_3b_grpo.yaml",
                             "rewards.judge.url=http://10.0.0.2:8000/v1", "train.run_dir=runs/a b"))
    assert "--worker=all" in launch
    remote = launch[-1].removeprefix("--command=")
    assert "python -m medix_jax.train" in remote and remote.endswith("> train.log 2>&1 &")
    assert shlex.split(remote.split("medix_jax.train", 1)[1].split(">")[0]) == [
        "--config", "configs/qwen2_5_vl_3b_grpo.yaml", "rewards.judge.url=http://10.0.0.2:8000/v1",
        "train.run_dir=runs/a b"]  # every argument arrives intact, spaces included
    (logs,) = commands(pod("logs", *base, "--worker", "3"))
    assert "--worker=3" in logs and "train.log" in logs[-1]
    (delete,) = commands(pod("delete", *base))
    assert delete[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "delete"] and delete[-1] == "--quiet"


@pytest.mark.parametrize("args, message", [
    (["create", "--zone", "z", "--type", "v5p-8"], "--name is required"),
    (["create", "--name", "n", "--type", "v5p-8"], "--zone is required"),
    (["create", "--name", "n", "--zone", "z"], "create needs --type"),
    (["create", "--name", "n", "--zone", "z", "--type", "a100-8"], "must be a v5p-N or v6e-N"),
    (["launch", "--name", "n", "--zone", "z"], "launch needs training arguments"),
    (["resize", "--name", "n", "--zone", "z"], "unknown action"),
    (["create", "--name", "n", "--zone", "z", "--bogus"], "unknown argument"),
])
def test_bad_arguments_are_refused(args, message):
    out = pod(*args, "--dry-run")
    assert out.returncode == 2 and message in out.stderr and not out.stdout.strip()


def test_gpu_multinode_launcher():
    script = ROOT / "scripts" / "gpu" / "launch_multinode.sh"
    env = {**os.environ, "MEDIX_NUM_PROCESSES": "2", "MEDIX_COORDINATOR_ADDRESS": "node0:12355"}
    env.pop("SLURM_JOB_ID", None)
    missing = subprocess.run(["bash", str(script), "--dry-run", "--config", "c.yaml"], capture_output=True,
                             text=True, env=env)
    assert missing.returncode != 0 and "MEDIX_PROCESS_ID" in missing.stderr
    ok = subprocess.run(["bash", str(script), "--dry-run", "--config", "c.yaml", "mesh.dcn_data=2"],
                        capture_output=True, text=True, env={**env, "MEDIX_PROCESS_ID": "1"})
    assert shlex.split(ok.stdout) == [".venv/bin/python", "-m", "medix_jax.train", "--config", "c.yaml",
                                      "mesh.dcn_data=2"]


# -- the accelerator check (issue 30): scripts/{gpu,tpu}/check.sh -> scripts/accelerator_check.py --

CHECK = ROOT / "scripts" / "gpu" / "check.sh"
CHECK_TPU = ROOT / "scripts" / "tpu" / "check.sh"
STAGES = ["env", "tests", "bench_sampler", "bench_train", "grpo"]


def check(*args, script=CHECK):
    return subprocess.run(["bash", str(script), *args], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHON": sys.executable})


def test_accelerator_check_scripts_pass_shellcheck():
    assert {CHECK, CHECK_TPU} <= set(SCRIPTS)
    out = subprocess.run([str(Path(sys.executable).with_name("shellcheck")), str(CHECK), str(CHECK_TPU)],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("script, platforms", [(CHECK, "cuda,cpu"), (CHECK_TPU, "tpu,cpu")], ids=["gpu", "tpu"])
def test_accelerator_check_dry_run_lists_five_stages_within_8_minutes(tmp_path, script, platforms):
    out = check("--dry-run", "--out", str(tmp_path / "out"), script=script)
    assert out.returncode == 0, out.stdout + out.stderr
    rows = [line.split(None, 3) for line in out.stdout.splitlines() if line.startswith("  ") and " s  " in line]
    assert [row[0] for row in rows] == STAGES
    assert sum(int(row[1]) for row in rows) <= 480 and all(int(row[1]) > 0 for row in rows)
    commands = {row[0]: row[3] for row in rows}
    assert all(f"JAX_PLATFORMS={platforms}" in c for c in commands.values())
    assert "-n 0" in commands["tests"] and "addopts=" in commands["tests"] and "test_attention.py" in commands["tests"]
    assert "medix_jax.bench sampler" in commands["bench_sampler"] and "medix_jax.bench train" in commands["bench_train"]
    assert "medix_jax.train" in commands["grpo"] and "train.export_hf=false" in commands["grpo"]
    assert not (tmp_path / "out").exists()  # a dry run runs and writes nothing


def test_accelerator_check_env_stage_on_cpu(tmp_path):
    """--allow-cpu --only env: the real env stage on this CPU, recorded in check.json; without --allow-cpu a CPU
    backend stops the run with a clear message."""
    out = check("--allow-cpu", "--only", "env", "--out", str(tmp_path))
    assert out.returncode == 0, out.stdout + out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["check.json", "env.log"]
    report = json.loads((tmp_path / "check.json").read_text())
    (env,) = report["stages"]
    assert report["ok"] and env["name"] == "env" and env["status"] == "ok" and env["returncode"] == 0, report
    assert env["figures"]["backend"] == "cpu" and env["figures"]["jax"] and env["figures"]["matmul_ok"]
    assert env["seconds"] <= env["limit_s"] and "[env] ok" in out.stdout
    refused = check("--only", "env", "--out", str(tmp_path / "refused"))
    report = json.loads((tmp_path / "refused" / "check.json").read_text())
    assert refused.returncode == 1 and "not 'gpu'" in refused.stderr and not report["ok"] and report["stopped"]


def test_accelerator_check_parses_the_benchmarks_lines(monkeypatch):
    spec = importlib.util.spec_from_file_location("accelerator_check", ROOT / "scripts" / "accelerator_check.py")
    driver = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, driver)  # its dataclass looks its module up
    spec.loader.exec_module(driver)
    sampler = driver.parse_bench_sampler(
        "bench sampler: 58.3M params, batch 8 x 290 prompt tokens (448x448 image each), 128 new tokens, greedy; jax on "
        "gpu (one device), torch 16 threads\n"
        "  medix_jax sampler      :   2166.5 tokens/s  (median of 2: 0.48s, 0.47s)\n"
        "  transformers generate  :     10.3 tokens/s  (median of 2: 126.48s, 75.77s)\n"
        "  ratio (ours / peer)    : 210.20x   greedy token agreement 99.5%\n")
    assert sampler["ours_tok_s"] == 2166.5 and sampler["peer_tok_s"] == 10.3 and sampler["ratio"] == 210.2
    assert sampler["token_agreement"] == 0.995 and sampler["jax_platform"] == "gpu" and len(sampler["lines"]) == 4
    assert sampler["layout"] == "one device" and sampler["torch_threads"] == 16
    train = driver.parse_bench_train(
        "bench train: 58.3M params, batch 8 x (290 prompt + 128 completion) tokens, one 448x448 image each, G=1; "
        "jax on gpu, torch 16 threads\n  medix_jax update step  :    125.9 tokens/s  (median of 2: 26.03s, 27.09s); "
        "1.79 TFLOP per step (XLA cost analysis) -> 67.2 GFLOP/s = 38.7% of the measured matmul peak 173.6 GFLOP/s\n"
        "  transformers fwd+bwd   :     75.0 tokens/s  (median of 2: 49.33s, 39.82s)\n"
        "  ratio (ours / peer)    : 1.68x\n")
    assert train["ours_tok_s"] == 125.9 and train["mfu"] == 0.387 and train["ratio"] == 1.68
    assert train["ours_times_s"] == [26.03, 27.09] and train["matmul_peak_gflop_s"] == 173.6
    tests = driver.parse_tests("FAILED tests/test_x.py::test_a - AssertionError\n"
                               "==== 1 failed, 46 passed, 2 skipped, 6 deselected in 119.15s (0:01:59) ====\n")
    assert (tests["passed"], tests["failed"], tests["skipped"], tests["pytest_seconds"]) == (46, 1, 2, 119.15)
    assert tests["failures"] == ["FAILED tests/test_x.py::test_a - AssertionError"]
    cut_short = driver.parse_tests("........F..s...... [ 30%]\n....E.\n")  # killed: no summary line
    assert (cut_short["passed"], cut_short["failed"], cut_short["skipped"], cut_short["errors"]) == (21, 1, 1, 1)
    assert cut_short["partial"]
