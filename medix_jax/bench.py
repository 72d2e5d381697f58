"""Benchmarks that time medix_jax against a peer in the same run and print both figures and the ratio.

``python -m medix_jax.bench sampler [--config configs/bench/small.yaml] [--runs 3] [key=value ...]``

Sampler: our compiled sampler vs transformers ``generate`` on the same weights (exported with ``save_hf``) and the
same prompts -- batch 8, one 448x448 image each, 128 new tokens, greedy, KV cache on. Both generate exactly 128
tokens per row (EOS disabled) so that tokens/s compare like for like; timings are medians of ``--runs`` timed runs
after one warm-up run (which includes our compilation).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from medix_jax.config import load_config
from medix_jax.data.image import preprocess_images
from medix_jax.models.qwen2_5_vl import init_model, param_count
from medix_jax.models.qwen2_5_vl.hf_io import save_hf
from medix_jax.rl.sampler import Buckets, Sampler, SamplingConfig, prepare_prompts

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench" / "small.yaml"


def _timed(fn, runs: int) -> tuple[float, list[float]]:
    fn()  # warm-up (compilation for us, allocator and kernels for torch)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def bench_sampler(config: str | None, overrides: list[str], runs: int, batch: int, new_tokens: int,
                  image_size: int) -> dict:
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = load_config(config or DEFAULT_CONFIG, overrides).model
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), np.uint8)) for _ in range(batch)]
    pixels, grids = preprocess_images(images, min_pixels=image_size**2, max_pixels=image_size**2)
    t = cfg.tokens
    n_image = int(np.prod(grids[0])) // cfg.vision.merge_unit
    rows = [[*rng.integers(0, 1000, 12), t.vision_start_token_id, *[t.image_token_id] * n_image,
             t.vision_end_token_id, *rng.integers(0, 1000, 20)] for _ in range(batch)]
    ids = np.array(rows, np.int64)
    mask = np.ones_like(ids)

    # Ours.
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, eos_token_id=-1)
    sampler = Sampler(sampling)
    buckets = Buckets(prompt_lengths=(ids.shape[1],), pixel_rows=(len(pixels),), images=(batch,),
                      rows_per_image=(1024, 4096, 16384))
    prompts = prepare_prompts(cfg, ids, mask, pixels, grids, buckets)
    key = jax.random.key(0)
    ours_out = {}

    def run_ours():
        ours_out["tokens"] = np.asarray(sampler.generate(model, prompts, key).tokens)

    ours_s, ours_times = _timed(run_ours, runs)

    # transformers generate on the same weights.
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).eval()
    hf_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                     pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                     mm_token_type_ids=torch.tensor((ids == t.image_token_id).astype(np.int64)))
    hf_out = {}

    def run_hf():
        with torch.no_grad():
            out = hf.generate(**hf_inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              use_cache=True, pad_token_id=t.pad_token_id)
        hf_out["tokens"] = out[:, ids.shape[1]:].numpy()

    hf_s, hf_times = _timed(run_hf, runs)

    tokens = batch * new_tokens
    agree = float((ours_out["tokens"] == hf_out["tokens"]).mean())
    result = dict(params=param_count(model), prompt_tokens=ids.shape[1], ours_tok_s=tokens / ours_s,
                  hf_tok_s=tokens / hf_s, ratio=hf_s / ours_s, ours_times=ours_times, hf_times=hf_times,
                  token_agreement=agree, device=str(jax.devices()[0].platform), torch_threads=torch.get_num_threads())
    print(f"bench sampler: {result['params'] / 1e6:.1f}M params, batch {batch} x {result['prompt_tokens']} prompt "
          f"tokens ({image_size}x{image_size} image each), {new_tokens} new tokens, greedy; jax on "
          f"{result['device']}, torch {result['torch_threads']} threads")
    print(f"  medix_jax sampler      : {result['ours_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in ours_times)})")
    print(f"  transformers generate  : {result['hf_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in hf_times)})")
    print(f"  ratio (ours / peer)    : {result['ratio']:.2f}x   greedy token agreement {agree:.1%}")
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sampler"])
    parser.add_argument("--config", help="model config (default: configs/bench/small.yaml)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=448)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    bench_sampler(args.config, args.overrides, args.runs, args.batch, args.new_tokens, args.image_size)


if __name__ == "__main__":
    main()
