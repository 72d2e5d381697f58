"""Qwen-VL models in Flax NNX: the code every family shares (decoder, M-RoPE, vision inputs, the model class `QwenVL`,
Hugging Face I/O); the families' own parts live in `models.qwen2_5_vl` and `models.qwen3_vl`."""

from medix_jax.models.qwen_vl.config import ModelConfig, TextConfig, TokenIds, VisionConfig
from medix_jax.models.qwen_vl.families import preset
from medix_jax.models.qwen_vl.model import (
    ModelInputs,
    QwenVL,
    abstract_model,
    forward,
    init_model,
    param_count,
    prepare_inputs,
)

__all__ = [
    "ModelConfig", "TextConfig", "TokenIds", "VisionConfig", "preset", "ModelInputs", "QwenVL",
    "abstract_model", "forward", "init_model", "param_count", "prepare_inputs",
]
