"""The architecture configuration every Qwen-VL family shares (``ModelConfig``: vision, text, special tokens,
dtypes), and the parts of Hugging Face's ``config.json`` / ``generation_config.json`` that every family reads and
writes alike. The families' presets and their own config keys: ``qwen2_5_vl.config``, ``qwen3_vl.config``; the
registry over both: ``families``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 3584
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tokens_per_second: int = 2
    # Qwen3-VL only: a learned position-embedding table of side sqrt(num_position_embeddings), interpolated to each
    # image's grid, and the blocks whose outputs feed the decoder's first layers (DeepStack)
    num_position_embeddings: int = 0
    deepstack_visual_indexes: tuple[int, ...] = ()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel row: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 4:
            raise ValueError(f"vision head_dim {self.head_dim} must be a multiple of 4 for the 2-D rotary")
        for name in ("fullatt_block_indexes", "deepstack_visual_indexes"):
            bad = [i for i in getattr(self, name) if not 0 <= i < self.depth]
            if bad:
                raise ValueError(f"vision.{name} {bad} outside 0..{self.depth - 1}")
        side = math.isqrt(self.num_position_embeddings)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"vision.num_position_embeddings {self.num_position_embeddings} is not a square")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    num_layers: int = 28
    num_heads: int = 28
    num_kv_heads: int = 4
    intermediate_size: int = 18944
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    mrope_section: tuple[int, int, int] = (16, 24, 24)
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    head_size: int | None = None  # HF ``head_dim`` where it is not hidden_size / num_heads (Qwen3-VL-30B-A3B: 128)
    qkv_bias: bool = True  # Qwen2: q/k/v projections have biases; Qwen3: none
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k before the rotary
    mrope_interleaved: bool = False  # Qwen3-VL: t/h/w frequencies interleaved (t h w t h w ...), not in blocks
    # Mixture of experts (Qwen3-VL-MoE; 0 = a dense SwiGLU in every layer): every layer routes each token to
    # experts_per_token of num_experts SwiGLU experts of width moe_intermediate_size
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss in training (Switch Transformer eq. 4)

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.head_size is None and self.hidden_size % self.num_heads:
            raise ValueError(f"text.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_experts and not 0 < self.experts_per_token <= self.num_experts:
            raise ValueError(f"text.experts_per_token {self.experts_per_token} must be in 1..{self.num_experts}")
        if self.num_experts and self.moe_intermediate_size < 1:
            raise ValueError("text.moe_intermediate_size must be set for a mixture of experts")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"text.num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"text.mrope_section {self.mrope_section} must sum to head_dim/2 = {self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class TokenIds:
    """Special token ids; taken from the tokenizer/config of the checkpoint, never hard-coded in model code."""

    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    pad_token_id: int = 151643
    # Further end tokens generation stops at (generation_config.json's eos_token_id list; <|endoftext|> for Qwen).
    stop_token_ids: tuple[int, ...] = (151643,)

    @property
    def end_token_ids(self) -> tuple[int, ...]:
        """Every token that ends a generation: ``eos_token_id`` and ``stop_token_ids``."""
        return tuple(dict.fromkeys((self.eos_token_id, *self.stop_token_ids)))


ATTENTION = ("auto", "splash", "cudnn", "xla", "blockwise")
# The architecture, named by its Hugging Face model_type: Qwen2.5-VL (window-attention tower, Qwen2 decoder),
# Qwen3-VL (learned interpolated position embeddings, DeepStack, Qwen3 decoder) and its mixture-of-experts variant
FAMILIES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    family: str = "qwen2_5_vl"
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    tokens: TokenIds = dataclasses.field(default_factory=TokenIds)
    param_dtype: str = "float32"  # storage dtype of the parameters
    dtype: str = "float32"  # matmul / activation dtype; rotary, softmax, norm statistics always fp32
    remat: bool = False  # rematerialise each decoder layer and vision block in the backward pass
    scan_layers: bool = False  # stack layers on a leading axis and run them with nnx.scan (flat compile time)
    # auto: splash on TPU, cuDNN on GPU, blockwise (flash) or einsum on CPU by size (medix_jax/models/attention.py)
    attention: str = "auto"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family {self.family!r} is not one of {FAMILIES}")
        v, t = self.vision, self.text
        if self.family == "qwen2_5_vl":
            if v.window_size % (v.patch_size * v.spatial_merge_size):
                raise ValueError("vision.window_size must be a multiple of patch_size * spatial_merge_size")
            if v.num_position_embeddings or v.deepstack_visual_indexes or t.num_experts or t.qk_norm:
                raise ValueError("qwen2_5_vl has no vision position table, DeepStack, experts or q/k norm: "
                                 "set family to qwen3_vl or qwen3_vl_moe")
        else:
            if not v.num_position_embeddings:
                raise ValueError(f"{self.family}: vision.num_position_embeddings must be set")
            if len(v.deepstack_visual_indexes) > t.num_layers:
                raise ValueError(f"{len(v.deepstack_visual_indexes)} DeepStack features for {t.num_layers} layers")
            if (self.family == "qwen3_vl_moe") != (t.num_experts > 0):
                raise ValueError(f"{self.family} with text.num_experts {t.num_experts}: qwen3_vl_moe is the family "
                                 "with experts")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention {self.attention!r} is not one of {ATTENTION}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {DTYPES}")
        if self.vision.out_hidden_size != self.text.hidden_size:
            raise ValueError(
                f"vision.out_hidden_size {self.vision.out_hidden_size} != text.hidden_size {self.text.hidden_size}"
            )
        ids = {k: v for k, v in dataclasses.asdict(self.tokens).items() if k != "stop_token_ids"}
        ids.update({f"stop_token_ids[{i}]": v for i, v in enumerate(self.tokens.stop_token_ids)})
        too_big = {k: v for k, v in ids.items() if not 0 <= v < self.text.vocab_size}
        if too_big:
            raise ValueError(f"token ids outside the vocabulary of {self.text.vocab_size}: {too_big}")


# ----------------------------------------------------------------------------------------------------------------
# Hugging Face config.json (transformers 4.57 flat layout and 5.x nested ``text_config`` layout).


def hf_text_fields(d: dict[str, Any]) -> dict[str, Any]:
    """The text-model keys: 5.x nests them in ``text_config``; 4.x and hub files keep them at the top level."""
    merged = {k: v for k, v in d.items() if k not in ("vision_config", "text_config")}
    merged.update(d.get("text_config") or {})
    return merged


def end_tokens(checkpoint_dir: str | Path) -> list[int]:
    """The end-of-generation ids a checkpoint declares in ``generation_config.json`` (``eos_token_id``, an id or a
    list; Qwen2.5-VL-Instruct: ``<|im_end|>`` and ``<|endoftext|>``), or [] when it has none."""
    path = Path(checkpoint_dir) / "generation_config.json"
    if not path.is_file():
        return []
    ends = json.loads(path.read_text()).get("eos_token_id")
    return [int(e) for e in (ends if isinstance(ends, list) else [] if ends is None else [ends])]


def token_ids_from_hf(path: Path, d: dict[str, Any], t: dict[str, Any]) -> TokenIds:
    """The special tokens of a ``config.json`` (top level or text keys) and ``generation_config.json``."""
    def token(name: str):
        value = d.get(name, t.get(name))
        if isinstance(value, list):
            raise ValueError(f"{path}: a list {name} is not supported; give the single id")
        return value

    ends = d.get("eos_token_id", t.get("eos_token_id"))
    ends = ends if isinstance(ends, list) else [] if ends is None else [ends]
    ends += end_tokens(path.parent)
    ids = {f.name: token(f.name) for f in dataclasses.fields(TokenIds)
           if f.name not in ("eos_token_id", "stop_token_ids")}
    ids["eos_token_id"] = ends[0] if ends else TokenIds.eos_token_id
    for name in ("pad_token_id", "bos_token_id"):  # often null: fall back to end-of-sequence
        ids[name] = ids[name] if ids[name] is not None else ids["eos_token_id"]
    return TokenIds(**{k: int(v) if v is not None else getattr(TokenIds, k) for k, v in ids.items()},
                    stop_token_ids=tuple(dict.fromkeys(int(e) for e in ends[1:] if e != ends[0])))


# MediX-R1's sampling for generation outside training (its validation rollouts,
# docs/reference.md#reference-rl-settings): temperature 0.6, top-p 0.95, no top-k and no repetition penalty (0 and 1.0
# switch them off in transformers and vLLM alike).
SAMPLING_DEFAULTS = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.0}


def generation_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    """``generation_config.json``: every end token generation stops at (read back by ``model_config_from_hf``), the
    pad and bos tokens, and the reference sampling defaults (``SAMPLING_DEFAULTS``)."""
    ids = cfg.tokens
    return {"eos_token_id": list(ids.end_token_ids), "bos_token_id": ids.bos_token_id,
            "pad_token_id": ids.pad_token_id, **SAMPLING_DEFAULTS}
