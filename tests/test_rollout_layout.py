"""The sampler's own layout (``rollout.mesh``, issue 30): the weights' copy is resharded once per update to replicas x
tensor parallelism, so that the compiled decode loop gathers no weight on every step, and the samples are the ones
the trainer's layout gives."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx

from medix_jax import comms, parallel
from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import RolloutMesh, SamplingConfig
from medix_jax.models.qwen_vl import init_model, preset
from medix_jax.rl import grpo
from medix_jax.rl.programs import StepPrograms
from tests.support.helpers import left_pad, tokens_for
from tests.support.weights import spread_weights

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.yaml", "data.batch_size=8", "rollout.max_new_tokens=8",
        "buckets.prompt_lengths=[64]", "buckets.rows_per_image=[64]", "--only", "prefill,decode,round"]
ROLLOUT_MESH = "rollout.mesh={data: -1, tensor: 2}"


def decode_hlo(tmp_path, topology: str, *overrides: str, program: str = "decode") -> str:
    """The optimized HLO of the static decode (or ``program``) that ``plan`` compiles for ``topology``
    (``--dump-hlo``); the continuous sampler's round is compiled beside it."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-m", "medix_jax.plan", *TINY, "--topology", topology, "--dump-hlo",
                          str(tmp_path), "--json", str(tmp_path / "plan.json"), *overrides], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env={**env, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 0, out.stdout + out.stderr
    return (tmp_path / f"{program}.hlo.txt").read_text()


@pytest.mark.slow
def test_decode_gathers_no_weight_inside_its_loop_on_the_rollout_layout_8_cpu_devices(tmp_path):
    """fsdp 4 x tensor 2 on 8 CPU devices, scanned layers (the CPU compiler hoists an unrolled model's gathers out
    of the decode loop; the TPU compiler does not: the next test). Today's layout gathers the fsdp-split weights in
    the layer loop on every token step; the rollout layout (4 replicas x tensor 2) gathers none."""
    settings = ("mesh.fsdp=4", "mesh.tensor=2", "model.scan_layers=true")
    trainer_layout = decode_hlo(tmp_path / "trainer", "cpu:8", *settings)
    assert len(comms.loop_invariant_gathers(trainer_layout)) >= 7  # q, k, v, o, gate, up, down of the layer stack
    rollout_layout = decode_hlo(tmp_path / "rollout", "cpu:8", *settings, ROLLOUT_MESH)
    assert comms.loop_invariant_gathers(rollout_layout) == []
    found, _ = comms.collectives(rollout_layout, 8, while_trips=8)
    assert {c.kind for c in found if c.in_loop} <= {"all-reduce", "all-gather"}  # tensor parallelism's sums
    gathered = sum(c.bytes for c in found if c.kind == "all-gather")
    before = sum(c.bytes for c in comms.collectives(trainer_layout, 8, while_trips=8)[0] if c.kind == "all-gather")
    assert gathered < before / 50, (gathered, before)
    # the continuous sampler's decode round (the default sampler) alike
    assert len(comms.loop_invariant_gathers((tmp_path / "trainer" / "round.hlo.txt").read_text())) >= 7
    assert comms.loop_invariant_gathers((tmp_path / "rollout" / "round.hlo.txt").read_text()) == []


@pytest.mark.slow
def test_decode_gathers_no_weight_inside_its_loop_on_the_rollout_layout_tpu_compiler(tmp_path):
    """The same on the TPU compiler (v5p-8: 4 chips, fsdp 2 x tensor 2, unrolled layers), which keeps every gather
    of the trainer's layout inside the decode loop; plan's communication figure falls with it."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: MEDIX_EXTRAS=tpu bash scripts/setup.sh")
    settings = ("mesh.fsdp=2", "mesh.tensor=2")
    assert len(comms.loop_invariant_gathers(decode_hlo(tmp_path / "trainer", "v5p-8", *settings))) >= 7
    before = json.loads((tmp_path / "trainer" / "plan.json").read_text())["programs"]["decode"]["communication"]
    assert comms.loop_invariant_gathers(decode_hlo(tmp_path / "rollout", "v5p-8", *settings, ROLLOUT_MESH)) == []
    after = json.loads((tmp_path / "rollout" / "plan.json").read_text())["programs"]["decode"]["communication"]
    assert after["by_kind"].get("all-gather", {}).get("bytes", 0) < before["by_kind"]["all-gather"]["bytes"] / 10
    # the continuous sampler's round too: with its logits pinned whole over the vocabulary, the TPU compiler
    # gathered the output projection on every step, even on the rollout layout
    assert len(comms.loop_invariant_gathers((tmp_path / "trainer" / "round.hlo.txt").read_text())) >= 7
    assert comms.loop_invariant_gathers((tmp_path / "rollout" / "round.hlo.txt").read_text()) == []


def spread_model(name: str, mesh):
    """A tiny random model with O(1) logits, its parameters in ``mesh``'s layout."""
    graphdef, params, rest = nnx.split(spread_weights(init_model(preset(name), seed=0), seed=1), nnx.Param, ...)
    shardings = parallel.param_shardings(params, mesh)
    flat = nnx.to_flat_state(params)
    for path, var in flat:
        var.set_value(jax.device_put(var.get_value(), shardings[path]))
    return nnx.merge(graphdef, nnx.from_flat_state(flat), rest)


def text_prompts(rng, cfg, rows: int = 8):
    ids, mask = left_pad([tokens_for([int(rng.integers(3, 20))], [], rng) for _ in range(rows)])
    return prepare_prompts(cfg, ids, mask, None, np.zeros((0, 3), np.int64), Buckets(prompt_lengths=(32,)))


REPLICAS, EXPERTS = RolloutMesh(tensor=2), RolloutMesh(data=2, fsdp=4)


@pytest.mark.parametrize("name, batching, layout", [
    ("tiny", "continuous", REPLICAS), pytest.param("tiny", "static", REPLICAS, marks=pytest.mark.slow),
    ("qwen3_vl_moe_tiny", "continuous", EXPERTS),
    pytest.param("qwen3_vl_moe_tiny", "static", EXPERTS, marks=pytest.mark.slow),
    pytest.param("qwen3_vl_moe_tiny", "continuous", REPLICAS, marks=pytest.mark.slow)])
def test_the_rollout_layout_samples_what_the_trainers_layout_samples(rng, name, batching, layout):
    """Greedy tokens equal and log-probabilities within 1e-5, 8 CPU devices: the trainer's fsdp 4 x tensor 2 layout
    against its copy resharded (``StepPrograms.cast``) to 4 replicas x tensor 2 (the experts of the mixture whole
    in each replica), or to 2 replicas of 4 expert-parallel chips (each holding a quarter of the experts, every
    other weight whole)."""
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    model = spread_model(name, mesh)
    prompts = text_prompts(rng, model.config)
    sampling = SamplingConfig(max_new_tokens=10, temperature=0.0, num_samples=2, batching=batching)
    expected = Sampler(sampling, mesh).generate(model, prompts, jax.random.key(0))

    graphdef, params = nnx.split(model, nnx.Param)
    laid_out = SamplingConfig(**{**sampling.__dict__, "mesh": layout})
    programs = StepPrograms(graphdef, params, mesh, micro_batches=1, loss=grpo.LossConfig(), rollout=laid_out,
                            tx=optax.sgd(1e-3))
    copy = programs.cast(params)
    sizes = dict(programs.rollout_mesh.shape)
    assert sizes == {"data": 4, "fsdp": 1, "tensor": 2} if layout == REPLICAS else {"data": 2, "fsdp": 4, "tensor": 1}
    layer = copy["model"]["layers"][0]
    kernel = layer["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor" if sizes["tensor"] > 1 else None)
    if name != "tiny":  # the experts split over fsdp: a quarter of them on each chip, or all of them
        experts = layer["mlp"]["experts"]["gate_up_proj"]
        assert experts.addressable_shards[0].data.shape[0] == experts.shape[0] // sizes["fsdp"]
    out = Sampler(laid_out, programs.rollout_mesh).generate(nnx.merge(graphdef, copy), prompts, jax.random.key(0))
    rows = sizes["data"] * sizes["fsdp"]
    assert len({s.index[0].start for s in out.tokens.addressable_shards}) == rows  # rows split over the batch axes
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    assert len(np.unique(np.asarray(expected.tokens))) > 3  # the tokens follow the prompts
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)


def test_rollout_mesh_regroups_the_trainers_devices_in_order():
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    regrouped = parallel.rollout_mesh(mesh, {"data": -1, "tensor": 4})
    assert dict(regrouped.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert list(regrouped.devices.flat) == list(mesh.devices.flat)
    assert parallel.rollout_mesh(mesh, None) is mesh
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.rollout_mesh(mesh, {"data": 4, "tensor": 4})
    with pytest.raises(ValueError, match="data / fsdp / tensor"):
        parallel.rollout_mesh(mesh, {"expert": 2})
    # a dimension the rollout's tensor axis does not divide is left whole
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("fsdp", "tensor"))
    assert parallel.respec(sharding, (8, 6), regrouped).spec == jax.sharding.PartitionSpec(None, None)
    assert parallel.respec(sharding, (8, 8), regrouped).spec == jax.sharding.PartitionSpec(None, "tensor")


def test_the_held_out_evaluation_samples_from_the_samplers_copy_on_its_layout(monkeypatch, tmp_path):
    """``HeldOut`` evaluates what rollouts sample from: the trainer's ``rollout_model`` (the cast copy) on
    ``programs.rollout_mesh``, not the parameters on the trainer's FSDP layout."""
    from types import SimpleNamespace

    from medix_jax import evaluate
    from medix_jax.config import Config
    from medix_jax.train import HeldOut

    seen = {}

    class Recorder:
        def __init__(self, model, *args, mesh=None):
            seen.update(model=model, mesh=mesh)

    monkeypatch.setattr(evaluate, "SamplerGenerator", Recorder)
    monkeypatch.setattr(evaluate, "evaluate", lambda tasks, *a, **k: {"tasks": {tasks[0].name: {}}})
    config = Config()
    held = HeldOut(dataclasses.replace(config, eval=dataclasses.replace(config.eval, split=None)), tmp_path,
                   tokenizer=None, pool=None)  # no split: nothing read; the task is set below
    held.task, held.points, held.samples = SimpleNamespace(name="held-out"), [("after GRPO", 3)], 1
    copy, sampler_mesh = object(), parallel.make_mesh({"data": -1})
    trainer = SimpleNamespace(step_count=3, model="the trainer's parameters", rollout_model=copy,
                              programs=SimpleNamespace(rollout_mesh=sampler_mesh))
    held.catch_up(trainer)
    assert seen["model"] is copy and seen["mesh"] is sampler_mesh
