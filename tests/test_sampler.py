"""In-JAX sampler: greedy parity with transformers generate, exact logprobs, top-k/top-p, EOS, compile reuse, mesh."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from medix_jax import parallel
from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig, choose_tokens
from medix_jax.models.qwen_vl import forward
from medix_jax.models.qwen_vl.hf_io import load_hf
from tests.support.helpers import EOS, IMAGE, PAD, left_pad, tokens_for

BUCKETS = Buckets(prompt_lengths=(64, 128), images=(2, 4), rows_per_image=(512,))


def mixed_batch(rng):
    """An image row, a two-image row and a text-only row, left-padded."""
    grids = np.array([[1, 8, 8], [1, 12, 20], [1, 4, 6]])
    rows = [tokens_for([3, "img", 5], grids[:1], rng), tokens_for([2, "img", 1, "img", 3], grids[1:], rng),
            tokens_for([11], [], rng)]
    ids, mask = left_pad(rows)
    pixels = rng.normal(size=(int(np.prod(grids, 1).sum()), 1176)).astype(np.float32)
    return ids, mask, pixels, grids


@pytest.mark.parametrize("variant", [{}, {"scan_layers": True}], ids=["unrolled", "scan"])
def test_greedy_is_token_identical_to_transformers_generate(tiny_checkpoint, rng, variant):
    hf, path = tiny_checkpoint
    model = load_hf(path, **variant)
    ids, mask, pixels, grids = mixed_batch(rng)
    with torch.no_grad():
        ref = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                          pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                          mm_token_type_ids=torch.tensor((ids == IMAGE).astype(np.int64)),
                          max_new_tokens=32, do_sample=False, eos_token_id=EOS, pad_token_id=PAD)
    ref = ref[:, ids.shape[1]:].numpy()
    out = Sampler(SamplingConfig(max_new_tokens=32, temperature=0)).generate(
        model, prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0))
    tokens = np.asarray(out.tokens)
    assert ref.shape[1] == 32 or (ref[:, -1] == EOS).any() or (ref == PAD).any()
    np.testing.assert_array_equal(tokens[:, : ref.shape[1]], ref)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_logprobs_equal_a_full_forward_recomputation(tiny_checkpoint, rng, temperature, top_p):
    _, path = tiny_checkpoint
    model = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(rng)
    g = 2
    prompts = prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS)
    sampling = SamplingConfig(max_new_tokens=16, temperature=temperature, top_p=top_p, num_samples=g)
    out = Sampler(sampling).generate(model, prompts, jax.random.key(1))

    # Recompute: prompt (G copies, same images) + completion through one full forward.
    tokens, keep = np.asarray(out.tokens), np.asarray(out.mask)
    p_ids, p_mask = np.repeat(np.asarray(prompts.input_ids), g, 0), np.repeat(np.asarray(prompts.attention_mask), g, 0)
    full_ids = np.concatenate([p_ids, tokens], 1)
    full_mask = np.concatenate([p_mask, keep], 1)
    images_per_row = [1, 2, 0]
    row_grids = np.concatenate([np.repeat(grids[sum(images_per_row[:r]):sum(images_per_row[:r + 1])], 1, 0)
                                for r in range(3) for _ in range(g)])
    row_pixels = []
    offsets = np.concatenate([[0], np.cumsum(np.prod(grids, 1))])
    for r in range(3):
        first = sum(images_per_row[:r])
        block = pixels[offsets[first]: offsets[first + images_per_row[r]]]
        row_pixels += [block] * g
    logits = np.asarray(forward(model, full_ids, full_mask, np.concatenate(row_pixels), row_grids))
    s = p_ids.shape[1]
    scaled = jnp.asarray(logits[:, s - 1:-1]) / temperature
    expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(scaled, -1)), tokens[..., None], -1)[..., 0]
    got = np.asarray(out.logprobs)
    assert keep.sum() > 0
    assert np.abs(got - expected)[keep].max() <= 1e-4
    assert (got[~keep] == 0).all()
    # G samples of one prompt differ (a key per sample), rows of different prompts use their own prefill.
    assert not np.array_equal(tokens[0], tokens[1])


def test_top_k_and_top_p_draw_from_the_right_distribution():
    probs = np.array([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1)), jnp.float32))
    keys = jax.random.key(7)

    def frequencies(**kw):
        row_keys = jax.random.split(keys, len(logits))
        tokens, logprobs = choose_tokens(logits, row_keys, SamplingConfig(temperature=1.0, **kw))
        np.testing.assert_allclose(np.asarray(logprobs), np.log(probs)[np.asarray(tokens)], atol=1e-5)
        return np.bincount(np.asarray(tokens), minlength=5) / len(tokens)

    def check(freq, expected):
        sigma = np.sqrt(expected * (1 - expected) / 20000)
        assert (np.abs(freq - expected) <= 5 * sigma + 1e-12).all(), (freq, expected)

    check(frequencies(top_k=2), np.array([0.4, 0.3, 0, 0, 0]) / 0.7)
    # top_p 0.8: 0.4 and 0.3 sum to 0.7 < 0.8, so the token crossing 0.8 (0.15) is kept; 0.1 and 0.05 are not.
    check(frequencies(top_p=0.8), np.array([0.4, 0.3, 0.15, 0, 0]) / 0.85)
    check(frequencies(top_k=4, top_p=0.5), np.array([0.4, 0.3, 0, 0, 0]) / 0.7)
    check(frequencies(), probs)
    tokens, _ = choose_tokens(logits[:3] * 0.5, keys, SamplingConfig(temperature=0))
    assert (np.asarray(tokens) == 0).all()


def test_eos_stops_a_row_and_max_new_tokens_is_respected(tiny_checkpoint, rng):
    _, path = tiny_checkpoint
    model = load_hf(path)
    ids, mask, pixels, grids = mixed_batch(rng)
    prompts = prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS)
    free = Sampler(SamplingConfig(max_new_tokens=12, temperature=0)).generate(model, prompts, jax.random.key(0))
    free_tokens = np.asarray(free.tokens)
    assert free_tokens.shape == (3, 12) and (np.asarray(free.lengths) <= 12).all()
    stop = int(free_tokens[0, 4])  # make row 0's fifth greedy token the end of sequence
    first_stop = [np.flatnonzero(r == stop)[0] if (r == stop).any() else None for r in free_tokens]
    out = Sampler(SamplingConfig(max_new_tokens=12, temperature=0, stop_token_ids=(stop,))).generate(
        model, prompts, jax.random.key(0))
    tokens, keep, logprobs = np.asarray(out.tokens), np.asarray(out.mask), np.asarray(out.logprobs)
    for row, at in enumerate(first_stop):
        n = 12 if at is None else at + 1
        assert out.lengths[row] == n and keep[row, :n].all() and not keep[row, n:].any()
        np.testing.assert_array_equal(tokens[row, :n], free_tokens[row, :n])
        assert (tokens[row, n:] == PAD).all() and (logprobs[row, n:] == 0).all()


def test_generation_stops_at_every_end_token_the_checkpoint_declares(tiny_checkpoint, rng, tmp_path):
    """generation_config.json's ``eos_token_id`` list (Qwen: <|im_end|> and <|endoftext|>) ends a row at any of
    them, not only at config.json's single eos id."""
    _, path = tiny_checkpoint
    ids, mask, pixels, grids = mixed_batch(rng)
    model = load_hf(path)
    prompts = prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS)
    free = np.asarray(Sampler(SamplingConfig(max_new_tokens=12, temperature=0)).generate(
        model, prompts, jax.random.key(0)).tokens)
    second_end = int(free[0, 3])
    declared = tmp_path / "ckpt"
    shutil.copytree(path, declared)
    (declared / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, second_end]}))
    model = load_hf(declared)
    assert model.config.tokens.end_token_ids == (EOS, second_end)
    out = Sampler(SamplingConfig(max_new_tokens=12, temperature=0)).generate(model, prompts, jax.random.key(0))
    assert int(out.lengths[0]) == int(np.flatnonzero(free[0] == second_end)[0]) + 1 <= 4


def test_same_bucket_does_not_recompile(tiny_checkpoint, rng):
    _, path = tiny_checkpoint
    model = load_hf(path)
    sampler = Sampler(SamplingConfig(max_new_tokens=8, temperature=1.0, num_samples=2))
    ids, mask, pixels, grids = mixed_batch(rng)
    sampler.generate(model, prepare_prompts(model.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0))
    compiled = sampler.compile_count
    ids2, mask2, pixels2, grids2 = mixed_batch(np.random.default_rng(99))  # other tokens, same buckets
    ids2 = ids2[:, 3:]  # shorter prompts, same prompt bucket
    mask2 = mask2[:, 3:]
    sampler.generate(model, prepare_prompts(model.config, ids2, mask2, pixels2, grids2, BUCKETS), jax.random.key(1))
    assert sampler.compile_count == compiled


@pytest.mark.parametrize("mesh_sizes", [{"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["fsdp4-tensor2", "data2-fsdp2-tensor2"])
def test_sharded_sampling_gives_the_same_greedy_tokens(tiny_checkpoint, rng, mesh_sizes):
    _, path = tiny_checkpoint
    mesh = parallel.make_mesh(mesh_sizes)
    ids, mask, pixels, grids = mixed_batch(rng)
    # 8 rows (a batch that divides over data x fsdp): the three, reversed (text, two images, one image), two again
    ids, mask = np.concatenate([ids, ids[::-1], ids[:2]]), np.concatenate([mask, mask[::-1], mask[:2]])
    grids = np.concatenate([grids, grids[[1, 2, 0]], grids])
    n0 = 64
    pixels = np.concatenate([pixels, pixels[n0:], pixels[:n0], pixels])
    sampling = SamplingConfig(max_new_tokens=10, temperature=0, num_samples=2)
    single = load_hf(path)
    expected = Sampler(sampling).generate(single, prepare_prompts(single.config, ids, mask, pixels, grids, BUCKETS),
                                          jax.random.key(0))
    sharded = load_hf(path, mesh=mesh)
    out = Sampler(sampling, mesh=mesh).generate(
        sharded, prepare_prompts(sharded.config, ids, mask, pixels, grids, BUCKETS), jax.random.key(0))
    blocks = lambda a: len({shard.index[0].start for shard in a.addressable_shards})  # noqa: E731
    assert blocks(out.tokens) == mesh.shape["data"] * mesh.shape["fsdp"]  # the batch really is split
    first_rows = prepare_prompts(sharded.config, ids[:4], mask[:4], pixels[:int(np.prod(grids[:3], 1).sum())],
                                 grids[:3], BUCKETS)
    vision = parallel.shard_prompts(first_rows, mesh).vision
    assert blocks(vision.patches) == mesh.shape["data"] * mesh.shape["fsdp"]  # so are the prompts' images
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(expected.tokens))
    np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(expected.logprobs), atol=1e-5)
