"""Parameter counts of the real presets from jax.eval_shape (no memory allocated)."""

import jax
import numpy as np
import pytest
from flax import nnx

from medix_jax.models.qwen_vl import abstract_model, param_count, preset


@pytest.fixture(scope="module")
def abstract_7b():
    return abstract_model(preset("qwen2_5_vl_7b"))


def test_3b_parameter_count():
    assert param_count(abstract_model(preset("qwen2_5_vl_3b"))) == 3_754_622_976


def test_7b_parameter_count(abstract_7b):
    assert param_count(abstract_7b) == 8_292_166_656
    vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_7b.visual, nnx.Param)))
    assert vision == 676_550_144  # 676.55M (docs/reference.md#language-model)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract_7b, nnx.Param)))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen3_vl_2b", "qwen3_vl_8b", "qwen3_vl_30b_a3b"])
def test_qwen3_vl_parameter_counts_equal_transformers_on_the_meta_device(name, capsys):
    """Our count from eval_shape equals transformers' for the same config.json, built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    from medix_jax.models.qwen_vl.families import model_config_to_hf

    cfg = preset(name)
    hf = model_config_to_hf(cfg, "bfloat16")
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**hf))
    theirs = sum(p.numel() for p in model.parameters())
    ours = param_count(abstract_model(cfg))
    with capsys.disabled():
        print(f"\n{name}: {ours:,} parameters (transformers: {theirs:,})")
    assert ours == theirs
