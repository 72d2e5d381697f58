"""Qwen3-VL (dense and MoE) against transformers 5.23 on the same random weights (fp32, CPU): logits, DeepStack,
interleaved M-RoPE, greedy generation, the HF round trip and 8-device sharding."""

import dataclasses
import json
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import (
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLMoeConfig,
    Qwen3VLMoeForConditionalGeneration,
)

from medix_jax import parallel
from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl import forward, prepare_inputs
from medix_jax.models.qwen_vl.hf_io import CheckpointMismatch, load_hf, save_hf
from medix_jax.models.qwen_vl.language import Segments
from medix_jax.models.qwen_vl.rope import mrope_axes
from tests.support.helpers import (
    BOS,
    EOS,
    IMAGE,
    PAD,
    VIDEO,
    VISION_END,
    VISION_START,
    VOCAB,
    hf_logits,
    left_pad,
    tokens_for,
)
from tests.support.weights import spread_torch_weights

TOL = 1e-4
PATCH_DIM = 3 * 2 * 16 * 16
BUCKETS = Buckets(prompt_lengths=(64, 128), images=(2,), rows_per_image=(256,))


def hf_config(moe: bool):
    """3 vision blocks (DeepStack after 0 and 2, an 8x8 position table), 3 decoder layers with head_dim 32 (not
    hidden / heads = 16), GQA 4/2, interleaved M-RoPE sections (6, 5, 5); MoE: 4 experts, 2 per token."""
    text = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                head_dim=32, intermediate_size=96, rms_norm_eps=1e-6, bos_token_id=BOS, eos_token_id=EOS,
                pad_token_id=PAD, rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=[6, 5, 5],
                                                       mrope_interleaved=True))
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1)
    vision = dict(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=64, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                  deepstack_visual_indexes=[0, 2])
    cls = Qwen3VLMoeConfig if moe else Qwen3VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMAGE, video_token_id=VIDEO,
               vision_start_token_id=VISION_START, vision_end_token_id=VISION_END, tie_word_embeddings=moe)


def make_hf(moe: bool, moe_intermediate: int = 24):
    torch.manual_seed(1)
    cls = Qwen3VLMoeForConditionalGeneration if moe else Qwen3VLForConditionalGeneration
    config = hf_config(moe)
    if moe:
        config.text_config.moe_intermediate_size = moe_intermediate
    return spread_torch_weights(cls._from_config(config, attn_implementation="eager"))


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def checkpoint(request, tmp_path_factory):
    hf = make_hf(request.param)
    path = tmp_path_factory.mktemp("moe" if request.param else "dense")
    hf.save_pretrained(path)
    return hf, path


def pixels_for(grids, rng):
    return rng.normal(size=(int(np.prod(grids, 1).sum()), PATCH_DIM)).astype(np.float32)


def mixed_batch(rng):
    """A two-image row (grids 6x10 and 4x6 patches: neither a multiple of anything but the 2x2 merge; one
    larger and one smaller than the 8x8 position table), a text-only row and a one-image row, left-padded."""
    grids = np.array([[1, 6, 10], [1, 4, 6], [1, 10, 4]])
    rows = [tokens_for([3, "img", 2, "img", 4], grids[:2], rng), tokens_for([9], [], rng),
            tokens_for([2, "img", 5], grids[2:], rng)]
    ids, mask = left_pad(rows, extra=2)
    return ids, mask, pixels_for(grids, rng), grids


@pytest.mark.parametrize("variant", [{}, {"scan_layers": True, "remat": True}], ids=["unrolled", "scan+remat"])
def test_logits_equal_transformers(checkpoint, rng, variant):
    hf, path = checkpoint
    ours = load_hf(path, **variant)
    assert ours.config.family == ("qwen3_vl_moe" if ours.config.text.num_experts else "qwen3_vl")
    ids, mask, pixels, grids = mixed_batch(rng)
    ref = hf_logits(hf, ids, mask, pixels, grids)
    got = np.asarray(forward(ours, ids, mask, pixels, grids))
    valid = mask.astype(bool)
    assert np.abs(ref).max() > 1.0, "logits too small for the comparison to mean anything"
    assert np.abs(got - ref)[valid].max() <= TOL


def test_deepstack_and_interleaving_matter(checkpoint, rng):
    """The parity above could not hold without DeepStack or with block M-RoPE: each changes the logits."""
    hf, path = checkpoint
    ids, mask, pixels, grids = mixed_batch(rng)
    ref = hf_logits(hf, ids, mask, pixels, grids)
    valid = mask.astype(bool)
    ours = load_hf(path)
    assert (mrope_axes((6, 5, 5), True) != mrope_axes((6, 5, 5), False)).any()
    blocks = nnx.merge(*nnx.split(load_hf(path)))
    blocks.config = dataclasses.replace(ours.config, text=dataclasses.replace(ours.config.text,
                                                                              mrope_interleaved=False))
    assert np.abs(np.asarray(forward(blocks, ids, mask, pixels, grids)) - ref)[valid].max() > 1e-2
    no_deepstack = load_hf(path)
    for merger in no_deepstack.visual.deepstack_merger_list:
        merger.linear_fc2.kernel[...] = 0 * merger.linear_fc2.kernel[...]
        merger.linear_fc2.bias[...] = 0 * merger.linear_fc2.bias[...]
    assert np.abs(np.asarray(forward(no_deepstack, ids, mask, pixels, grids)) - ref)[valid].max() > 1e-2


def test_greedy_is_token_identical_to_transformers_generate(checkpoint, rng):
    hf, path = checkpoint
    model = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(rng)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                          max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    ref = ref[:, ids.shape[1]:].numpy()
    out = Sampler(SamplingConfig(max_new_tokens=32, temperature=0)).generate(
        model, prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0))
    assert ref.shape[1] == 32 and not (ref == EOS).any(), "want 32 real tokens to compare"
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)


def test_save_hf_round_trip_loads_in_transformers(checkpoint, rng, tmp_path):
    hf, path = checkpoint
    ours = load_hf(path)
    save_hf(ours, tmp_path / "export")
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "export", dtype=torch.float32, attn_implementation="eager").eval()
    ids, mask, pixels, grids = mixed_batch(rng)
    valid = mask.astype(bool)
    np.testing.assert_array_less(np.abs(hf_logits(back, ids, mask, pixels, grids)
                                        - np.asarray(forward(ours, ids, mask, pixels, grids)))[valid], TOL)
    reloaded = load_hf(tmp_path / "export")
    assert reloaded.config == ours.config


@pytest.mark.slow
def test_sharded_over_eight_devices_equals_one(checkpoint, rng):
    """Dense: fsdp 4 x tensor 2; MoE: the experts split over the expert rule's mesh axis (fsdp)."""
    hf, path = checkpoint
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    single, sharded = load_hf(path), load_hf(path, mesh=mesh)
    layer = sharded.model.layers[0]
    if single.config.text.num_experts:
        experts = layer.mlp.experts.gate_up_proj[...]
        assert experts.sharding.spec[0] == "fsdp"
        assert experts.addressable_shards[0].data.shape[0] == experts.shape[0] // 4
    else:
        q = layer.self_attn.q_proj.kernel[...]
        assert q.addressable_shards[0].data.shape == (q.shape[0] // 4, q.shape[1] // 2)
    ids, mask, pixels, grids = mixed_batch(rng)
    ids, mask = np.concatenate([ids, ids[:1]]), np.concatenate([mask, mask[:1]])  # 4 rows: divide over fsdp
    grids = np.concatenate([grids, grids[:2]])
    pixels = np.concatenate([pixels, pixels[:int(np.prod(grids[:2], 1).sum())]])
    sampling = SamplingConfig(max_new_tokens=8, temperature=0)
    prompts = prepare_prompts(single.config, ids, mask, pixels, grids, BUCKETS)
    expected = Sampler(sampling).generate(single, prompts, jax.random.key(0))
    out = Sampler(sampling, mesh=mesh).generate(sharded, prompts, jax.random.key(0))
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)
    with parallel.activation_sharding(mesh):
        got = np.asarray(forward(sharded, ids, mask, pixels, grids))
    want = np.asarray(forward(single, ids, mask, pixels, grids))
    assert np.abs(got - want)[mask.astype(bool)].max() <= 1e-5


@pytest.mark.parametrize("checkpoint", [True], ids=["moe"], indirect=True)  # a dense model has no router
def test_router_aux_loss_equals_transformers(checkpoint, rng):
    """The load-balancing loss of our routing statistics is transformers' ``aux_loss`` (padding masked out)."""
    hf, path = checkpoint
    ours = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(rng)
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), pixel_values=torch.tensor(pixels),
                 image_grid_thw=torch.tensor(grids), mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                 output_router_logits=True).aux_loss.item()
    inputs = prepare_inputs(ours.config, ids, mask, pixels, grids)
    embeds, deepstack = ours.embed(inputs)
    segments = inputs.attention_mask.astype(np.int32)
    router = ours.decode(embeds, inputs.positions, Segments(segments, segments), deepstack=deepstack).router
    assert float(router.rows) == mask.sum() * ours.config.text.num_layers
    assert abs(float(router.aux_loss()) - ref) <= 1e-5
    np.testing.assert_allclose(float(router.load().sum()), 1.0, rtol=1e-6)


@pytest.mark.slow
def test_two_grpo_steps_of_a_tiny_moe_through_the_cli_log_routing_metrics(tmp_path):
    run = tmp_path / "run"
    subprocess.run([sys.executable, "-m", "medix_jax.train", "model.preset=qwen3_vl_moe_tiny", "sft.steps=0",
                    "train.steps=2", f"train.run_dir={run}", "eval.split=null", "rollout.max_new_tokens=12",
                    "train.export_hf=false"], check=True, timeout=900)
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        loads = [s[f"router_load_e{e}"] for e in range(4)]
        assert abs(sum(loads) - 1.0) < 1e-4 and all(0 < x < 1 for x in loads)
        assert s["router_imbalance"] >= 1.0 and s["router_aux_loss"] > 0


def test_packed_rows_give_each_sample_its_own_logprobs(checkpoint, rng):
    """Samples packed into shared update rows (rl/packing.py) -- a prompt's two samples in one row, then a two-image
    prompt's sample after them, its DeepStack features and 3-D positions at an offset -- get the log-probabilities
    they get one to a row (forward.completion_hidden); the router sees the same real tokens."""
    from medix_jax.rl import forward
    from medix_jax.rl.forward import Completions
    from medix_jax.rl.update import pack_micro_batch

    _, path = checkpoint
    ours = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(rng)  # prompts of 34 (two images), 9 (text) and 19 (one image) tokens
    inputs = prepare_inputs(ours.config, ids, mask, pixels, grids)
    t, lengths = 12, np.array([12, 7, 3, 1, 5, 9])  # two samples per prompt
    tokens = rng.integers(0, 500, (6, t)).astype(np.int32)
    completions = Completions(tokens, np.arange(t)[None] < lengths[:, None], np.zeros((6, t), np.float32),
                              np.zeros(6, np.float32))
    prompt_of = np.repeat(np.arange(3), 2).astype(np.int32)
    layout, _, _ = pack_micro_batch(jax.tree.map(np.asarray, inputs), completions, prompt_of,
                                    [[[2, 3, 4], [0], [1], [5]]], rows=4, per_row=4)
    slots = {0: 2, 1: 3, 2: 4, 4: 0, 8: 1, 12: 5}
    embedded = ours.embed(inputs)
    assert embedded[1] is not None  # DeepStack features
    hidden, targets, router = forward.packed_hidden(ours, embedded, jax.tree.map(jax.numpy.asarray, layout))
    logp = np.asarray(forward.unpack(forward.completion_logprobs(ours, hidden, targets, 1.0)[0], layout))
    alone, alone_router = forward.completion_hidden(ours, inputs, tokens, completions.mask, prompt_of)
    ref = np.asarray(forward.completion_logprobs(ours, alone, tokens, 1.0)[0])
    assert np.abs(ref).max() > 1.0
    for slot, sample in slots.items():
        n = lengths[sample]
        assert np.abs(logp[slot, :n] - ref[sample, :n]).max() <= 1e-5, (slot, sample)
    if router is not None:
        assert float(router.rows) == float(alone_router.rows)
        np.testing.assert_allclose(np.asarray(router.load()), np.asarray(alone_router.load()), atol=1e-6)


@pytest.mark.parametrize("intermediate", [32, 24], ids=["square", "not-square"])
def test_experts_saved_by_transformers_5_load_right_even_when_square(tmp_path, rng, intermediate):
    """transformers 5 saves the experts as [E, 2I, hidden]. With 2 x 32 == hidden 64 the shape cannot tell that
    from the hub's [E, hidden, 2I]: config.json's transformers_version does. Before, a square file loaded
    transposed, without an error."""
    hf = make_hf(True, intermediate)
    hf.save_pretrained(tmp_path)
    stored = json.loads((tmp_path / "config.json").read_text())["transformers_version"]
    assert int(stored.split(".")[0]) >= 5
    ids, mask, pixels, grids = mixed_batch(rng)
    got = np.asarray(forward(load_hf(tmp_path), ids, mask, pixels, grids))
    assert np.abs(got - hf_logits(hf, ids, mask, pixels, grids))[mask.astype(bool)].max() <= TOL


def test_a_square_expert_layout_that_config_json_does_not_name_is_refused(tmp_path):
    make_hf(True, 32).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["transformers_version"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointMismatch, match="could be .E, in, out. .the hub layout. or .E, out, in."):
        load_hf(tmp_path)
    config["medix_expert_layout"] = "out_in"  # what the file holds: it loads
    (tmp_path / "config.json").write_text(json.dumps(config))
    load_hf(tmp_path)


def test_our_export_of_a_square_mixture_says_its_layout_and_loads_back(tmp_path):
    """qwen3_vl_moe_tiny is square (2 x 32 == 64): the export names the hub layout it writes."""
    from medix_jax.models.qwen_vl import init_model, preset

    model = init_model(preset("qwen3_vl_moe_tiny"), seed=0)
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["medix_expert_layout"] == "in_out"
    back = load_hf(tmp_path)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param)),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
