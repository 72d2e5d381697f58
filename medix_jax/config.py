"""Typed configuration: frozen dataclasses, YAML files, dotted command-line overrides.

A config is built from (in order) the dataclass defaults, a YAML file and ``key.sub=value`` overrides. Every key is
checked against the dataclass it lands in: an unknown key or a value of the wrong type is a ``ConfigError`` that
names the dotted key. Values on the command line are parsed as YAML scalars (``2`` is an int, ``true`` a bool,
``[16,24,24]`` a list).

The ``model`` section may name a base with ``preset: NAME`` (see ``models.qwen_vl.families.PRESETS``) or
``hf_config: PATH`` (a Hugging Face ``config.json`` or its directory); other keys in the section override the base.
A top-level ``checkpoint: DIR`` (weights and tokenizer to start from) implies ``model.hf_config: DIR``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from medix_jax.data.buckets import Buckets
from medix_jax.data.pipeline import DataConfig
from medix_jax.generate.sampling import SamplingConfig
from medix_jax.models.qwen_vl.config import ModelConfig
from medix_jax.models.qwen_vl.families import model_config_from_hf, preset
from medix_jax.parallel import DistributedConfig
from medix_jax.rewards.pool import RewardsConfig
from medix_jax.rl.sft import SFTConfig
from medix_jax.rl.trainer import TrainConfig


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh: the product of the axis sizes must equal the device count; one size may be -1 ("the rest")."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1
    dcn_data: int = 1  # across slices / nodes (data-center network)
    dcn_fsdp: int = 1
    dcn_tensor: int = 1


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """The held-out evaluation the training job runs at the end of its supervised stage and of GRPO (``train.py``,
    through ``medix_jax.evaluate``): greedy generations on ``split`` of ``data.data_dir``, scored by the run's
    rewards."""

    split: str | None = "test"  # None: no evaluation
    max_samples: int | None = None  # the first N records of the split (None: all)
    batch_size: int = 64  # prompts generated together

    def __post_init__(self):
        if self.batch_size < 1 or (self.max_samples is not None and self.max_samples < 1):
            raise ValueError(f"eval: batch_size and max_samples must be >= 1 ({self})")


@dataclasses.dataclass(frozen=True)
class Config:
    """The whole job's configuration; sections are added by the subsystems that own them."""

    model: ModelConfig = dataclasses.field(default_factory=lambda: preset("tiny"))
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    distributed: DistributedConfig = dataclasses.field(default_factory=DistributedConfig)  # parallel.py
    data: DataConfig = dataclasses.field(default_factory=DataConfig)  # data/pipeline.py
    sft: SFTConfig = dataclasses.field(default_factory=SFTConfig)  # supervised stage before GRPO (rl/sft.py)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)  # rl/trainer.py
    rollout: SamplingConfig = dataclasses.field(default_factory=SamplingConfig)  # policy sampling (rl/sampler.py)
    buckets: Buckets = dataclasses.field(default_factory=Buckets)  # static shapes of prompts and pixels
    rewards: RewardsConfig = dataclasses.field(default_factory=RewardsConfig)  # rewards/pool.py
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)  # held-out evaluation after each stage
    # Logical axis name -> mesh axis (or list of mesh axes, or null for replicated); merged over parallel.DEFAULT_RULES.
    sharding_rules: dict[str, Any] = dataclasses.field(default_factory=dict)
    # A local Hugging Face checkpoint directory: initial weights and tokenizer (and, unless the model section names
    # a preset or hf_config, the architecture). None: random weights and a tokenizer trained for the tiny preset.
    checkpoint: str | None = None
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------------
# Building dataclasses from plain data, with type checks.


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {hint}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {list(args)}")
        return value
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for {hint.__name__}, got {type(value).__name__}")
        return build(hint, value, key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
        return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return {str(k): _coerce(v, args[1] if args else Any, f"{key}.{k}") for k, v in value.items()}
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str):  # PyYAML (YAML 1.1) reads `1e-6` as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported config type {hint}")


def build(cls: type, data: dict[str, Any], key: str = "", base: Any = None) -> Any:
    """Build dataclass ``cls`` from ``data``; fields missing from ``data`` come from ``base`` (or the defaults)."""
    if cls is ModelConfig and base is None:
        data = dict(data)
        base = _model_base(data, key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{key}." if key else ""
        raise ConfigError(f"unknown config key '{where}{unknown[0]}' (known here: {', '.join(sorted(fields))})")
    values = {}
    for name, value in data.items():
        sub = f"{key}.{name}" if key else name
        hint = hints[name]
        nested_base = getattr(base, name) if base is not None else None
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, dict):
            values[name] = build(hint, value, sub, base=nested_base)
        else:
            values[name] = _coerce(value, hint, sub)
    try:
        return dataclasses.replace(base, **values) if base is not None else cls(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{key or cls.__name__}: {e}") from e


def _model_base(data: dict[str, Any], key: str) -> ModelConfig:
    name = data.pop("preset", None)
    hf_path = data.pop("hf_config", None)
    if name is not None and hf_path is not None:
        raise ConfigError(f"{key}: give either 'preset' or 'hf_config', not both")
    if hf_path is not None:
        return model_config_from_hf(hf_path)
    try:
        return preset(name or "tiny")
    except KeyError as e:
        raise ConfigError(f"{key}.preset: {e.args[0]}") from None


def to_dict(cfg: Any) -> Any:
    """Plain-data form of a config (YAML-serialisable, with tuples as lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ----------------------------------------------------------------------------------------------------------------
# YAML files and dotted overrides.


def parse_override(item: str) -> tuple[list[str], Any]:
    """``'model.text.num_layers=2'`` -> (['model', 'text', 'num_layers'], 2)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    dotted, raw = item.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r} has an empty key part")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {dotted}: cannot parse value {raw!r}: {e}") from None
    return parts, value


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            section = ".".join(parts[: i + 1])
            raise ConfigError(f"override {'.'.join(parts)}: '{section}' is not a section")
        node = child
    node[parts[-1]] = value


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    with path.open() as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _leaves(tree: dict, prefix: str = "") -> dict[str, Any]:
    """``{dotted key: value}`` of a nested mapping's non-mapping values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _merge(base: dict, top: dict) -> dict:
    """``top`` over ``base``, section by section."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_config(path: str | Path | list | tuple | None = None, overrides: list[str] | tuple[str, ...] = (),
                cls: type = Config) -> Any:
    """Defaults <- YAML file(s) (e.g. a run config, then a mesh preset) <- dotted overrides, validated into ``cls``.
    Files add to each other: a file that sets a key an earlier file set to another value is an error (a mesh preset
    must not silently change the run's settings); a dotted override is how to change one on purpose."""
    paths = [] if path is None else [path] if isinstance(path, str | Path) else list(path)
    raw: dict[str, Any] = {}
    origin: dict[str, Path] = {}
    overridden = {item.split("=", 1)[0].strip() for item in overrides}
    for p in paths:
        layer = load_yaml(p)
        ours = _leaves(raw)
        for key, value in _leaves(layer).items():
            if key in ours and ours[key] != value and key not in overridden:
                raise ConfigError(f"{p} sets {key}: {value!r}, but {origin[key]} already set {ours[key]!r}: layered "
                                  f"config files may not change each other's values; to override on purpose, "
                                  f"pass {key}=VALUE on the command line")
            origin.setdefault(key, Path(p))
        raw = _merge(raw, layer)
    for item in overrides:
        parts, value = parse_override(item)
        _set_dotted(raw, parts, value)
    model = raw.get("model")
    if not isinstance(model, dict):
        model = {}
    if raw.get("checkpoint") and "preset" not in model and "hf_config" not in model:
        raw["model"] = {**model, "hf_config": raw["checkpoint"]}  # the checkpoint's own architecture
    return build(cls, raw)
