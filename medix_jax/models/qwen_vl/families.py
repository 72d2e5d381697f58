"""The Qwen-VL families by name: the presets of every family, and ``config.json`` read and written by the family's
own module (``model_type``: ``qwen2_5_vl``, ``qwen3_vl``, ``qwen3_vl_moe``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medix_jax.models.qwen2_5_vl import config as qwen2_5_vl
from medix_jax.models.qwen3_vl import config as qwen3_vl
from medix_jax.models.qwen_vl.config import FAMILIES, ModelConfig, hf_text_fields, token_ids_from_hf

PRESETS: dict[str, ModelConfig] = {**qwen2_5_vl.PRESETS, **qwen3_vl.PRESETS}


def preset(name: str) -> ModelConfig:
    """A named architecture of any family (``PRESETS``)."""
    if name not in PRESETS:
        raise KeyError(f"unknown model preset {name!r} (known: {', '.join(sorted(PRESETS))})")
    return PRESETS[name]


def _family(family: str):
    return qwen2_5_vl if family == "qwen2_5_vl" else qwen3_vl


def model_config_from_hf(path: str | Path, **overrides: Any) -> ModelConfig:
    """Read a Hugging Face Qwen-VL ``config.json`` (file or directory) into a ``ModelConfig``; end tokens also
    come from ``generation_config.json`` beside it."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    with path.open() as f:
        d = json.load(f)
    family = d.get("model_type") or "qwen2_5_vl"
    if family not in FAMILIES:
        raise ValueError(f"{path}: model_type {family!r} is not one of {FAMILIES}")
    t = hf_text_fields(d)
    text, vision = _family(family).text_and_vision_from_hf(d, t, d.get("vision_config") or {})
    return ModelConfig(**{"family": family, "vision": vision, "text": text,
                          "tokens": token_ids_from_hf(path, d, t), **overrides})


def model_config_to_hf(cfg: ModelConfig, torch_dtype: str | None = None) -> dict[str, Any]:
    """The hub-style ``config.json`` of ``cfg``'s family (as its released checkpoints lay it out)."""
    return _family(cfg.family).model_config_to_hf(cfg, torch_dtype or cfg.param_dtype)
