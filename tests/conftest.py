"""Shared fixtures. 8 simulated CPU devices for mesh tests (must be set before jax is imported); no hub access."""

import os

from tests.support.xla_flags import PATIENT_COLLECTIVES, cpu_devices

os.environ.setdefault("XLA_FLAGS", cpu_devices(8))
if "terminate_timeout" not in os.environ["XLA_FLAGS"]:  # a developer's own XLA_FLAGS: keep them, add the patience
    os.environ["XLA_FLAGS"] += " " + PATIENT_COLLECTIVES
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # libtpu compiles only; another process may hold its lock

import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.support.helpers import make_tiny_hf_model  # noqa: E402


@pytest.fixture(scope="session", params=[False, True], ids=["untied", "tied"])
def tiny_checkpoint(request, tmp_path_factory):
    """(transformers model, checkpoint dir) of a tiny random Qwen2.5-VL, untied and tied."""
    model = make_tiny_hf_model(tied=request.param)
    path = tmp_path_factory.mktemp("tied" if request.param else "untied")
    model.save_pretrained(path)
    return model, path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory):
    """A training run of the embedded default: 2 steps of the letter reward, a checkpoint at each (subprocess)."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    args = [f"train.run_dir={run_dir}", "train.steps=2", "train.save_every=1", "train.export_hf=false",
            "rollout.max_new_tokens=8", "rewards.embedding_on=false", "mesh.fsdp=1"]
    out = subprocess.run([sys.executable, "-m", "tests.support.letter_reward", *args], cwd=Path(__file__).parent.parent,
                         capture_output=True, text=True, timeout=600, env={**os.environ, "XLA_FLAGS": ""})
    assert out.returncode == 0, out.stdout + out.stderr
    return run_dir
