"""Multi-process start-up: meshes across slices, and jax.distributed failures that end in bounded time with a
message saying what is wrong (never a hang)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from medix_jax import parallel
from medix_jax.parallel import DistributedConfig, initialize_distributed
from tests.tiny_chat import free_port

ROOT = Path(__file__).resolve().parent.parent


def test_meshes_from_config():
    assert dict(parallel.make_mesh({"data": 2, "fsdp": -1, "tensor": 2}).shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="TPU slices"):  # one process, one slice: no DCN axis possible
        parallel.make_mesh({"fsdp": -1, "dcn_data": 2})
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 2})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"pipeline": 2})


def test_single_process_needs_nothing_and_bad_settings_are_errors(monkeypatch):
    for name in ("MEDIX_COORDINATOR_ADDRESS", "MEDIX_NUM_PROCESSES", "MEDIX_PROCESS_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert initialize_distributed(DistributedConfig()) is False
    with pytest.raises(ValueError, match="outside 0..1"):
        initialize_distributed(DistributedConfig("127.0.0.1:1", 2, 2))
    with pytest.raises(ValueError, match="without the process count"):
        initialize_distributed(DistributedConfig("127.0.0.1:1"))


def join(process_id: int, port: int):
    env = {**os.environ, "XLA_FLAGS": "", "PYTHONUNBUFFERED": "1"}
    args = [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
            f"distributed.process_id={process_id}", "distributed.timeout_s=5"]
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "medix_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    return out, time.monotonic() - start


def test_an_unreachable_coordinator_fails_in_bounded_time_with_a_message():
    out, seconds = join(1, free_port())
    assert out.returncode == 2 and seconds < 60
    assert "coordinator 127.0.0.1" in out.stderr and "unreachable for 5s" in out.stderr


def test_a_missing_process_fails_in_bounded_time_with_a_message():
    out, seconds = join(0, free_port())  # process 0 of 2, alone: the other never joins
    assert out.returncode != 0 and seconds < 60
    assert "process 0 of 2 joining" in out.stdout and "waiting up to 5s" in out.stdout
    assert "DEADLINE_EXCEEDED" in out.stderr
