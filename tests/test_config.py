"""Typed configuration: presets, YAML, dotted overrides, and errors that name the key."""

import dataclasses
import json
import re
from pathlib import Path

import pytest

from medix_jax.config import Config, ConfigError, load_config, to_dict
from medix_jax.models.qwen_vl.config import generation_config_to_hf
from medix_jax.models.qwen_vl.families import model_config_from_hf, model_config_to_hf, preset

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
        (tmp_path / "generation_config.json").write_text(json.dumps(generation_config_to_hf(preset(name))))
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


# The reference runs as docs/reference.md#reference-run-scripts records them (MediX-R1 run scripts and the EasyR1
# defaults they inherit, docs/reference.md#reference-rl-settings), written down here independently of configs/*.yaml.
REFERENCE_LOSS = {
    "qwen2_5_vl_3b_grpo": dict(clip_low=0.2, clip_high=0.3, kl_coef=0.01, aggregation="token_mean",
                               sequence_ratio=False),
    "qwen2_5_vl_3b_dapo": dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, aggregation="token_mean",
                               sequence_ratio=False),
    "qwen2_5_vl_7b_gspo": dict(clip_low=3e-4, clip_high=4e-4, kl_coef=0.0, aggregation="seq_mean",
                               sequence_ratio=True),
    **{f"qwen3_vl_{size}_dapo": dict(clip_low=0.2, clip_high=0.28, kl_coef=0.0, aggregation="token_mean",
                                     sequence_ratio=False) for size in ("2b", "8b", "30b_a3b")},
    "qwen3_vl_8b_grpo": dict(clip_low=0.2, clip_high=0.3, kl_coef=0.01, aggregation="token_mean",
                             sequence_ratio=False),
}
# mesh preset -> (model size, data, fsdp, tensor, micro-batches of a 128-prompt update), docs/scaling.md
MESH_PRESETS = {
    "gpu_8_3b": ("2b 3b", 1, 8, 1, 16), "gpu_8_7b": ("7b 8b", 1, 4, 2, 32),
    "tpu_v5p_64_3b": ("2b 3b", 1, -1, 1, 4), "tpu_v5p_64_7b": ("7b 8b", 1, 16, 2, 8),
    "tpu_v5p_64_30b": ("30b", 1, 16, 2, 8),
    "tpu_v6e_64": ("3b 7b", 1, 16, 4, 8),
}


def _run_config(name, *more, overrides=()):
    # the checkpoint directory does not exist here: stand in the preset of the same model for its config.json
    # (qwen2_5_vl_3b_grpo -> qwen2_5_vl_3b, qwen3_vl_30b_a3b_dapo -> qwen3_vl_30b_a3b)
    return load_config([CONFIGS / f"{name}.yaml", *more], [f"model.preset={name.rsplit('_', 1)[0]}", *overrides])


def test_every_run_config_is_checked_against_the_reference():
    runs = {p.stem for p in CONFIGS.glob("*.yaml") if p.stem.endswith(("_grpo", "_dapo", "_gspo"))}
    assert runs == set(REFERENCE_LOSS)


@pytest.mark.parametrize("name", sorted(REFERENCE_LOSS))
def test_run_configs_carry_the_reference_settings(name):
    cfg = _run_config(name)
    t = cfg.train
    assert {k: getattr(t.loss, k) for k in REFERENCE_LOSS[name]} == REFERENCE_LOSS[name]
    assert (t.loss.dual_clip, t.loss.scale_by_std, t.loss.eps) == (3.0, True, 1e-6)
    o = t.optim
    assert (o.learning_rate, o.weight_decay, o.b1, o.b2, o.grad_clip, o.warmup_steps, o.schedule) == (
        1e-6, 0.01, 0.9, 0.999, 1.0, 0, "constant")
    r = cfg.rollout
    assert (r.num_samples, r.temperature, r.top_p, r.top_k, r.max_new_tokens) == (5, 1.0, 1.0, 0, 4096)
    assert cfg.data.batch_size * t.rollout_batches == 512 and 512 // t.mini_batches == 128 and t.ppo_epochs == 1
    assert (cfg.data.max_prompt_tokens, cfg.data.min_pixels, cfg.data.max_pixels) == (4352, 262144, 4194304)
    assert t.recompute_old_logprobs is True  # the reference's actor always recomputes the old log-probs
    # bf16 weights and a bf16 AdamW (adamw_bf16) in the reference's 30B script only; float32 weights elsewhere
    bf16 = name == "qwen3_vl_30b_a3b_dapo"
    assert (cfg.model.dtype, cfg.model.param_dtype, o.state_dtype, t.steps) == (
        "bfloat16", "bfloat16" if bf16 else "float32", "bfloat16" if bf16 else "float32", 200)
    # our fix for thinking models (the modality tag after <think>...</think>) on for the Thinking model alone
    assert cfg.rewards.rules.modality_after_think is (name == "qwen3_vl_30b_a3b_dapo")
    if "dapo" in name:  # online filtering: 0.01 < mean overall reward < 0.99, 128-prompt tries, at most 20
        assert t.dynamic_filtering and (t.filter_rule, t.filter_low, t.filter_high) == ("mean_band", 0.01, 0.99)
        assert (cfg.data.batch_size, t.max_tries) == (128, 20)
    else:
        assert not t.dynamic_filtering


@pytest.mark.parametrize("name", sorted(REFERENCE_LOSS))
def test_documented_commands_give_the_documented_mesh(name):
    """The command in each run config's header, with its mesh preset, ends with that preset's mesh and micro-batch
    count; every preset for the model size divides the update into whole prompts."""
    documented = re.findall(r"--config configs/mesh/(\w+)\.yaml", (CONFIGS / f"{name}.yaml").read_text())
    assert len(documented) == 1
    size = name.split("_vl_")[1].split("_")[0]  # 3b, 30b
    for preset_name, (sizes, data, fsdp, tensor, micro) in MESH_PRESETS.items():
        if size not in sizes.split():
            assert preset_name != documented[0]
            continue
        cfg = _run_config(name, CONFIGS / "mesh" / f"{preset_name}.yaml")
        assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, cfg.train.micro_batches) == (data, fsdp, tensor, micro)
        assert 128 % micro == 0


def test_layered_files_may_not_change_each_others_values(tmp_path):
    run, preset_file = tmp_path / "run.yaml", tmp_path / "mesh.yaml"
    run.write_text("train:\n  micro_batches: 64\n  steps: 7\n")
    preset_file.write_text("mesh:\n  fsdp: 8\ntrain:\n  micro_batches: 16\n")
    with pytest.raises(ConfigError, match=r"mesh.yaml sets train.micro_batches: 16, but .*run.yaml already set 64"):
        load_config([run, preset_file])
    cfg = load_config([run, preset_file], ["train.micro_batches=16"])  # on purpose: an override
    assert (cfg.train.micro_batches, cfg.train.steps, cfg.mesh.fsdp) == (16, 7, 8)
    run.write_text("train:\n  micro_batches: 16\n")  # the same value twice is no conflict
    assert load_config([run, preset_file]).train.micro_batches == 16
