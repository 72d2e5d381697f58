"""Several processes: meshes across slices, jax.distributed failures that end in bounded time with a message
saying what is wrong (never a hang), and two real processes training exactly like one process with all devices."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from medix_jax import parallel
from medix_jax.parallel import DistributedConfig, initialize_distributed
from tests.support.tiny_chat import free_port
from tests.support.xla_flags import cpu_devices

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


TINY_TRAINING = ["rollout.max_new_tokens=8", "train.save_every=1", "mesh.fsdp=4", "mesh.tensor=2",
                 "train.optim.learning_rate=3e-4", "train.optim.warmup_steps=0", "data.batch_size=4"]


def train_job(run_dir: Path, steps: int, devices: int, port: int | None = None, process_id: int | None = None):
    """The tiny config trained with the letter reward, in a process of its own with ``devices`` CPU devices (the
    jobs share a compilation cache beside ``run_dir``)."""
    env = {**os.environ, "XLA_FLAGS": cpu_devices(devices), "PYTHONUNBUFFERED": "1",
           "JAX_COMPILATION_CACHE_DIR": str(run_dir.parent / "xla-cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    args = [*TINY_TRAINING, f"train.run_dir={run_dir}", f"train.steps={steps}"]
    if port is not None:
        args += [f"distributed.coordinator_address=127.0.0.1:{port}", "distributed.num_processes=2",
                 f"distributed.process_id={process_id}", "distributed.timeout_s=120"]
    return subprocess.Popen([sys.executable, "-m", "tests.support.letter_reward", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def params_at(run_dir: Path, step: int) -> dict:
    from flax import nnx

    from medix_jax.export import restore_model

    model, _ = restore_model(run_dir, step)  # in this single process, whatever wrote the checkpoint
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


@pytest.mark.slow
def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    """Two real processes (jax.distributed on 127.0.0.1, 4 CPU devices each) run step 1, then resume and run step
    2; one process with 8 devices runs both steps. Same mesh, same data, same samples: same parameters. The
    residue is float summation order across processes (gloo vs in-process all-reduce), ~1e-7 of the gradients."""
    two, one = tmp_path / "two", tmp_path / "one"
    for steps in (1, 2):  # the second job resumes from the first one's checkpoint, each process at its own place
        port = free_port()
        jobs = [train_job(two, steps, 4, port, i) for i in range(2)]
        outs = [job.communicate(timeout=600)[0] for job in jobs]
        assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    assert "resumed at step 1" in outs[0] and "medix_jax.train: done, 2 steps" in outs[0]
    out, _ = train_job(one, 2, 8).communicate(timeout=600)
    assert "done, 2 steps" in out, out[-3000:]

    expected, got = params_at(one, 2), params_at(two, 2)
    moved = max(float(np.abs(expected[k] - v).max()) for k, v in params_at(one, 1).items())
    assert moved > 1e-4  # step 2 really changed the parameters ...
    assert max(float(np.abs(expected[k] - got[k]).max()) for k in expected) <= 1e-5  # ... identically
    hf_one, hf_two = (load_file(run / "hf" / "model.safetensors") for run in (one, two))  # gathered by both
    assert hf_one.keys() == hf_two.keys()
    assert max(float(np.abs(hf_one[k] - hf_two[k]).max()) for k in hf_one) <= 1e-5

    data = json.loads((two / "checkpoints" / "2" / "data" / "metadata").read_text())["processes"]
    assert [state["grain"]["next_index"] for state in data] == [4, 4]  # 2 rows of 4 prompts each, 2 steps
    rewards = [[json.loads(line)["reward_letters_mean"] for line in (run / "metrics.jsonl").read_text().splitlines()]
               for run in (one, two)]
    np.testing.assert_allclose(rewards[0], rewards[1], rtol=1e-6)  # the same completions were sampled


def test_a_checkpoint_of_two_processes_resumes_only_with_two():
    from medix_jax.train import this_process_state

    states = [{"grain": {"next_index": 4}}, {"grain": {"next_index": 6}}]
    with pytest.raises(RuntimeError, match=r"written by 2 process\(es\).*resume it with 2 \(this job has 1\)"):
        this_process_state(states, 7, Path("/runs/x/checkpoints"))
    assert this_process_state(states[:1], 7, Path("/runs/x/checkpoints")) == states[0]


def test_interleaved_processes_get_their_own_rows_and_back():
    """A mesh whose device order alternates between two processes: each holds every other pair of rows of a
    16-row batch, places them and reads them back; tensor parallelism across processes is refused by name."""
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": cpu_devices(4), "PYTHONUNBUFFERED": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "tests.support.process_rows", str(port), str(i)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [job.communicate(timeout=180) for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], outs
    seen = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert seen[0]["rows"] == [0, 1, 4, 5, 8, 9, 12, 13] and seen[1]["rows"] == [2, 3, 6, 7, 10, 11, 14, 15]
    assert all(s["in_place"] and s["round_trip"] for s in seen)
    assert all("does not give each of the 2 processes its own rows" in s["error"] for s in seen)


@pytest.mark.slow
def test_a_signal_to_one_process_stops_both_after_the_same_step(tmp_path):
    """TPU preemption or Ctrl-C may reach one host only: the other must not wait forever in the next step."""
    run = tmp_path / "run"
    port = free_port()
    jobs = [train_job(run, 200, 4, port, i) for i in range(2)]
    deadline = time.monotonic() + 600
    while not (run / "checkpoints" / "1").is_dir():
        assert time.monotonic() < deadline and all(job.poll() is None for job in jobs)
        time.sleep(0.1)
    jobs[1].send_signal(signal.SIGTERM)
    outs = [job.communicate(timeout=300)[0] for job in jobs]
    assert [job.returncode for job in jobs] == [0, 0], "\n".join(o[-3000:] for o in outs)
    saved = max(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert f"another process was signalled: saved step {saved}" in outs[0] and saved < 200
