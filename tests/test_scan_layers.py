"""Scanned (stacked) layers: same function and gradients as unrolled layers, hub-named I/O, sharded 'layers' axis."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import Qwen2_5_VLForConditionalGeneration

from medix_jax import parallel
from medix_jax.models.qwen_vl import prepare_inputs
from medix_jax.models.qwen_vl.hf_io import load_hf, save_hf
from tests.support.helpers import hf_logits, left_pad, tokens_for


def _loss_and_grads(model, inputs):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graphdef, params, rest)(inputs)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 7] * inputs.attention_mask)

    return jax.jit(jax.value_and_grad(loss))(params)


def test_scan_and_remat_give_the_same_gradients(tiny_checkpoint, rng):
    _, path = tiny_checkpoint
    grids = np.array([[1, 8, 8]])
    ids, mask = left_pad([tokens_for([3, "img", 4], grids, rng), tokens_for([6], [], rng)])
    pixels = rng.normal(size=(64, 1176)).astype(np.float32)
    unrolled = load_hf(path)
    scanned = load_hf(path, scan_layers=True, remat=True)
    inputs = prepare_inputs(unrolled.config, ids, mask, pixels, grids)
    loss_a, grads_a = _loss_and_grads(unrolled, inputs)
    loss_b, grads_b = _loss_and_grads(scanned, inputs)
    assert abs(float(loss_a) - float(loss_b)) <= 1e-6
    # Unstacked parameters compare directly; stacked ones layer by layer.
    np.testing.assert_allclose(grads_a["model"]["embed_tokens"]["embedding"][...],
                               grads_b["model"]["embed_tokens"]["embedding"][...], atol=1e-6)
    for layer in range(unrolled.config.text.num_layers):
        np.testing.assert_allclose(grads_a["model"]["layers"][layer]["mlp"]["up_proj"]["kernel"][...],
                                   grads_b["model"]["layers"]["mlp"]["up_proj"]["kernel"][...][layer], atol=1e-6)
    for block in range(unrolled.config.vision.depth):
        np.testing.assert_allclose(grads_a["visual"]["blocks"][block]["attn"]["qkv"]["kernel"][...],
                                   grads_b["visual"]["blocks"]["attn"]["qkv"]["kernel"][...][block], atol=1e-6)


def test_scanned_model_saves_hub_names_and_reloads_in_transformers(tiny_checkpoint, tmp_path, rng):
    hf, path = tiny_checkpoint
    scanned = load_hf(path, scan_layers=True)
    assert scanned.model.layers.self_attn.q_proj.kernel[...].shape[0] == 2  # stacked
    out = save_hf(scanned, tmp_path / "from_scanned")
    again = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask = left_pad([tokens_for([9], [], rng)])
    np.testing.assert_allclose(hf_logits(again, ids, mask), hf_logits(hf, ids, mask), atol=1e-6)


def test_scanned_sharded_load_keeps_layers_axis_whole(tiny_checkpoint):
    _, path = tiny_checkpoint
    mesh = parallel.make_mesh({"fsdp": 4, "tensor": 2})
    model = load_hf(path, mesh=mesh, scan_layers=True)
    kernel = model.model.layers.mlp.gate_proj.kernel[...]
    assert kernel.sharding.spec == P(None, "fsdp", "tensor")
    cfg = dataclasses.replace(model.config, scan_layers=False)
    assert cfg.text.num_layers == kernel.shape[0]
