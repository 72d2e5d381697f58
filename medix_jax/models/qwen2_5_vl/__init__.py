"""Flax NNX port of Qwen2.5-VL (vision tower with window attention, Qwen2 decoder with M-RoPE)."""

from medix_jax.models.qwen2_5_vl.config import ModelConfig, TextConfig, TokenIds, VisionConfig, preset
from medix_jax.models.qwen2_5_vl.model import (
    ModelInputs,
    Qwen2_5_VL,
    abstract_model,
    forward,
    init_model,
    param_count,
    prepare_inputs,
)

__all__ = [
    "ModelConfig", "TextConfig", "TokenIds", "VisionConfig", "preset", "ModelInputs", "Qwen2_5_VL",
    "abstract_model", "forward", "init_model", "param_count", "prepare_inputs",
]
