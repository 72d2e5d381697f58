"""The supervised stage (rl/sft.py): only completion tokens count, the loss falls, a sharded step equals the
single-device one, kill -9 + resume is exact across the SFT -> GRPO boundary, and the embedded default run reaches
its targets on the held-out split (and does not without the reward signal)."""

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from medix_jax import parallel
from medix_jax.data.pipeline import collate
from medix_jax.models.qwen_vl import forward
from medix_jax.rl import grpo
from medix_jax.rl.policy import OptimConfig
from medix_jax.rl.sft import SFTConfig, SupervisedStage, label_sets
from tests.support.letter_reward import LetterReward
from tests.test_train import ROOT, final_state, flat_params, make_trainer, metric_lines, shared_run  # noqa: F401


def stage(shared_run, mesh=None, lr=3e-3, **changes):  # noqa: F811
    from medix_jax.data.pipeline import data_source

    cfg = dataclasses.replace(SFTConfig(steps=10, completion="field", answers="random", sample_every=0,
                                        optim=OptimConfig(learning_rate=lr)), **changes)
    run_cfg, tokenizer, model_cfg = shared_run
    run_cfg = dataclasses.replace(run_cfg, data=dataclasses.replace(run_cfg.data, batch_size=8),  # the default's
                                  rollout=dataclasses.replace(run_cfg.rollout, max_new_tokens=40))
    trainer = make_trainer((run_cfg, tokenizer, model_cfg), LetterReward(), mesh=mesh)
    return SupervisedStage(trainer, cfg, label_sets(data_source(shared_run[0].data)))


def test_the_loss_is_the_nll_of_completion_tokens_only(shared_run):  # noqa: F811
    """The stage's loss on one example equals the NLL of its completion tokens under an independent full forward
    pass (transformers' API: prompt + completion in one sequence), and tokens outside the mask change nothing."""
    sft = stage(shared_run)
    trainer = sft.trainer
    batch = next(trainer.data)
    example = batch.examples[0]
    tokens, mask, cut = sft.tokenize([sft.target(example, 0)])
    assert cut == 0
    n = int(mask.sum())
    prompts = collate([example], trainer.model_cfg, trainer.buckets).inputs
    totals = grpo.totals(mask)
    _, metrics = trainer.programs.sft_gradients(trainer.params, prompts, tokens, mask, totals)
    ids = np.concatenate([example["input_ids"], tokens[0, :n]])[None]
    logits = np.asarray(forward(trainer.model, ids, np.ones_like(ids), example["pixel_values"],
                                example["image_grid_thw"]), np.float64)
    p = len(example["input_ids"])
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    expected = -np.mean([logp[0, p - 1 + t, tokens[0, t]] for t in range(n)])
    assert abs(float(metrics["sft_loss"]) - expected) <= 1e-5, (float(metrics["sft_loss"]), expected)
    garbage = np.where(mask, tokens, 7)  # tokens past the completion's end are padding: they must not count
    _, again = trainer.programs.sft_gradients(trainer.params, prompts, garbage, mask, totals)
    assert float(again["sft_loss"]) == float(metrics["sft_loss"])


def test_targets_keep_the_trace_and_draw_the_answer(shared_run):  # noqa: F811
    sft = stage(shared_run, tags="random")
    example = next(sft.trainer.data).examples[0]
    targets = {sft.target(example, step) for step in range(40)}
    answers = {t.split("<answer>")[1].split("</answer>")[0] for t in targets}
    tags = {t.split("<thinking>")[0] for t in targets}
    assert answers == set(sft.answers) and tags == set(sft.tags)  # drawn afresh at every step
    thinking = example["completion"].split("<thinking>")[1].split("</thinking>")[0]
    assert all(f"<thinking>{thinking}</thinking>" in t for t in targets)
    assert sft.target(example, 3) == sft.target(example, 3)  # a function of (seed, step, record): resumable
    truth = stage(shared_run, answers="truth")
    assert truth.target(example, 0) == example["completion"]


def test_the_loss_falls(shared_run):  # noqa: F811
    sft = stage(shared_run)
    losses = [sft.step()["sft_loss"] for _ in range(20)]
    assert sft.trainer.step_count == 20
    assert np.mean(losses[-3:]) < 0.6 * np.mean(losses[:3]), losses


@pytest.mark.slow
@pytest.mark.parametrize("mesh_sizes", [{"data": 2, "fsdp": 2, "tensor": 2}])
def test_a_sharded_step_equals_the_single_device_one(shared_run, mesh_sizes):  # noqa: F811
    """One step (two micro-batches) on an 8-device mesh: loss, gradients and the updated parameters equal the
    single-device ones to 1e-5 (at the reference learning rate, see test_train's sharded update test)."""
    single = stage(shared_run, lr=1e-6, micro_batches=2)
    sharded = stage(shared_run, mesh=parallel.make_mesh(mesh_sizes), lr=1e-6, micro_batches=2)
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded.trainer.params))
    before = flat_params(single.trainer.params)
    m1, m2 = single.step(), sharded.step()
    assert abs(m1["sft_loss"] - m2["sft_loss"]) <= 1e-5 and abs(m1["grad_norm"] - m2["grad_norm"]) <= 1e-5
    a, b = flat_params(single.trainer.params), flat_params(sharded.trainer.params)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    assert max(float(np.abs(a[k] - before[k]).max()) for k in a) > 0


def sft_cli(run_dir, cache):
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "XLA_FLAGS": ""}
    args = ["rollout.max_new_tokens=40", "rollout.num_samples=2", "mesh.fsdp=1", f"train.run_dir={run_dir}",
            "sft.steps=3", "sft.sample_every=2", "train.steps=2", "train.save_every=1", "train.export_hf=false",
            "eval.split=null"]  # letter_reward turns sft off first; these later overrides win
    return subprocess.Popen([sys.executable, "-m", "tests.support.letter_reward", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_kill_9_then_resume_is_exact_across_the_stages(tmp_path):
    """3 supervised + 2 GRPO steps; killed after the checkpoint of step 2 (inside the supervised stage), resumed:
    parameters, optimizer states and metrics equal the uninterrupted run's."""
    straight, killed, cache = tmp_path / "straight", tmp_path / "killed", tmp_path / "xla-cache"
    out, _ = sft_cli(straight, cache).communicate(timeout=600)
    assert (straight / "checkpoints" / "5").is_dir(), out
    victim = sft_cli(killed, cache)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "2").is_dir():
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert not (killed / "checkpoints" / "5").exists()
    out, _ = sft_cli(killed, cache).communicate(timeout=600)
    assert "resumed at step" in out, out
    a, b = final_state(straight, 5), final_state(killed, 5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    lines = metric_lines(killed)
    assert metric_lines(straight) == lines and [m["step"] for m in lines] == [1, 2, 3, 4, 5]
    assert all("sft_loss" in m for m in lines[:3]) and all("sft_loss" not in m for m in lines[3:])
    assert "reward_letters_mean" in lines[0] and "reward_letters_mean" not in lines[1]  # sft.sample_every=2


def start(module: str, run_dir, *overrides: str, cache=None) -> tuple[subprocess.Popen, Path]:
    """The default job (configs/tiny.yaml) as a user runs it: its own process, one CPU device, its output to a file
    beside ``run_dir`` (a pipe that nobody reads would stall a job that runs beside another)."""
    env = {**os.environ, "XLA_FLAGS": "", "JAX_COMPILATION_CACHE_DIR": str(cache),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    log = Path(f"{run_dir}.{module}.log")
    with log.open("w") as out:
        process = subprocess.Popen([sys.executable, "-m", module, f"train.run_dir={run_dir}", "train.export_hf=false",
                                    *overrides], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    return process, log


def finish(started: tuple[subprocess.Popen, Path]) -> str:
    """The job's output, once it has ended well."""
    process, log = started
    process.wait(timeout=900)
    out = log.read_text()
    assert process.returncode == 0, out[-6000:]
    return out


def job(module: str, run_dir, *overrides: str, cache=None) -> str:
    return finish(start(module, run_dir, *overrides, cache=cache))


def held_out(run_dir):
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.timeout(1800)  # jobs of about 2.5 minutes, then two of 3 side by side, then 0.5
def test_the_default_run_learns_the_task_and_not_without_the_reward(tmp_path):
    """The embedded default (configs/tiny.yaml, fixed seeds) in two parts -- its supervised stage, then the rest of
    the run resumed from it, which is the same run -- and, from a copy of the supervised stage, GRPO with every
    advantage zeroed (tests/support/zero_advantages.py), beside the GRPO stage. Targets (issue 15) on the held-out
    split: after SFT, format >= 0.95 and accuracy at chance; after GRPO, accuracy >= chance + 0.4 and modality >=
    0.9; with zeroed advantages, no gain (accuracy below chance + 0.2)."""
    run_dir, control, cache = tmp_path / "run", tmp_path / "control", tmp_path / "xla-cache"
    control_cache = tmp_path / "xla-cache-control"
    job("medix_jax.train", run_dir, "train.steps=0", cache=cache)  # the supervised stage
    shutil.copytree(run_dir, control)
    after_sft = held_out(run_dir)["after SFT"]
    chance = held_out(run_dir)["chance_accuracy"]
    assert chance == 0.25 and after_sft["format"] >= 0.95 and abs(after_sft["accuracy"] - chance) <= 0.1, after_sft

    # GRPO resumed at the end of the supervised stage and, beside it, the control: the same GRPO stage from a copy
    # of the supervised stage with every advantage zeroed (each with its own compilation cache)
    shutil.copytree(cache, control_cache)
    grpo, zeroed = start("medix_jax.train", run_dir, cache=cache), start("tests.support.zero_advantages", control,
                                                                          cache=control_cache)
    for started in (grpo, zeroed):
        finish(started)
    results = held_out(run_dir)
    assert results["after SFT"] == after_sft
    after_grpo = results["after GRPO"]
    assert after_grpo["accuracy"] >= chance + 0.4 and after_grpo["modality"] >= 0.9, results
    assert (run_dir / "curves.png").is_file() and (run_dir / "results.md").is_file()

    out = job("medix_jax.train", run_dir, cache=cache)  # a finished run says so and does nothing
    assert "already complete" in out and str(run_dir / "results") in out
    assert held_out(run_dir) == results

    # Without the reward signal there is no gain. (The policy does not stand still: with every advantage 0 the
    # only gradient is the KL term's, near 0, which AdamW scales up to full-size steps -- measured: accuracy 0.)
    unrewarded = held_out(control)["after GRPO"]
    assert unrewarded["accuracy"] < chance + 0.2, (after_sft, unrewarded)


class InterruptAfter(LetterReward):
    """LetterReward that sends this process SIGINT while scoring its ``calls``-th batch: the run stops after that
    step, saved, as after a Ctrl-C."""

    def __init__(self, calls: int):
        self.calls = calls

    def score(self, completions, solutions):
        self.calls -= 1
        if self.calls == 0:
            os.kill(os.getpid(), signal.SIGINT)
        return super().score(completions, solutions)


@pytest.mark.slow
def test_the_kl_reference_is_the_policy_grpo_starts_from_also_after_a_resume(tmp_path):
    """After a supervised stage the KL term anchors GRPO to the policy at that stage's end (configs/tiny.yaml: "k3
    to the policy the GRPO stage starts from"), not to the initial weights: the first GRPO step's KL is 0. A run
    interrupted inside its GRPO stage restores that reference from the stage's last checkpoint, which is kept
    beyond train.keep_checkpoints, and ends as the uninterrupted run."""
    from medix_jax.train import main as train_main

    common = ["rollout.max_new_tokens=8", "rollout.num_samples=2", "mesh.fsdp=4", "mesh.tensor=2",
              "data.batch_size=4", "eval.split=null",
              "sft.steps=2", "sft.sample_every=0", "train.steps=3", "train.save_every=1", "train.keep_checkpoints=1",
              "train.loss.kl_coef=0.01", "train.export_hf=false", "rewards.embedding_on=false"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert train_main([*common, f"train.run_dir={straight}"], rewards=LetterReward()) == 0
    kl = {m["step"]: m["kl"] for m in metric_lines(straight) if "kl" in m}
    assert sorted(kl) == [3, 4, 5] and kl[3] == 0.0 and kl[5] > 0, kl

    assert train_main([*common, f"train.run_dir={resumed}"], rewards=InterruptAfter(2)) == 0  # stops after step 4
    assert sorted(int(p.name) for p in (resumed / "checkpoints").iterdir()) == [2, 4]  # 2: the reference
    assert train_main([*common, f"train.run_dir={resumed}"], rewards=LetterReward()) == 0
    assert metric_lines(resumed) == metric_lines(straight)
    a, b = final_state(straight, 5), final_state(resumed, 5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
