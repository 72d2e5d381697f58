"""``python -m medix_jax.models.qwen_vl [--config FILE] [--hf DIR] [key=value ...]``: one forward pass.

Builds the configured model (random weights, or a Hugging Face checkpoint with ``--hf``) on the configured mesh,
runs a synthetic image+text prompt through it, and prints parameter count, logits shape and timings.
"""

from __future__ import annotations

import time

import numpy as np
from flax import nnx
from PIL import Image

from medix_jax import parallel
from medix_jax.config import load_config
from medix_jax.data.image import preprocess_image
from medix_jax.models.qwen_vl import QwenVL, forward, param_count
from medix_jax.models.qwen_vl.hf_io import load_hf


def main(argv=None) -> None:
    from medix_jax import cli

    parser = cli.parser("medix_jax.models.qwen_vl", __doc__)
    parser.add_argument("--config", help="YAML config (default: the embedded tiny config)")
    parser.add_argument("--hf", help="Hugging Face checkpoint directory to load instead of random weights")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.text.num_layers=2")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    mesh = parallel.make_mesh(vars(cfg.mesh))
    start = time.perf_counter()
    if args.hf:
        model = load_hf(args.hf, dtype=cfg.model.dtype, param_dtype=cfg.model.param_dtype, mesh=mesh,
                        rules=cfg.sharding_rules)
    else:
        model = parallel.init_sharded(lambda: QwenVL(cfg.model, rngs=nnx.Rngs(cfg.seed)), mesh, cfg.sharding_rules)
    print(f"model: {param_count(model):,} parameters on mesh {dict(mesh.shape)} "
          f"({time.perf_counter() - start:.1f}s to build)")

    t = model.config.tokens
    image = Image.fromarray(np.random.default_rng(cfg.seed).integers(0, 255, (224, 308, 3), np.uint8))
    pixels, grid = preprocess_image(image)
    n_image = int(np.prod(grid)) // model.config.vision.merge_unit
    ids = np.array([[1, 2, t.vision_start_token_id] + [t.image_token_id] * n_image + [t.vision_end_token_id, 3, 4]])
    for attempt in ("compile + run", "run"):
        start = time.perf_counter()
        logits = forward(model, ids, None, pixels, grid[None]).block_until_ready()
        print(f"forward ({attempt}): logits {tuple(logits.shape)} {logits.dtype} in {time.perf_counter() - start:.2f}s")


if __name__ == "__main__":
    main()
