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


def test_bench_sampler_samples_on_the_rollout_layout_it_is_given():
    """``bench sampler --mesh fsdp=4,tensor=2 --rollout-mesh data=-1,tensor=2``: the model built on the trainer's
    mesh, its weights resharded to 4 replicas x tensor 2 before timing (8 simulated CPU devices)."""
    import jax

    from medix_jax.bench import mesh_sizes, sampled_model
    from medix_jax.models.qwen_vl import preset

    assert mesh_sizes("fsdp=4, tensor=2") == {"fsdp": 4, "tensor": 2} and mesh_sizes(None) is None
    with pytest.raises(SystemExit, match="fsdp=4,tensor=2"):
        mesh_sizes("fsdp:4")
    model, on = sampled_model(preset("tiny"), mesh_sizes("fsdp=4,tensor=2"), mesh_sizes("data=-1,tensor=2"))
    assert dict(on.shape) == {"data": 4, "fsdp": 1, "tensor": 2}
    kernel = model.model.layers[0].self_attn.q_proj.kernel[...]
    assert kernel.sharding.mesh is on and kernel.sharding.spec == jax.sharding.PartitionSpec(None, "tensor")
    model, on = sampled_model(preset("tiny"), mesh_sizes("fsdp=4,tensor=2"), None)
    assert model.model.layers[0].self_attn.q_proj.kernel[...].sharding.spec[0] == "fsdp"


def test_bench_learn_reads_seeds_perception_and_targets(tmp_path):
    import json

    from medix_jax.bench_learn import passes, perception, seed_list, table

    assert seed_list("0-4") == [0, 1, 2, 3, 4] and seed_list("0,2,7") == [0, 2, 7] and seed_list("3") == [3]
    with pytest.raises(ValueError, match="give seeds like"):
        seed_list("-1")
    run = tmp_path / "run"
    (run / "eval" / "step_5" / "cache").mkdir(parents=True)
    (run / "eval" / "truth.json").write_text(json.dumps({"a": "square", "b": "circle", "c": "cross"}))
    lines = [{"id": "a", "generation": "<X_RAY><thinking>I see a dark film with a green lesion.</thinking>"},
             {"id": "b", "generation": "<X_RAY><thinking>I see a dark film with a green lesion.</thinking>"},
             {"id": "c", "reward": {"format": 1.0}}, {"id": "c", "generation": None}]
    (run / "eval" / "step_5" / "cache" / "held_out.jsonl").write_text("\n".join(map(json.dumps, lines)))
    assert perception(run, 5) == 0.5 and perception(run, 6) is None  # green is the square's colour, not the circle's
    good = {"seed": 0, "devices": 8, "minutes": 3.0, "sft_accuracy": 0.25, "sft_perception": 0.9, "accuracy": 0.9,
            "modality": 0.95, "perception": 0.95}
    slow, wrong = {**good, "minutes": 5.5}, {**good, "modality": 0.8}
    assert passes(good) and not passes(slow) and not passes(wrong) and not passes({**good, "error": "exit 1"})
    assert table([good]).splitlines()[-1] == "| 0 | 8 | 25.0 | 90.0 | 90.0 | 95.0 | 95.0 | 3.0 | yes |"


def test_the_async_bench_judge_answers_the_reference_prompt_after_its_latency():
    """``bench async``'s stand-in judge, through our real judge client: a verdict, no sooner than its latency."""
    import time

    from medix_jax.bench_async import SlowJudge
    from medix_jax.rewards.judge import JudgeConfig, check_judge

    judge = SlowJudge(0.2)
    try:
        cfg = JudgeConfig(url=judge.url, model="stand-in")
        start = time.perf_counter()
        assert check_judge(cfg) in ("YES", "NO")
        assert time.perf_counter() - start >= 0.2
    finally:
        judge.close()
