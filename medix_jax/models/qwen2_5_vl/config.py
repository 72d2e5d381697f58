"""Qwen2.5-VL presets and its Hugging Face ``config.json`` (flat text keys, transformers 4.57 and 5.x).

Numbers of the real presets are those of the released checkpoints (docs/reference.md#checkpoint-names-and-precision):
Qwen2.5-VL-3B-Instruct and Qwen2.5-VL-7B-Instruct. ``tiny`` is a random-weight model for CPU tests and the embedded
default job.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from medix_jax.models.qwen_vl.config import ModelConfig, TextConfig, TokenIds, VisionConfig

_VISION_7B = VisionConfig(out_hidden_size=3584)

PRESETS: dict[str, ModelConfig] = {
    "qwen2_5_vl_7b": ModelConfig(vision=_VISION_7B, text=TextConfig()),
    "qwen2_5_vl_3b": ModelConfig(
        vision=dataclasses.replace(_VISION_7B, out_hidden_size=2048),
        text=TextConfig(
            vocab_size=151936,
            hidden_size=2048,
            num_layers=36,
            num_heads=16,
            num_kv_heads=2,
            intermediate_size=11008,
            tie_word_embeddings=True,
        ),
    ),
    "tiny": ModelConfig(
        vision=VisionConfig(
            depth=4,
            hidden_size=32,
            num_heads=2,
            intermediate_size=64,
            out_hidden_size=64,
            fullatt_block_indexes=(1, 3),
        ),
        text=TextConfig(
            vocab_size=512,
            hidden_size=64,
            num_layers=2,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            mrope_section=(2, 3, 3),
            tie_word_embeddings=True,
            max_position_embeddings=4096,
        ),
        tokens=TokenIds(
            image_token_id=500,
            video_token_id=501,
            vision_start_token_id=502,
            vision_end_token_id=503,
            bos_token_id=506,
            eos_token_id=505,
            pad_token_id=506,
            stop_token_ids=(506,),
        ),
    ),
}



def text_and_vision_from_hf(d: dict[str, Any], t: dict[str, Any], v: dict[str, Any]) -> tuple[TextConfig,
                                                                                             VisionConfig]:
    """The text and vision configs of a Qwen2.5-VL ``config.json`` ``d`` (``t``: its text keys, ``v``: its
    ``vision_config``)."""
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}
    rope_theta = rope.get("rope_theta", t.get("rope_theta", 1_000_000.0))
    text = TextConfig(
        vocab_size=t["vocab_size"],
        hidden_size=t["hidden_size"],
        num_layers=t["num_hidden_layers"],
        num_heads=t["num_attention_heads"],
        num_kv_heads=t.get("num_key_value_heads", t["num_attention_heads"]),
        intermediate_size=t["intermediate_size"],
        rms_norm_eps=t.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", t.get("tie_word_embeddings", False))),
        max_position_embeddings=t.get("max_position_embeddings", 128000),
    )
    vision_rope = (v.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    vision = VisionConfig(
        depth=v["depth"],
        hidden_size=v["hidden_size"],
        num_heads=v["num_heads"],
        intermediate_size=v["intermediate_size"],
        out_hidden_size=v.get("out_hidden_size", text.hidden_size),
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", (7, 15, 23, 31))),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        rope_theta=float(vision_rope),
        tokens_per_second=v.get("tokens_per_second", 2),
    )
    return text, vision


def model_config_to_hf(cfg: ModelConfig, torch_dtype: str) -> dict[str, Any]:
    """Hub-style ``config.json`` (flat text keys + ``rope_scaling``/``rope_theta``): loads in transformers 4.57 and
    5.x."""
    t, v, ids = cfg.text, cfg.vision, cfg.tokens
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        "attention_dropout": 0.0,
        "hidden_act": "silu",
        "hidden_size": t.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": t.intermediate_size,
        "max_position_embeddings": t.max_position_embeddings,
        "max_window_layers": t.num_layers,
        "num_attention_heads": t.num_heads,
        "num_hidden_layers": t.num_layers,
        "num_key_value_heads": t.num_kv_heads,
        "rms_norm_eps": t.rms_norm_eps,
        "rope_theta": t.rope_theta,
        "rope_scaling": {"type": "mrope", "rope_type": "default", "mrope_section": list(t.mrope_section)},
        "sliding_window": t.max_position_embeddings,
        "use_sliding_window": False,
        "tie_word_embeddings": t.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "use_cache": True,
        "vocab_size": t.vocab_size,
        **{k: v for k, v in dataclasses.asdict(ids).items() if k != "stop_token_ids"},
        "vision_config": {
            "depth": v.depth,
            "hidden_act": "silu",
            "hidden_size": v.hidden_size,
            "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads,
            "in_chans": v.in_channels,
            "in_channels": v.in_channels,
            "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size,
            "spatial_patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size,
            "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes),
            "tokens_per_second": v.tokens_per_second,
            "model_type": "qwen2_5_vl",
        },
    }
