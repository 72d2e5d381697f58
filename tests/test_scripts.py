"""Launch scripts: shellcheck-clean, and their --dry-run prints the exact cloud commands for the arguments given."""

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
