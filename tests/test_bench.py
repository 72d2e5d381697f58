"""The update benchmarks run the trainer's programs end to end (``bench train`` called the trainer's private gradient
function with an old signature, and nothing noticed): on the tiny model, both kinds print their figures, and the
packed update equals the padded one."""

import pytest

from medix_jax.bench_train import bench_train, bench_train_longtail
from medix_jax.train import DEFAULT_CONFIG


@pytest.mark.slow
def test_bench_train_runs_the_trainers_programs(capsys):
    result = bench_train(str(DEFAULT_CONFIG), [], runs=1, batch=2, new_tokens=16, image_size=56)
    out = capsys.readouterr().out
    assert "medix_jax update step" in out and "transformers fwd+bwd" in out and result["ratio"] > 0
    assert result["flops"] > 0


@pytest.mark.slow
def test_bench_train_longtail_packed_equals_padded(capsys):
    result = bench_train_longtail(str(DEFAULT_CONFIG), [], runs=1, batch=4, new_tokens=128, samples=2, micro=2,
                                  image_size=56)
    out = capsys.readouterr().out
    assert "ratio packed / padded" in out
    assert result["computed"]["packed"] < result["computed"]["padded"] and result["drift"] < 1e-5, result
