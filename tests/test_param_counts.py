"""Parameter counts of the real presets from jax.eval_shape (no memory allocated)."""

import jax
import numpy as np
import pytest
from flax import nnx

from medix_jax.models.qwen2_5_vl import abstract_model, param_count, preset


@pytest.fixture(scope="module")
def abstract_7b():
    return abstract_model(preset("qwen2_5_vl_7b"))


def test_3b_parameter_count():
    assert param_count(abstract_model(preset("qwen2_5_vl_3b"))) == 3_754_622_976


def test_7b_parameter_count(abstract_7b):
    assert param_count(abstract_7b) == 8_292_166_656
    vision = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract_7b.visual, nnx.Param)))
    assert vision == 676_550_144  # 676.55M (REFERENCE §2)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(nnx.state(abstract_7b, nnx.Param)))
