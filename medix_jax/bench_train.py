"""The update benchmarks of ``python -m medix_jax.bench train`` (see ``bench.py``): one GRPO update step with the
trainer's programs (``rl.programs.StepPrograms``, ``rl.update.minibatch_gradients``) against transformers'
forward + backward, and padded against packed, width-bucketed micro-batches on long-tailed completions."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from medix_jax import parallel
from medix_jax.config import load_config
from medix_jax.data.buckets import Buckets, prepare_prompts
from medix_jax.data.image import preprocess_images
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl import init_model, param_count
from medix_jax.models.qwen_vl.hf_io import save_hf
from medix_jax.models.qwen_vl.vision import rows_per_frame
from medix_jax.rl import grpo
from medix_jax.rl.forward import Completions
from medix_jax.rl.packing import PACK_SAMPLES, width_index
from medix_jax.rl.policy import OptimConfig, make_optimizer
from medix_jax.rl.programs import StepPrograms
from medix_jax.rl.rollout import Group
from medix_jax.rl.update import micro_batches, minibatch_gradients, pack_micro_batch

LONGTAIL_SIGMA = 0.8  # log-std of the long-tail response lengths (--lengths longtail)
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "bench" / "small.yaml"  # bench-small


def timed(fn, runs: int) -> tuple[float, list[float]]:
    """(median seconds, every run's seconds) of ``runs`` calls after one warm-up call (compilation for us,
    allocator and kernels for torch)."""
    fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def longtail_lengths(n: int, max_len: int, rng, sigma: float = LONGTAIL_SIGMA) -> np.ndarray:
    """Response lengths with a long tail: lognormal with median ``max_len / 4`` and log-std ``sigma``, rounded,
    capped at ``max_len``, at least 1."""
    return np.clip(np.round(rng.lognormal(np.log(max_len / 4), sigma, n)), 1, max_len).astype(np.int32)


def text_tokens(cfg) -> int:
    """Random text tokens are drawn below this: 1000, or the lowest special token id of a smaller vocabulary."""
    t = cfg.tokens
    return min(1000, t.image_token_id, t.video_token_id, t.vision_start_token_id, t.vision_end_token_id,
               *t.end_token_ids, t.pad_token_id, t.bos_token_id)


def prompt_batch(cfg, batch: int, image_size: int, rng):
    """``batch`` prompts of random tokens around one random ``image_size`` square image each: (ids, pixels, grids)."""
    from PIL import Image

    images = [Image.fromarray(rng.integers(0, 256, (image_size, image_size, 3), np.uint8)) for _ in range(batch)]
    pixels, grids = preprocess_images(images, min_pixels=image_size**2, max_pixels=image_size**2)
    t = cfg.tokens
    n_image = int(np.prod(grids[0])) // cfg.vision.merge_unit
    high = text_tokens(cfg)
    rows = [[*rng.integers(0, high, 12), t.vision_start_token_id, *[t.image_token_id] * n_image,
             t.vision_end_token_id, *rng.integers(0, high, 20)] for _ in range(batch)]
    return np.array(rows, np.int64), pixels, grids


def matmul_peak_flops(runs: int, n: int = 4096) -> float:
    """This machine's float32 matmul FLOP/s, measured (median of ``runs``)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    dot = jax.jit(lambda x: x @ x)
    seconds, _ = timed(lambda: dot(a).block_until_ready(), runs)
    return 2 * n**3 / seconds


class Setup:
    """The bench-small model, its prompts (one image each, buckets that fit them) and the trainer's programs on a
    one-device mesh, as ``Trainer`` builds them (``micro`` micro-batches, completions of ``new_tokens``)."""

    def __init__(self, config: str | None, overrides: list[str], batch: int, image_size: int, new_tokens: int,
                 micro: int):
        self.cfg = load_config(config or DEFAULT_CONFIG, overrides).model
        self.model = init_model(self.cfg, seed=0)
        self.rng = np.random.default_rng(0)
        self.ids, self.pixels, self.grids = prompt_batch(self.cfg, batch, image_size, self.rng)
        frames, gh, gw = (int(x) for x in self.grids[0])
        self.image_rows = frames * rows_per_frame(self.cfg.vision, gh, gw)
        buckets = Buckets(prompt_lengths=(self.ids.shape[1],), images=(1,), rows_per_image=(self.image_rows,))
        self.host = prepare_prompts(self.cfg, self.ids, np.ones_like(self.ids), self.pixels, self.grids, buckets)
        self.mesh = parallel.make_mesh({}, jax.devices()[:1])
        self.prompts = parallel.shard_prompts(self.host, self.mesh)
        self.graphdef, self.params = nnx.split(self.model, nnx.Param)
        self.programs = self.step_programs(micro, new_tokens)

    def step_programs(self, micro: int, new_tokens: int, widths: tuple[int, ...] | None = None) -> StepPrograms:
        """The trainer's programs for this model (``widths``: its completion width buckets, default the trainer's)."""
        return StepPrograms(self.graphdef, self.params, self.mesh, micro_batches=micro, loss=grpo.LossConfig(),
                            tx=make_optimizer(OptimConfig(), 1), widths=widths,
                            rollout=SamplingConfig(max_new_tokens=new_tokens, temperature=1.0))

    def device_parts(self, completions: Completions, rows_of_samples, rows: int, per_row: int) -> list:
        """Device micro-batches ``(layout, completions, width index)`` of sample indices packed into rows, as the
        trainer packs them (``pack_micro_batch``; sample i continues prompt ``i // G``)."""
        g = len(completions.tokens) // len(self.ids)
        prompt_of = np.arange(len(completions.tokens), dtype=np.int32) // g
        out = []
        for part in rows_of_samples:
            layout, batch, longest = pack_micro_batch(self.host, completions, prompt_of, [part], rows, per_row)
            out.append((jax.tree.map(jnp.asarray, layout), jax.tree.map(jnp.asarray, batch),
                        width_index(longest, self.programs.widths)))
        return out

    def update(self, parts, totals, opt_state, programs: StepPrograms | None = None):
        """One mini-batch update on ``parts`` with the trainer's chain: (new parameters, new state, metrics)."""
        programs = programs or self.programs
        grads, metrics = minibatch_gradients(programs, self.params, self.prompts, list(parts), totals, False)
        copy = jax.tree.map(jnp.copy, (self.params, opt_state))  # apply donates both
        params, opt_state, _ = programs.apply(*copy, grads)
        return jax.block_until_ready(params), opt_state, metrics


def program_flops(setup: Setup, parts, totals) -> float:
    """XLA's FLOPs of the update's programs on ``parts`` (cost analysis of each compiled program, added up)."""
    p = setup.programs
    embedded = p.embed(setup.params, setup.prompts)
    layout, batch, width = parts[0]
    grads, d, _, _ = p.gradients(setup.params, embedded, layout, batch, totals, False, jnp.int32(width))
    total = 0.0
    for fn, args in ((p.embed, (setup.params, setup.prompts)),
                     (p.gradients, (setup.params, embedded, layout, batch, totals, False, jnp.int32(width))),
                     (p.embed_gradients, (setup.params, setup.prompts, d, grads))):
        cost = fn.lower(*args).compile().cost_analysis() or {}
        total += float((cost[0] if isinstance(cost, list) else cost).get("flops", 0.0))
    return total


def bench_train(config: str | None, overrides: list[str], runs: int, batch: int, new_tokens: int,
                image_size: int) -> dict:
    """One GRPO update step on bench-small (G = 1, every completion ``new_tokens`` long, one micro-batch): our
    programs vs transformers' forward + backward of the same weights on the same batch."""

    s = Setup(config, overrides, batch, image_size, new_tokens, 1)
    tokens = s.rng.integers(0, text_tokens(s.cfg), (batch, new_tokens)).astype(np.int32)
    mask = np.ones_like(tokens, bool)
    completions = Completions(tokens, mask, np.zeros(tokens.shape, np.float32),
                              s.rng.standard_normal(batch).astype(np.float32))
    parts = s.device_parts(completions, [[[i] for i in range(batch)]], batch, 1)
    totals = grpo.totals(jnp.asarray(mask))
    opt_state = s.programs.init(s.params)
    flops = program_flops(s, parts, totals)
    ours_s, ours_times = timed(lambda: s.update(parts, totals, opt_state), runs)
    peak = matmul_peak_flops(runs)
    hf_s, hf_times, threads = torch_update(s, tokens, np.asarray(completions.advantages), runs)
    n_tokens = batch * (s.ids.shape[1] + new_tokens)
    result = dict(params=param_count(s.model), tokens=n_tokens, ours_tok_s=n_tokens / ours_s,
                  hf_tok_s=n_tokens / hf_s, ratio=hf_s / ours_s, flops=flops, achieved=flops / ours_s, peak=peak,
                  mfu=flops / ours_s / peak, torch_threads=threads)
    print(f"bench train: {result['params'] / 1e6:.1f}M params, batch {batch} x ({s.ids.shape[1]} prompt + "
          f"{new_tokens} completion) tokens, one {image_size}x{image_size} image each, G=1; jax on "
          f"{jax.devices()[0].platform}, torch {threads} threads")
    print(f"  medix_jax update step  : {result['ours_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in ours_times)}); {flops / 1e12:.2f} TFLOP per step (XLA cost analysis) "
          f"-> {result['achieved'] / 1e9:.1f} GFLOP/s = {result['mfu']:.1%} of the measured matmul peak "
          f"{peak / 1e9:.1f} GFLOP/s")
    print(f"  transformers fwd+bwd   : {result['hf_tok_s']:8.1f} tokens/s  (median of {runs}: "
          f"{', '.join(f'{x:.2f}s' for x in hf_times)})")
    print(f"  ratio (ours / peer)    : {result['ratio']:.2f}x")
    return result


def torch_update(s: Setup, tokens: np.ndarray, advantages: np.ndarray, runs: int) -> tuple[float, list[float], int]:
    """(median seconds, times, torch threads) of transformers' forward + backward of the policy-gradient surrogate on
    the same weights and batch."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(s.model, tmp)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp, dtype=torch.float32).train()
    full = np.concatenate([s.ids, tokens], axis=1)
    hf_inputs = dict(input_ids=torch.tensor(full), attention_mask=torch.ones_like(torch.tensor(full)),
                     pixel_values=torch.tensor(s.pixels), image_grid_thw=torch.tensor(s.grids),
                     mm_token_type_ids=torch.tensor((full == s.cfg.tokens.image_token_id).astype(np.int64)))
    target = torch.tensor(tokens, dtype=torch.long)
    adv = torch.tensor(advantages)
    p = s.ids.shape[1]

    def run_hf():
        hf.zero_grad(set_to_none=True)
        logits = hf(**hf_inputs).logits[:, p - 1: -1].float()
        logp = torch.log_softmax(logits, -1).gather(-1, target[..., None])[..., 0]
        (-(logp.exp() / logp.exp().detach()) * adv[:, None]).mean().backward()

    seconds, times = timed(run_hf, runs)
    return seconds, times, torch.get_num_threads()


def bench_train_longtail(config: str | None, overrides: list[str], runs: int, batch: int, new_tokens: int, samples: int,
                         micro: int, image_size: int) -> dict:
    """One mini-batch update (``micro`` micro-batches, AdamW) on long-tailed completions: full-width strided
    micro-batches of whole groups, one sample per row (the update before length bucketing) vs the trainer's:
    samples packed several to a row (``rl/packing.py``), as few micro-batches of as many rows as those fill, each
    trimmed to its width bucket. Both run the trainer's chain (``rl.update.minibatch_gradients``)."""
    s = Setup(config, overrides, batch, image_size, new_tokens, micro)
    lengths = longtail_lengths(batch * samples, new_tokens, s.rng).reshape(batch, samples)
    columns = np.arange(new_tokens)[None]
    groups = [Group({}, s.rng.integers(0, text_tokens(s.cfg), (samples, new_tokens)).astype(np.int32),
                    columns < lengths[i][:, None], np.zeros((samples, new_tokens), np.float32),
                    s.rng.standard_normal(samples).astype(np.float32), np.zeros(samples, np.float32))
              for i in range(batch)]
    totals = grpo.totals(jnp.asarray(np.concatenate([grp.mask for grp in groups])))
    # sample i * G + s is group i's sample s, continuing prompt i
    completions = Completions(*(np.concatenate([getattr(grp, f) for grp in groups])
                                for f in ("tokens", "mask", "logprobs", "advantages")))
    rows = batch * samples // micro  # a micro-batch's rows: one sample each, padded
    padded = [[[i * samples + j] for i in range(m, batch, micro) for j in range(samples)] for m in range(micro)]
    packed, _ = micro_batches(groups, s.host.attention_mask.sum(1), s.ids.shape[1], micro, s.programs.widths)
    arrangements = {"padded": s.device_parts(completions, padded, rows, 1),
                    "packed": s.device_parts(completions, [[[i * samples + j for i, j in row] for row in part[0]]
                                                           for part in packed], rows, PACK_SAMPLES)}
    # the padded arm at full width only, as before length bucketing: programs with the one width
    full = s.step_programs(micro, new_tokens, widths=(new_tokens,))
    arrangements["padded"] = [(layout, b, 0) for layout, b, _ in arrangements["padded"]]
    results, updated, computed = {}, {}, {}
    for name, parts in arrangements.items():
        programs = full if name == "padded" else s.programs
        opt_state = programs.init(s.params)

        def run(parts=parts, opt_state=opt_state, name=name, programs=programs):
            updated[name] = s.update(parts, totals, opt_state, programs)[0]

        results[name] = timed(run, runs)
        computed[name] = sum(layout.ids.shape[0] * (s.ids.shape[1] + programs.widths[w]) for layout, _, w in parts)
    drift = max(float(jnp.abs(a - b).max()) for a, b in zip(
        jax.tree.leaves(updated["padded"]), jax.tree.leaves(updated["packed"]), strict=True))
    report_longtail(s, results, computed, drift, lengths, arrangements["packed"], micro, samples, image_size, runs)
    ratio = results["padded"][0] / results["packed"][0]
    return dict(ratio=ratio, computed=computed, drift=drift)


def report_longtail(s: Setup, results, computed, drift, lengths, packed, micro, samples, image_size, runs) -> None:
    batch, new_tokens = len(s.ids), s.programs.widths[-1]
    useful = int(batch * samples * s.ids.shape[1] + lengths.sum())
    widths = [s.programs.widths[w] for _, _, w in packed]
    frames, gh, gw = (int(x) for x in s.grids[0])
    print(f"bench train --lengths longtail: {param_count(s.model) / 1e6:.1f}M params, {batch} prompts x G={samples} "
          f"(one {image_size}x{image_size} image, {s.ids.shape[1]} prompt tokens each), {micro} micro-batches, "
          f"completion lengths lognormal (median {new_tokens // 4} = max/4, log-std {LONGTAIL_SIGMA}, capped at "
          f"{new_tokens}): mean {lengths.mean():.0f}, p90 {np.percentile(lengths, 90):.0f}, longest per group "
          f"{sorted(lengths.max(1).tolist())}; packed: {len(widths)} micro-batches of widths {widths}; "
          f"{s.image_rows} vision rows per image ({frames * gh * gw} patches); jax on {jax.devices()[0].platform}")
    for name, (seconds, times) in results.items():
        print(f"  {name:<9} update: {useful / seconds:8.1f} useful tokens/s, {computed[name]} tokens computed "
              f"(median of {runs}: {', '.join(f'{x:.2f}s' for x in times)})")
    ratio = results["padded"][0] / results["packed"][0]
    print(f"  ratio packed / padded: {ratio:.2f}x  (tokens computed: {computed['padded'] / computed['packed']:.2f}x"
          f" fewer); the two updates agree to max|delta param| {drift:.1e}")
