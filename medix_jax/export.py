"""Export a training checkpoint to Hugging Face format:
``python -m medix_jax.export --checkpoint RUN_DIR[/STEP] --out DIR [--base HF_DIR] [--dtype D] [--verify]``.

Restores only the policy parameters of the newest (or the given) orbax checkpoint -- the optimizer state is skipped,
not loaded -- with the model config that checkpoint was written with (each checkpoint carries its resolved config,
so a later ``config.yaml`` cannot mislead it), and writes what ``AutoProcessor``, ``AutoModelForImageTextToText``
and vLLM load: sharded safetensors and their index, a hub-style ``config.json``, ``generation_config.json``,
``preprocessor_config.json`` (the run's image settings) and the tokenizer and chat template of ``--base`` (default:
the run's own, ``RUN_DIR/tokenizer``, so a moved or copied run exports alike). ``--verify`` loads the result in
transformers and compares its logits with ours on a probe input (text and an image), in float32, printing max|Δ|.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import jax
import numpy as np


def resolve(checkpoint: str | Path) -> tuple[Path, int]:
    """``RUN_DIR``, ``RUN_DIR/STEP`` or ``RUN_DIR/checkpoints/STEP`` -> (run dir, step)."""
    path = Path(checkpoint)
    if path.name.isdigit() and not (path / "checkpoints").is_dir():
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
        return run_dir, int(path.name)
    steps = sorted(int(p.name) for p in (path / "checkpoints").glob("*") if p.name.isdigit())
    if not steps:
        raise FileNotFoundError(f"no checkpoints under {path / 'checkpoints'}")
    return path, steps[-1]


def run_config(run_dir: Path, meta: dict):
    """The resolved config a checkpoint was written with (``meta["config"]``; ``config.yaml`` for checkpoints that
    predate it)."""
    from medix_jax.config import Config, build, load_config

    if "config" in meta:
        return build(Config, meta["config"])
    return load_config(run_dir / "config.yaml")


def tokenizer_dir(run_dir: Path, meta: dict) -> Path:
    """The run's tokenizer directory: ``RUN_DIR/tokenizer`` (found relative to the run, wherever it now lies); runs
    that predate it name an absolute ``aux_dir``. A ``FileNotFoundError`` saying what to do when there is none."""
    from medix_jax.models.qwen_vl.hf_io import has_tokenizer

    candidates = [Path(run_dir) / meta.get("tokenizer", "tokenizer")]
    if "aux_dir" in meta:
        candidates.append(Path(meta["aux_dir"]))
    for path in candidates:
        if has_tokenizer(path):
            return path
    raise FileNotFoundError(f"no tokenizer for the run {run_dir} (looked in {', '.join(map(str, candidates))}): "
                            "copy the tokenizer files of the model it was trained from into "
                            f"{candidates[0]}, or pass --base HF_DIR")


def restore_model(run_dir: Path, step: int, dtype: str | None = None):
    """(the policy at ``step`` as a model, the checkpoint's meta): parameters only, optimizer state left on disk;
    the model is built from the config stored in that checkpoint."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from medix_jax.models.qwen_vl.model import abstract_model

    directory = run_dir.absolute() / "checkpoints"
    manager = ocp.CheckpointManager(directory)
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    finally:
        manager.close()
    cfg = run_config(run_dir, meta)
    model_cfg = cfg.model if dtype is None else dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype)
    graphdef, params = nnx.split(abstract_model(cfg.model), nnx.Param)
    target = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params)}
    state = ocp.PyTreeCheckpointer().restore(directory / str(step) / "state", args=ocp.args.PyTreeRestore(
        target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    params = state["params"]
    if dtype is not None:  # the model computes in ``dtype`` too (its config is part of the graph)
        graphdef = nnx.split(abstract_model(model_cfg), nnx.Param)[0]
        params = jax.tree.map(lambda a: a.astype(dtype), params)
    return nnx.merge(graphdef, params), meta


def probe_inputs(model_cfg, seed: int = 0):
    """A small text + image input: (input_ids, attention_mask, pixel_values, image_grid_thw) as numpy."""
    from PIL import Image

    from medix_jax.data.image import image_settings, preprocess_image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (56, 84, 3), np.uint8))
    v = model_cfg.vision
    pixels, grid = preprocess_image(image, min_pixels=56 * 56, max_pixels=128 * 128, patch_size=v.patch_size,
                                    merge_size=v.spatial_merge_size, temporal_patch_size=v.temporal_patch_size,
                                    **image_settings(model_cfg.family))
    t = model_cfg.tokens
    n = int(grid.prod()) // model_cfg.vision.merge_unit
    low = min(t.image_token_id, t.video_token_id, t.vision_start_token_id, t.vision_end_token_id)
    text = lambda k: list(rng.integers(0, min(low, model_cfg.text.vocab_size), k))  # noqa: E731
    ids = np.array([[*text(7), t.vision_start_token_id, *[t.image_token_id] * n, t.vision_end_token_id, *text(9)]])
    return ids, np.ones_like(ids), pixels, grid[None]


def verify(model, out_dir: Path) -> float:
    """max|Δ| of logits between our model and transformers' load of ``out_dir`` (both float32)."""
    import torch
    from transformers import AutoModelForImageTextToText

    from medix_jax.models.qwen_vl.model import forward

    ids, mask, pixels, grids = probe_inputs(model.config)
    ours = np.asarray(forward(model, ids, mask, pixels, grids))
    hf = AutoModelForImageTextToText.from_pretrained(out_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    pixel_values=torch.tensor(pixels), image_grid_thw=torch.tensor(grids),
                    mm_token_type_ids=torch.tensor((ids == model.config.tokens.image_token_id).astype(np.int64))
                    ).logits.float().numpy()
    return float(np.abs(ours - theirs).max())


def export(checkpoint: str | Path, out: str | Path, base: str | Path | None = None, dtype: str | None = None,
           check: bool = False) -> tuple[Path, float | None]:
    from medix_jax.data.image import processor_config
    from medix_jax.models.qwen_vl.hf_io import save_hf

    run_dir, step = resolve(checkpoint)
    model, meta = restore_model(run_dir, step)
    base = Path(base) if base else tokenizer_dir(run_dir, meta)
    data = run_config(run_dir, meta).data
    out = save_hf(model, out, base_dir=base, dtype=dtype,
                  image_processor=processor_config(data.min_pixels, data.max_pixels, model.config.vision.patch_size,
                                                   family=model.config.family))
    print(f"exported step {step} of {run_dir} to {out} (tokenizer files from {base})")
    delta = None
    if check:
        fp32, _ = restore_model(run_dir, step, dtype="float32")
        delta = verify(fp32, out)
        print(f"verify: transformers reloads {out}; logits max|Δ| = {delta:.2e} (float32, probe with an image)")
    return out, delta


def main(argv=None) -> int:
    from medix_jax import cli

    parser = cli.parser("medix_jax.export", __doc__)
    parser.add_argument("--checkpoint", required=True, help="RUN_DIR (newest checkpoint) or RUN_DIR/STEP")
    parser.add_argument("--out", required=True, help="output directory for the HF checkpoint")
    parser.add_argument("--base", help="HF directory whose tokenizer/processor files are copied (default: the run's "
                                       "own, RUN_DIR/tokenizer)")
    parser.add_argument("--dtype", help="cast the weights, e.g. bfloat16 (default: as trained)")
    parser.add_argument("--verify", action="store_true", help="reload in transformers and compare logits")
    args = parser.parse_args(argv)
    try:
        cli.check_writable(Path(args.out).absolute().parent, "--out")
        export(args.checkpoint, args.out, args.base, args.dtype, args.verify)
    except (OSError, ValueError) as e:
        return cli.fail("export", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
