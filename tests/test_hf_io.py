"""Hugging Face I/O: save_hf -> transformers round trip, sharded checkpoints, key spellings, clear mismatch errors."""

import dataclasses
import json

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from transformers import Qwen2_5_VLForConditionalGeneration

from medix_jax.models.qwen_vl import forward, init_model, preset
from medix_jax.models.qwen_vl.hf_io import CheckpointMismatch, load_hf, save_hf
from tests.support.helpers import hf_logits, left_pad, tokens_for


def randomized(cfg, seed=0):
    """Our own random model with weights large enough to make every parameter matter."""
    model = init_model(cfg, seed)
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        is_norm = any("norm" in str(p) or p == "ln_q" for p in path)
        values = rng.normal(1.0 if is_norm else 0.0, 0.2 if is_norm else 0.15, var.shape)
        var.set_value(jax.numpy.asarray(values.astype(np.float32)))
    return model


def sample_inputs(cfg, rng):
    grids = np.array([[1, 12, 20], [1, 8, 8]])
    t = cfg.tokens
    rows = [[t.vision_start_token_id] + [t.image_token_id] * 60 + [t.vision_end_token_id] + [3, 4, 5],
            rng.integers(0, 400, 9).tolist(),
            [7, t.vision_start_token_id] + [t.image_token_id] * 16 + [t.vision_end_token_id]]
    width = max(map(len, rows))
    ids = np.full((3, width), t.pad_token_id)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    return ids, mask, pixels, grids


def hf_logits_for(hf, cfg, ids, mask, pixels, grids):
    with torch.no_grad():
        return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                  image_grid_thw=torch.tensor(grids),
                  mm_token_type_ids=torch.tensor((ids == cfg.tokens.image_token_id).astype(np.int64))).logits.numpy()


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_round_trip_through_transformers(tmp_path, rng, tied):
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, tie_word_embeddings=tied))
    ours = randomized(cfg)
    base = tmp_path / "base"
    base.mkdir()
    (base / "chat_template.jinja").write_text("{{ messages }}")
    (base / "tokenizer_config.json").write_text("{}")
    (base / "tokenizer.json").write_text("{}")  # a base without a tokenizer is refused (test_first_hour.py)
    out = save_hf(ours, tmp_path / "hf", base_dir=base)

    with (out / "model.safetensors").open("rb"):
        keys = set(load_file(out / "model.safetensors"))
    assert "visual.patch_embed.proj.weight" in keys and "model.embed_tokens.weight" in keys
    assert "visual.merger.mlp.0.weight" in keys and "model.layers.1.self_attn.q_proj.bias" in keys
    assert ("lm_head.weight" in keys) == (not tied)
    assert (out / "chat_template.jinja").read_text() == "{{ messages }}"

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pixels, grids = sample_inputs(cfg, rng)
    ref = hf_logits_for(hf, cfg, ids, mask, pixels, grids)
    got = np.asarray(forward(ours, ids, mask, pixels, grids))
    assert np.abs(ref).max() > 1.0
    assert np.abs(got - ref)[mask.astype(bool)].max() <= 1e-4


def test_sharded_save_and_load(tmp_path, rng):
    cfg = preset("tiny")
    ours = randomized(cfg, seed=1)
    out = save_hf(ours, tmp_path / "sharded", max_shard_bytes=200_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and all((out / f).is_file() for f in files)
    assert not (out / "model.safetensors").exists()
    back = load_hf(out)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(ours, nnx.Param)),
                              nnx.to_flat_state(nnx.state(back, nnx.Param)), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, pixels, grids = sample_inputs(cfg, rng)
    got = np.asarray(forward(back, ids, mask, pixels, grids))
    assert np.abs(hf_logits_for(hf, cfg, ids, mask, pixels, grids) - got)[mask.astype(bool)].max() <= 1e-4


def test_bfloat16_save_and_load(tmp_path):
    ours = randomized(preset("tiny"), seed=2)
    out = save_hf(ours, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    back = load_hf(out, dtype="bfloat16")
    kernel = back.model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.dtype == jax.numpy.bfloat16
    np.testing.assert_allclose(np.asarray(kernel, np.float32), np.asarray(ours.model.layers[0].mlp.up_proj.kernel[...]),
                               rtol=1e-2, atol=1e-2)


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_newer_in_memory_key_names_are_accepted(tiny_checkpoint, tmp_path, rng):
    hf, path = tiny_checkpoint
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_text((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    new = {}
    for k, v in tensors.items():
        if k.startswith("visual."):
            k = "model." + k
        elif k.startswith("model."):
            k = "model.language_model." + k[len("model."):]
        new[k] = v
    save_file(new, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    model = load_hf(renamed)
    ids, mask = left_pad([tokens_for([6], [], rng)])
    assert np.abs(np.asarray(forward(model, ids, mask)) - hf_logits(hf, ids, mask)).max() <= 1e-4


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "missing tensor model.layers.1.mlp.down_proj.weight"),
        (lambda t: t.__setitem__("model.layers.9.extra.weight", np.zeros(3, np.float32)),
         "unexpected tensor model.layers.9.extra.weight"),
        (lambda t: t.__setitem__("visual.blocks.0.attn.proj.weight", np.zeros((32, 31), np.float32)),
         r"tensor visual.blocks.0.attn.proj.weight has shape \(32, 31\), expected \(32, 32\)"),
    ],
    ids=["missing", "unexpected", "mis-shaped"],
)
def test_mismatched_checkpoints_name_the_tensor(tmp_path, edit, message):
    out = save_hf(randomized(preset("tiny")), tmp_path / "ckpt")
    _rewrite(out, edit)
    with pytest.raises(CheckpointMismatch, match=message):
        load_hf(out)


def test_missing_weights_file_is_a_clear_error(tmp_path):
    out = save_hf(randomized(preset("tiny")), tmp_path / "ckpt")
    (out / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_hf(out)
