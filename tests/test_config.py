"""Typed configuration: presets, YAML, dotted overrides, and errors that name the key."""

import dataclasses
import json
from pathlib import Path

import pytest

from medix_jax.config import Config, ConfigError, load_config, to_dict
from medix_jax.models.qwen2_5_vl.config import model_config_from_hf, model_config_to_hf, preset

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_defaults_are_the_tiny_preset():
    cfg = load_config()
    assert isinstance(cfg, Config) and cfg.model == preset("tiny")


@pytest.mark.parametrize("name", ["tiny.yaml", "qwen2_5_vl_3b.yaml", "qwen2_5_vl_7b.yaml"])
def test_shipped_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.model.text.num_layers >= 2


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  preset: qwen2_5_vl_3b\n  dtype: bfloat16\nmesh:\n  tensor: 2\n")
    cfg = load_config(path, ["model.text.num_layers=2", "mesh.fsdp=4", "model.text.mrope_section=[16,24,24]",
                             "model.remat=true"])
    assert cfg.model.text.num_layers == 2 and cfg.model.text.hidden_size == 2048  # rest of the preset kept
    assert cfg.model.dtype == "bfloat16" and cfg.model.remat is True
    assert cfg.mesh.tensor == 2 and cfg.mesh.fsdp == 4
    assert cfg.model.text.mrope_section == (16, 24, 24)


def test_override_can_switch_preset():
    cfg = load_config(None, ["model.preset=qwen2_5_vl_7b"])
    assert cfg.model.text.hidden_size == 3584


@pytest.mark.parametrize(
    "override,message",
    [
        ("model.text.num_layer=2", "unknown config key 'model.text.num_layer'"),
        ("mesh.pipeline=2", "unknown config key 'mesh.pipeline'"),
        ("model.text.num_layers=two", "model.text.num_layers: expected an integer"),
        ("model.text.num_layers=2.5", "model.text.num_layers: expected an integer"),
        ("model.remat=yes please", "model.remat: expected true or false"),
        ("model.dtype=float8", "dtype 'float8' is not one of"),
        ("model.preset=llama", "model.preset: .*unknown model preset 'llama'"),
        ("model.text.mrope_section=[1,2]", r"model.text.mrope_section: expected 3 items"),
        ("model.text.mrope_section=[1,2,3]", "mrope_section .* must sum to head_dim/2"),
        ("model", "must look like key.sub=value"),
        ("model.text=3", "model.text: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_rollout_and_buckets_sections():
    cfg = load_config(None, ["rollout.temperature=0.6", "rollout.top_p=0.95", "rollout.num_samples=5",
                             "buckets.prompt_lengths=[512,4352]"])
    assert cfg.rollout.temperature == 0.6 and cfg.rollout.num_samples == 5
    assert cfg.buckets.prompt_lengths == (512, 4352)
    with pytest.raises(ConfigError, match="rollout: invalid sampling settings"):
        load_config(None, ["rollout.top_p=1.5"])


def test_rewards_section():
    cfg = load_config(None, ["rewards.judge.url=http://127.0.0.1:8000/v1", "rewards.weights.format=0.2",
                             "rewards.embedding.threshold=0.75", "rewards.judge.max_concurrency=128"])
    assert cfg.rewards.judge.url.endswith("/v1") and cfg.rewards.weights.format == 0.2
    assert cfg.rewards.embedding.threshold == 0.75 and cfg.rewards.weights.llm == pytest.approx(0.5175)
    with pytest.raises(ConfigError, match="unknown config key 'rewards.judge.urll'"):
        load_config(None, ["rewards.judge.urll=x"])


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_preset_from_hf_config_json(tmp_path):
    for name in ("qwen2_5_vl_3b", "qwen2_5_vl_7b", "tiny"):
        (tmp_path / "config.json").write_text(json.dumps(model_config_to_hf(preset(name))))
        assert model_config_from_hf(tmp_path) == preset(name)
    cfg = load_config(None, [f"model.hf_config={tmp_path}", "model.dtype=bfloat16"])
    assert cfg.model == dataclasses.replace(preset("tiny"), dtype="bfloat16")


def test_nested_transformers5_config_json(tiny_checkpoint):
    _, path = tiny_checkpoint  # written by transformers 5.x save_pretrained: text keys under text_config
    cfg = model_config_from_hf(path)
    assert cfg.text.num_layers == 2 and cfg.text.mrope_section == (2, 3, 3) and cfg.vision.depth == 5
    assert cfg.vision.fullatt_block_indexes == (1, 3) and cfg.tokens.image_token_id == 590


def test_to_dict_round_trips():
    cfg = load_config(CONFIGS / "qwen2_5_vl_7b.yaml")
    again = load_config(None, [f"{k}={json.dumps(v)}" for k, v in _flatten(to_dict(cfg))])
    assert again == cfg


def _flatten(tree, prefix=""):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _flatten(value, f"{prefix}{key}.")
        elif not isinstance(value, dict):
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("name, loss", [
    ("qwen2_5_vl_3b_grpo", dict(clip_low=0.2, clip_high=0.3, kl_coef=0.01, aggregation="seq_mean")),
    ("qwen2_5_vl_3b_dapo", dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, aggregation="token_mean")),
    ("qwen2_5_vl_7b_gspo", dict(clip_low=3e-4, clip_high=4e-4, kl_coef=0.0, sequence_ratio=True)),
])
@pytest.mark.parametrize("mesh", ["gpu_8", "tpu_v5p_64", "tpu_v6e_64"])
def test_run_configs_carry_the_reference_hyperparameters(name, loss, mesh):
    root = Path(__file__).resolve().parent.parent / "configs"
    # the checkpoint directory does not exist here: stand in the preset of the same size for its config.json
    size = "qwen2_5_vl_7b" if "7b" in name else "qwen2_5_vl_3b"
    cfg = load_config([root / f"{name}.yaml", root / "mesh" / f"{mesh}.yaml"], [f"model.preset={size}"])
    assert {k: getattr(cfg.train.loss, k) for k in loss} == loss and cfg.train.loss.dual_clip == 3.0
    assert cfg.train.dynamic_filtering == ("dapo" in name)
    o = cfg.train.optim
    assert (o.learning_rate, o.weight_decay, o.grad_clip, o.warmup_steps) == (1e-6, 0.01, 1.0, 0)
    r = cfg.rollout
    assert (r.num_samples, r.temperature, r.top_p, r.max_new_tokens) == (5, 1.0, 1.0, 4096)
    prompts = cfg.data.batch_size * cfg.train.rollout_batches
    assert (prompts, cfg.train.mini_batches, cfg.data.max_prompt_tokens) == (512, 4, 4352)
    assert (cfg.data.min_pixels, cfg.data.max_pixels) == (262144, 4194304)
    assert prompts % (cfg.train.mini_batches * cfg.train.micro_batches) == 0
