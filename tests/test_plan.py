"""``python -m medix_jax.plan``: the FLOP counter, the fit verdict, mesh presets on real TPU topologies (libtpu's
compile-only devices, no TPU needed) and whole runs on a tiny config (subprocesses, as users run it)."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
import yaml

from medix_jax import parallel
from medix_jax.aot import Program, count_flops, verdict
from medix_jax.plan import resolve_topology

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "configs/tiny.yaml", "data.batch_size=4", "rollout.max_new_tokens=8", "model.scan_layers=true",
        "buckets.prompt_lengths=[128]", "buckets.rows_per_image=[64]"]


def topology_devices(name: str):
    """The devices of TPU topology ``name``; a skip only where libtpu is not installed (any other error fails)."""
    from jax.experimental import topologies

    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed: MEDIX_EXTRAS=tpu bash scripts/setup.sh")
    return topologies.get_topology_desc(platform="tpu", topology_name=name).devices


def plan(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.run([sys.executable, "-m", "medix_jax.plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env={**env, "JAX_PLATFORMS": "cpu"})


def test_flops_of_a_scanned_matmul_count_every_iteration():
    m, k, n, length = 16, 32, 8, 12
    w = jnp.ones((length, k, n))

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (c, c @ wi), x, w)[1]

    x = jnp.ones((m, k))
    flops, operand_bytes, notes = count_flops(jax.make_jaxpr(f)(x, w))
    assert flops == length * 2 * m * n * k
    assert operand_bytes == length * 4 * (m * k + k * n + m * n)
    assert notes == []
    xla = jax.jit(f).lower(x, w).compile().cost_analysis()
    xla = (xla[0] if isinstance(xla, (list, tuple)) else xla)["flops"]
    assert xla == pytest.approx(flops / length, rel=0.1)  # what the counter exists for: XLA counts the body once


def test_flops_of_a_grouped_matmul_count_each_row_once():
    """``ragged_dot`` (the mixture of experts): M rows of K, each through one of G [K, N] groups -> 2 M K N."""
    m, k, n, groups = 24, 16, 8, 4
    jaxpr = jax.make_jaxpr(jax.lax.ragged_dot)(jnp.ones((m, k)), jnp.ones((groups, k, n)),
                                               jnp.array([6, 0, 10, 8], jnp.int32))
    flops, operand_bytes, _ = count_flops(jaxpr)
    assert flops == 2 * m * k * n
    assert operand_bytes == 4 * (m * k + groups * k * n + m * n)


def test_flops_of_loops_branches_and_nested_calls():
    a = jnp.ones((4, 8))

    def body(c):
        return jax.lax.cond(c[0, 0] > 0, lambda: c @ jnp.ones((8, 8)), lambda: c), None

    def f(x):
        y = jax.jit(lambda x: x @ x.T)(x)  # pjit, counted once: 2 * 4 * 4 * 8
        z = jax.lax.while_loop(lambda c: c[0, 0] < 100, lambda c: body(c)[0], x)  # max branch: 2 * 4 * 8 * 8
        return y, jax.checkpoint(lambda z: z @ z.T)(z)  # remat: 2 * 4 * 4 * 8

    jaxpr = jax.make_jaxpr(f)(a)
    flops, _, notes = count_flops(jaxpr, while_trips=10)
    assert flops == 256 + 10 * 512 + 256
    flops, _, notes = count_flops(jaxpr)
    assert flops == 256 + 512 + 256 and any("while" in note for note in notes)

    def nested(x):  # only the outermost while loop takes while_trips (the decode loop); inner ones count once
        inner = lambda c: jax.lax.while_loop(lambda d: d[0, 0] < 10, lambda d: d @ jnp.ones((8, 8)), c)  # noqa: E731
        return jax.lax.while_loop(lambda c: c[0, 0] < 100, inner, x)

    flops, _, notes = count_flops(jax.make_jaxpr(nested)(a), while_trips=10)
    assert flops == 10 * 512 and any("nested while" in note for note in notes)


def test_verdict_names_the_biggest_term():
    gib = 1024**3
    p = Program("update", "", None, (), 1, resident={"Adam state": 2 * gib})
    p.result = dict(memory=dict(argument=gib, temporary=90 * gib, output=gib, alias=0, total=92 * gib),
                    resident=p.resident, error=None)
    fits, line, reason = verdict(p, 95.74)  # 92 GiB of the program + 2 GiB resident fit; + 4 more do not
    assert fits and "biggest term temporary 90.00 GiB" in line
    p.result["resident"]["reference params"] = 4 * gib
    fits, line, reason = verdict(p, 95.74)
    assert not fits and reason == "98.00 GiB; biggest term temporary 90.00 GiB"
    p.result.update(error="RESOURCE_EXHAUSTED ...", error_short="largest buffer 256GiB f32[1,2,2,131072,131104]")
    fits, line, reason = verdict(p, 95.74)
    assert not fits and "f32[1,2,2,131072,131104]" in reason


def test_topology_names():
    assert resolve_topology("v5p-64") == ("v5p", "v5p:4x4x2", None)
    assert resolve_topology("v6e-64") == ("v6e", "v6e:8x8", None)
    assert resolve_topology("v5p-8") == ("v5p", "v5p:2x2x1", None)
    assert resolve_topology("v5e:4x4") == ("v5e", "v5e:4x4", None)
    assert resolve_topology("cpu:8") == ("cpu", "cpu:8", 8)
    for bad in ("v9x-64", "cpu:0", "tpu"):
        with pytest.raises(ValueError):
            resolve_topology(bad)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "configs" / "mesh").glob("tpu_*.yaml")))
def test_mesh_presets_build_on_their_topology(preset):
    # tpu_v5p_64_3b -> v5p-64 -> v5p:4x4x2; tpu_v6e_64 -> v6e:8x8
    generation, chips = preset.split("_")[1:3]
    _, topology, _ = resolve_topology(f"{generation}-{chips}")
    devices = topology_devices(topology)
    sizes = yaml.safe_load((ROOT / "configs" / "mesh" / f"{preset}.yaml").read_text())["mesh"]
    mesh = parallel.make_mesh(sizes, devices)
    assert mesh.devices.size == len(devices)
    assert all(mesh.shape[axis] == size for axis, size in sizes.items() if size != -1)
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)


def test_a_mesh_the_torus_cannot_tile_whole_is_split():
    from jax.experimental import mesh_utils

    devices = topology_devices("v6e:8x8")
    with pytest.raises(NotImplementedError, match="allow_split_physical_axes"):  # why make_mesh retries
        mesh_utils.create_device_mesh([1, 16, 4], devices)
    assert dict(parallel.make_mesh({"fsdp": 16, "tensor": 4}, devices).shape) == {"data": 1, "fsdp": 16, "tensor": 4}


def test_a_mesh_that_cannot_be_built_on_its_topology_fails_clearly():
    devices = topology_devices("v5p:4x4x2")
    with pytest.raises(ValueError, match="needs 64 devices, have 32"):
        parallel.make_mesh({"fsdp": 16, "tensor": 4}, devices)  # the v6e-64 preset on a v5p-64
    with pytest.raises(ValueError, match="TPU slices"):
        parallel.make_mesh({"fsdp": -1, "dcn_data": 2}, devices)  # two slices asked of one


def test_plan_tiny_on_v5p_8(tmp_path):
    topology_devices("v5p:2x2x1")
    out = plan(*TINY, "--topology", "v5p-8", "train.loss.kl_coef=0.01", "rollout.weights_dtype=bfloat16",
               "--json", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("cast", "prefill", "decode", "pool", "round", "vision", "update", "vision_grad", "logprobs",
                 "optimizer"):
        assert f"[{name}]" in out.stdout
    assert "95.74 GiB HBM" in out.stdout and "step time estimate (v5p" in out.stdout and "600 GB/s ICI" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("plan: 10 of 10 programs fit on v5p:2x2x1")
    figures = json.loads((tmp_path / "plan.json").read_text())
    assert figures["fits"] and figures["devices"] == 4 and figures["mesh"]["fsdp"] == 4
    update = figures["programs"]["update"]
    assert update["memory"]["temporary"] > 0 and update["flops"] > update["xla_flops"] > 0
    assert "reference params" in update["resident"] and "rollout weights copy" not in update["resident"]  # released
    assert figures["programs"]["decode"]["memory"]["alias"] > 0  # the donated cache
    assert figures["step_seconds"] > 0
    # communication: the fsdp-split weights gathered on every one of the 8 decode steps, counted per step
    decode = figures["programs"]["decode"]["communication"]
    assert decode["by_kind"]["all-gather"]["count"] >= 8 * 7 and decode["bytes_per_chip_in_loops"] > 0
    assert figures["programs"]["decode"]["seconds_terms"]["communication"] > 0
    assert 0 < figures["communication_seconds"] < figures["step_seconds"]
    # the default sampler (continuous) is the one counted in the step; the static one is compiled to compare
    assert figures["programs"]["round"]["runs_per_step"] == 1 and figures["programs"]["decode"]["runs_per_step"] == 0


def test_plan_tiny_on_cpu_8():
    out = plan(*TINY, "--topology", "cpu:8", "data.batch_size=8", "--only", "prefill,decode")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1}" in out.stdout and "no memory limit" in out.stdout
    assert "[prefill]" in out.stdout and "[decode]" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("plan: 2 of 2 programs compiled")


@pytest.mark.slow
def test_plan_tiny_on_cpu_8_every_program():
    out = plan(*TINY, "--topology", "cpu:8", "data.batch_size=8")
    assert out.returncode == 0, out.stdout + out.stderr
    for name in ("prefill", "decode", "vision", "update", "vision_grad", "optimizer"):
        assert f"[{name}]" in out.stdout


def test_plan_names_the_program_that_does_not_fit():
    topology_devices("v5p:2x2x1")
    # a 2^29-token vocabulary: 34 GiB of embedding per chip, x4 in the optimizer (params, grads, Adam m and v)
    out = plan(*TINY, "--topology", "v5p-8", "--only", "optimizer", "model.text.vocab_size=536870912")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "[optimizer]" in out.stdout and "verdict: DOES NOT FIT" in out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert "DOES NOT FIT: optimizer (used " in last and "f32[536870912," in last, last  # the compiler's largest buffer


def test_plan_config_errors_exit_2():
    out = plan("--config", "configs/qwen2_5_vl_3b_grpo.yaml", "--topology", "v5p-64", "--only", "optimizer")
    assert out.returncode == 2 and "model.preset=" in out.stderr  # the checkpoint's config.json is not here
    out = plan(*TINY, "--topology", "cpu:8", "data.batch_size=3")
    assert out.returncode == 2 and "does not divide" in out.stderr


def test_plan_qwen3_vl_moe_tiny_on_v5p_8(tmp_path):
    """Qwen3-VL: the vision inputs carry the position-table taps, rows need only be a multiple of the merge unit (68:
    no window of the Qwen2.5 tower divides it), and the MoE decoder's update compiles on a TPU slice."""
    topology_devices("v5p:2x2x1")
    out = plan(*TINY, "model.preset=qwen3_vl_moe_tiny", "--image-rows", "68", "--topology", "v5p-8", "--only",
               "vision,update", "--json", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "1 image(s) x 68 rows" in out.stdout and "[update]" in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith("plan: 2 of 2 programs fit on v5p:2x2x1")
    figures = json.loads((tmp_path / "plan.json").read_text())
    assert figures["programs"]["update"]["flops"] > 0
    out = plan(*TINY, "model.preset=qwen3_vl_tiny", "--image-rows", "66", "--topology", "cpu:4", "--only", "vision")
    assert out.returncode == 2 and "merge unit's 4 rows" in out.stderr
    out = plan(*TINY, "--image-rows", "68", "--topology", "cpu:4", "--only", "vision")  # Qwen2.5-VL: windows
    assert out.returncode == 2 and "attention window's 64 rows" in out.stderr


def test_a_decode_loop_reads_each_chips_weights_on_every_step(tmp_path):
    """On 8 whole replicas (``rollout.mesh={data: -1}``) each chip holds the whole bf16 decoder, and every decode
    step reads it: the round's streamed bytes are its steps x the decoder's bytes (not the vision tower; the tiny
    model's embedding is its output projection). Before, the memory term divided the weights by the chips."""
    import math

    from flax import nnx

    from medix_jax.models.qwen_vl import preset
    from medix_jax.models.qwen_vl.model import abstract_model

    out = plan(*TINY, "--topology", "cpu:8", "data.batch_size=8", "rollout.num_samples=2", "rollout.slots=8",
               "rollout.weights_dtype=bfloat16", "rollout.mesh={data: -1}", "--only", "round",
               "--json", str(tmp_path / "plan.json"))
    assert out.returncode == 0, out.stdout + out.stderr
    round_ = json.loads((tmp_path / "plan.json").read_text())["programs"]["round"]
    decoder = sum(math.prod(v.shape) for path, v in nnx.to_flat_state(nnx.state(abstract_model(preset("tiny")),
                                                                                nnx.Param))
                  if path[0] != "visual")
    steps = -(-8 * 2 // 8) * 8  # ceil(samples / slots) x max_new_tokens
    assert round_["streamed_bytes_per_chip"] == steps * decoder * 2  # bf16, whole on every chip
    assert round_["streamed_bytes_per_chip"] > round_["matmul_operand_bytes_per_chip"]  # the old, global / chips
