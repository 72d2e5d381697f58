"""Sharded load and forward on 8 simulated CPU devices (fsdp=4, tensor=2) equal the single-device forward."""

import functools
import os
import re
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from medix_jax import parallel
from medix_jax.models.qwen_vl import QwenVL, init_model, prepare_inputs, preset
from medix_jax.models.qwen_vl.hf_io import load_hf
from medix_jax.models.qwen_vl.model import apply_split
from tests.support.helpers import left_pad, tokens_for


@pytest.fixture(scope="module")
def mesh():
    if jax.device_count() < 8:
        pytest.fail("the sharding tests need 8 devices: XLA_FLAGS=--xla_force_host_platform_device_count=8")
    return parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def test_mesh_sizes_and_errors():
    assert parallel.make_mesh({"fsdp": -1, "tensor": 2}).shape == {"data": 1, "fsdp": 4, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        parallel.make_mesh({"fsdp": 3, "tensor": 2})
    with pytest.raises(ValueError, match="at most one -1"):
        parallel.make_mesh({"fsdp": -1, "tensor": -1})
    with pytest.raises(ValueError, match="unknown mesh axes"):
        parallel.make_mesh({"pipeline": 8})


def test_sharded_load_and_forward_match_single_device(tiny_checkpoint, mesh, rng):
    _, path = tiny_checkpoint
    single = load_hf(path)
    sharded = load_hf(path, mesh=mesh)

    q = sharded.model.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == P("fsdp", "tensor")
    assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2)
    up = sharded.visual.blocks[0].mlp.up_proj.kernel[...]
    assert up.sharding.spec == P("fsdp", "tensor")
    emb = sharded.model.embed_tokens.embedding[...]
    assert emb.sharding.spec == P("tensor", "fsdp")
    norm = sharded.model.norm.weight[...]
    assert norm.sharding.spec == P(None)
    sharded_bytes = sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(nnx.state(sharded, nnx.Param)))
    full_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(single, nnx.Param)))
    assert sharded_bytes < full_bytes / 3  # every device holds a fraction of the model

    grids = np.array([[1, 8, 8], [1, 12, 20]])
    rows = [tokens_for([3, "img", 5], grids[:1], rng), tokens_for([11], [], rng),
            tokens_for(["img", 2], grids[1:], rng), tokens_for([4], [], rng)]
    ids, mask = left_pad(rows)
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    inputs = prepare_inputs(single.config, ids, mask, pixels, grids)

    graphdef, state = nnx.split(single)
    expected = np.asarray(apply_split(graphdef, state, inputs))

    batch = NamedSharding(mesh, P(("data", "fsdp")))
    placed = inputs._replace(
        input_ids=jax.device_put(inputs.input_ids, batch),
        attention_mask=jax.device_put(inputs.attention_mask, batch),
        positions=jax.device_put(inputs.positions, NamedSharding(mesh, P(None, ("data", "fsdp")))),
        rope_delta=jax.device_put(inputs.rope_delta, batch),
    )
    graphdef, state = nnx.split(sharded)
    got = np.asarray(apply_split(graphdef, state, placed))
    assert np.abs(got - expected)[mask.astype(bool)].max() <= 1e-5


def test_init_sharded_creates_parameters_in_place(mesh):
    cfg = preset("tiny")
    model = parallel.init_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(3)), mesh)
    reference = init_model(cfg, seed=3)
    kernel = model.model.layers[1].mlp.down_proj.kernel[...]
    assert kernel.sharding.spec == P("tensor", "fsdp")
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(reference, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), atol=1e-7, err_msg=str(path))


def test_indivisible_dimensions_are_replicated(mesh):
    spec = parallel.logical_spec(("embed", "kv_heads"), (64, 3), mesh)  # 3 kv-head columns on tensor=2
    assert spec == P("fsdp", None)
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'bogus'"):
        parallel.logical_spec(("bogus",), (8,), mesh)


def test_a_batch_that_does_not_divide_is_an_error_a_parameter_is_kept_whole_with_a_warning(capsys):
    """Replicating a batch dimension would multiply every device's compute and memory: an error with the sizes.
    A parameter dimension that does not divide stays whole, with a one-line warning naming the parameter."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    with pytest.raises(ValueError, match=r"batch dimension of 6 does not divide over mesh axes \{'fsdp': 4\}"):
        parallel.logical_spec(("batch", None), (6, 3), mesh)
    assert parallel.logical_spec(("batch", None), (8, 3), mesh) == P("fsdp", None)

    class Odd(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(np.zeros((8, 6), np.float32), axes=("embed", "mlp"))  # 6 on tensor=4

    shardings = parallel.param_shardings(nnx.state(Odd(), nnx.Param), parallel.make_mesh({"fsdp": 2, "tensor": 4}))
    assert list(shardings.values())[0].spec == P("fsdp", None)
    assert "w keeps its mlp dimension (6) whole" in capsys.readouterr().out


def _compiled_update(devices: int):
    """The trainer's jitted update micro-batch (``programs.gradients``) of the tiny model, compiled for 8 packed rows of
    256 prompt + 256 completion tokens on a mesh of ``devices`` (fsdp)."""
    from medix_jax.rl import grpo, packing, programs
    from medix_jax.rl.forward import Completions

    mesh = parallel.make_mesh({"data": 1, "fsdp": devices, "tensor": 1}, jax.devices()[:devices])
    model = parallel.init_sharded(lambda: QwenVL(preset("tiny"), rngs=nnx.Rngs(0)), mesh)
    graphdef, params = nnx.split(model, nnx.Param)
    shardings = jax.tree.map(lambda a: a.sharding, params)
    rows, p, t = 8, 256, 256
    batch = lambda *shape, dtype=np.float32: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=NamedSharding(mesh, P(("data", "fsdp"), *([None] * (len(shape) - 1)))))
    slots = rows * packing.PACK_SAMPLES
    completions = Completions(batch(slots, t, dtype=np.int32), batch(slots, t, dtype=bool), batch(slots, t),
                                      batch(slots))
    layout = packing.Layout(*(jax.ShapeDtypeStruct(shape, np.int32, sharding=NamedSharding(
        mesh, P(None, ("data", "fsdp"), None) if len(shape) == 3 else P(("data", "fsdp"), None)))
        for shape in packing.shapes(rows, p, t, packing.PACK_SAMPLES)))
    totals = grpo.Totals(*(jax.ShapeDtypeStruct((), np.float32) for _ in grpo.Totals._fields))
    embedded = (batch(rows, p, model.config.text.hidden_size), None)
    step = jax.jit(functools.partial(programs.gradients, graphdef, loss_cfg=grpo.LossConfig(), temperature=1.0,
                                     widths=None, param_shardings=shardings, mesh=mesh))
    return step.lower(params, embedded, layout, completions, totals, jax.ShapeDtypeStruct((), bool),
                      jax.ShapeDtypeStruct((), np.int32)).compile()


def test_update_activations_are_split_over_the_batch_axes(mesh):
    """On 8 devices (fsdp 8) each device computes only its own row of the update: no buffer of the partitioned
    program spans all 8 rows of the 512-token sequence, while the hidden states appear as one row of 512 x 64. Before
    the activation constraints every device held every row after the embedding gather (``[8, 512, 64 / 8]``), with
    the MLP and attention buffers of every row (issue 14)."""
    compiled, single = _compiled_update(8), _compiled_update(1)
    hlo = compiled.as_text()
    whole_batch = re.findall(r"\b(?:f32|bf16)\[8,512,\d+\]", hlo)
    assert not whole_batch, f"{len(whole_batch)} buffers carry every row, e.g. {sorted(set(whole_batch))[:4]}"
    assert re.search(r"\bf32\[1,512,64\]", hlo), "no per-device hidden states [1, 512, 64] in the program"
    one, eight = (c.memory_analysis().temp_size_in_bytes / 2**20 for c in (single, compiled))
    print(f"update temporaries per device: 1 device {one:.1f} MiB, 8 devices {eight:.1f} MiB")
    assert eight < one / 4


def test_simulated_devices_wait_for_each_other_as_long_as_a_test_may_run():
    """XLA's CPU collectives abort the process when a simulated device is 40 s late (tests/support/xla_flags.py): the
    tests' flags allow at least pyproject's pytest timeout, so a starved device thread on a loaded CI machine slows a
    test instead of killing its worker."""
    import tomllib

    timeout = tomllib.loads((Path(__file__).parent.parent / "pyproject.toml").read_text())["tool"]["pytest"][
        "ini_options"]["timeout"]
    flags = dict(f.lstrip("-").split("=", 1) for f in os.environ["XLA_FLAGS"].split() if "=" in f)
    assert int(flags["xla_cpu_collective_call_terminate_timeout_seconds"]) >= timeout
    assert int(flags["xla_force_host_platform_device_count"]) == 8 == jax.device_count()
