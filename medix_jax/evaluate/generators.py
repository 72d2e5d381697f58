"""Generators: what answers the evaluation's questions, greedily. ``SamplerGenerator`` (our in-JAX sampler),
``OpenAIGenerator`` (any OpenAI-compatible endpoint), and ``make_generator``, which builds one from a ``--model``
(a training run, one step of it, an HF directory or ``openai:URL``; ``model_kind`` checks it without loading)."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from medix_jax.data.prompts import prompt_ids, token_ids, user_content
from medix_jax.evaluate.tasks import Item
from medix_jax.rewards.judge import JudgeConfig, chat, make_client

# Greedy, stated in full: a server fills what a request leaves out from the model's generation_config.json (vLLM
# does, repetition_penalty and top_k included, even at temperature 0). temperature 0 itself is sent by ``chat``.
GREEDY = {"top_p": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}  # standard OpenAI parameters
GREEDY_VLLM = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}  # vLLM's extensions, at their "off" values


class OpenAIGenerator:
    """Any OpenAI-compatible chat endpoint (vLLM, TGI, a hosted baseline); images as base64 data URLs. Every request
    carries temperature 0 and ``GREEDY`` (with ``vllm_params``, also ``GREEDY_VLLM``: off for a server that rejects
    parameters it does not know)."""

    def __init__(self, url: str, model: str, max_tokens: int, concurrency: int = 16, prompt: str | None = None,
                 vllm_params: bool = True):
        self.cfg = JudgeConfig(url=url, model=model, max_concurrency=concurrency, timeout_s=600.0)
        self.max_tokens, self.prompt = max_tokens, prompt
        self.stats: Counter[str] = Counter()
        self.sampling = {**GREEDY, **(GREEDY_VLLM if vllm_params else {})}

    def generate(self, items: list[Item]) -> list[str | None]:
        """Greedy completions, requested concurrently; None for an item whose request failed."""
        async def run():
            client, semaphore = make_client(self.cfg), asyncio.Semaphore(self.cfg.max_concurrency)
            try:
                return await asyncio.gather(*(chat(client, semaphore, self.cfg, [self.message(it)], self.max_tokens,
                                                   dict(self.sampling), self.stats, []) for it in items))
            finally:
                await client.close()
        return asyncio.run(run())

    def message(self, item: Item) -> dict:
        """The user turn: the template (``prompt``, else the item's) as text parts, the images at ``<image>``."""
        images = iter(item.images)
        parts = [p if p["type"] == "text" else
                 {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(next(images))
                                                     .decode()}}
                 for p in user_content(self.prompt or item.prompt, item.question, len(item.images))]
        return {"role": "user", "content": parts}


class SamplerGenerator:
    """Our model through the in-JAX sampler, greedy. ``prompt`` (a user-turn template) overrides each item's own;
    with ``mesh`` the prompts are sharded over its batch axes as the model's parameters are laid out on it (a chunk
    is padded with copies of its first prompt to a multiple of this process's share of data x fsdp)."""

    def __init__(self, model, tokenizer, max_tokens: int, prompt: str | None = None,
                 min_pixels: int = 262144, max_pixels: int = 4194304, mesh=None):
        from medix_jax.generate.sampler import Sampler
        from medix_jax.generate.sampling import SamplingConfig

        self.model, self.tokenizer, self.prompt, self.mesh = model, tokenizer, prompt, mesh
        self.min_pixels, self.max_pixels = min_pixels, max_pixels
        self.sampler = Sampler(SamplingConfig(max_new_tokens=max_tokens, temperature=0.0), mesh)

    def prepare(self, item: Item) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """An item's prompt token ids, pixel rows (None without images) and image grids."""
        from medix_jax.data.image import decode_image, image_settings, preprocess_images, to_rgb

        v = self.model.config.vision
        pixels, grids = None, np.zeros((0, 3), np.int64)
        if item.images:
            pixels, grids = preprocess_images(
                [to_rgb(decode_image(b)) for b in item.images], min_pixels=self.min_pixels,
                max_pixels=self.max_pixels, patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                temporal_patch_size=v.temporal_patch_size, **image_settings(self.model.config.family))
        tokens = [int(np.prod(g)) // v.merge_unit for g in grids]
        ids = prompt_ids(self.tokenizer, self.prompt or item.prompt, item.question, tokens,
                         self.model.config.tokens.image_token_id)
        return ids, pixels, grids

    def generate(self, items: list[Item]) -> list[str | None]:
        """Greedy completions; an item whose image or prompt cannot be prepared gets None (reported, not fatal).
        Shapes are this chunk's own (rounded up to powers of two for the text and pixel rows)."""
        import jax

        from medix_jax import parallel
        from medix_jax.data.buckets import Buckets, prepare_prompts
        from medix_jax.models.qwen_vl.vision import rows_per_frame

        cfg = self.model.config
        prepared = {}
        for k, item in enumerate(items):
            try:
                prepared[k] = self.prepare(item)
            except ValueError as e:  # BadImage, aspect ratio, special tokens in the question, ...
                print(f"evaluate: cannot prepare sample {item.id}: {e}", file=sys.stderr)
        results: list[str | None] = [None] * len(items)
        if not prepared:
            return results
        entries = list(prepared.values())
        entries += entries[:1] * (-len(entries) % self.rows_multiple())  # padding rows, their outputs dropped
        ids = [x for x, _, _ in entries]
        width = max(len(x) for x in ids)
        input_ids = np.full((len(ids), width), cfg.tokens.pad_token_id, np.int32)
        mask = np.zeros_like(input_ids, bool)
        for r, x in enumerate(ids):
            input_ids[r, :len(x)], mask[r, :len(x)] = x, True
        rows = [p for _, p, _ in entries if p is not None]
        grids = np.concatenate([g for _, _, g in entries]) if rows else None
        pow2 = lambda n: 2 ** int(np.ceil(np.log2(max(n, 1))))  # noqa: E731
        buckets = Buckets(prompt_lengths=(pow2(width),),
                          images=(max([len(g) for _, p, g in entries if p is not None], default=1),),
                          rows_per_image=(max([rows_per_frame(cfg.vision, h, w) for _, h, w in grids])
                                          if grids is not None else 1,))
        prompts = prepare_prompts(cfg, input_ids, mask, np.concatenate(rows) if rows else None, grids, buckets)
        out = jax.tree.map(parallel.local_rows, self.sampler.generate(self.model, prompts, jax.random.key(0)))
        for k, tokens, n in zip(prepared, out.tokens[:len(prepared)], out.lengths[:len(prepared)], strict=True):
            results[k] = self.tokenizer.decode(tokens[:n], skip_special_tokens=True)
        return results

    def rows_multiple(self) -> int:
        """This process's share of the mesh's batch axes (1 without a mesh): a chunk's rows are a multiple of it."""
        if self.mesh is None:
            return 1
        import jax

        from medix_jax.parallel import DEFAULT_RULES

        axes = DEFAULT_RULES["batch"]
        axes = (axes,) if isinstance(axes, str) else axes or ()
        return max(1, math.prod(dict(self.mesh.shape).get(a, 1) for a in axes) // jax.process_count())


MODEL_FIX = ("give --model a training run (the train.run_dir of python -m medix_jax.train), an HF directory "
             "(python -m medix_jax.export --checkpoint RUN_DIR --out HF_DIR) or openai:URL with --model-name")


def model_kind(spec: str, model_name: str | None = None) -> str:
    """``"openai"``, ``"run"`` (a training run, or one step of it: ``RUN_DIR/STEP``) or ``"hf"``; checked without
    loading anything. A ``FileNotFoundError`` (one line: the path, what is wrong, the command that fixes it) when
    it is none of them, a ValueError for ``openai:`` without a model name."""
    if spec.startswith("openai:"):
        if not model_name:
            raise ValueError(f"--model {spec} needs --model-name (the name the server serves the model under)")
        return "openai"
    path = Path(spec)
    if path.name.isdigit() and not (path / "checkpoints").is_dir():  # RUN_DIR/STEP or RUN_DIR/checkpoints/STEP
        run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        if (run / "checkpoints").is_dir():
            steps = sorted(int(p.name) for p in (run / "checkpoints").glob("*") if p.name.isdigit())
            if int(path.name) not in steps:
                raise FileNotFoundError(f"model {spec}: the run {run} has no checkpoint {int(path.name)} (it has "
                                        f"{', '.join(map(str, steps)) or 'none'}): give --model {run} (its newest) "
                                        "or RUN_DIR/STEP of a step it has")
            return "run"
    if not path.exists():
        raise FileNotFoundError(f"model {spec} not found (no such file or directory): {MODEL_FIX}")
    if (path / "checkpoints").is_dir():
        from medix_jax.export import resolve

        try:
            resolve(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"model {spec}: a training run without a checkpoint yet ({path / 'checkpoints'} "
                                    f"is empty): train it first (python -m medix_jax.train train.run_dir={spec}) or "
                                    f"{MODEL_FIX}") from None
        return "run"
    if path.is_dir() and any(path.glob("*.safetensors")):
        return "hf"
    raise FileNotFoundError(f"model {spec} is neither a training run (no checkpoints/) nor an HF directory (no "
                            f"*.safetensors): {MODEL_FIX}")


def model_label(spec: str, model_name: str | None = None) -> str:
    """A short, file-name-safe name for a model: the served model's (its last path part), else the run's or HF
    directory's name (``RUN-stepN`` for one step of a run)."""
    if spec.startswith("openai:"):
        name = Path(str(model_name).rstrip("/")).name or "openai"
    else:
        path = Path(spec).absolute()
        if path.name.isdigit():
            run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
            name = f"{run.name}-step{path.name}"
        else:
            name = path.name
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "model"


def _pixel_bounds(hf_dir: Path) -> tuple[int, int]:
    """An HF directory's image pixel bounds (``preprocessor_config.json``, as an export writes it), else the
    reference's (docs/reference.md#reference-rl-settings)."""
    bounds = [262144, 4194304]
    try:
        config = json.loads((hf_dir / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        return bounds[0], bounds[1]
    size = config.get("size") if isinstance(config.get("size"), dict) else {}
    for k, (key, alt) in enumerate((("min_pixels", "shortest_edge"), ("max_pixels", "longest_edge"))):
        value = config.get(key, size.get(alt))
        if isinstance(value, int) and value > 0:
            bounds[k] = value
    return bounds[0], bounds[1]


def make_generator(spec: str, model_name: str | None, max_tokens: int, prompt: str | None = None,
                   vllm_params: bool = True) -> OpenAIGenerator | SamplerGenerator:
    """``openai:URL`` (with ``model_name``), a training run (its newest checkpoint, or ``RUN_DIR/STEP``) or an HF
    directory. A training run is rebuilt from the config stored in its checkpoint, with the run's tokenizer, and asked
    with the prompt and pixel bounds it was trained with; ``prompt`` overrides that and each task kind's template.
    ``vllm_params``: an endpoint is also sent vLLM's greedy ``top_k`` / ``min_p`` / ``repetition_penalty``."""
    kind = model_kind(spec, model_name)
    if kind == "openai":
        assert model_name is not None  # model_kind refuses openai: without one
        return OpenAIGenerator(spec[len("openai:"):], model_name, max_tokens, prompt=prompt, vllm_params=vllm_params)
    from transformers import AutoTokenizer

    path = Path(spec)
    if kind == "run":  # the checkpoint's own config (model, data.prompt, pixels) and the run's tokenizer
        from medix_jax.export import resolve, restore_model, run_config, tokenizer_dir

        run_dir, step = resolve(path)
        model, meta = restore_model(run_dir, step)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir(run_dir, meta))
        data = run_config(run_dir, meta).data
        return SamplerGenerator(model, tokenizer, max_tokens, prompt or data.prompt, data.min_pixels, data.max_pixels)
    from medix_jax.models.qwen_vl.hf_io import load_hf

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = load_hf(path, tokens=token_ids(tokenizer, path))
    return SamplerGenerator(model, tokenizer, max_tokens, prompt, *_pixel_bounds(path))
