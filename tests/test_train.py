"""The trainer and the main job: learning is real, kill -9 + resume is exact, a sharded update equals the
single-device one, a step with the full reward pool logs every component, bad checkpoints fall back."""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from medix_jax import parallel
from medix_jax.checkpoint import Checkpoints
from medix_jax.config import load_config
from medix_jax.data.pipeline import PromptBatches, data_source
from medix_jax.rewards.judge import JudgeConfig
from medix_jax.rewards.pool import RewardBatch, RewardPool, RewardsConfig
from medix_jax.rl import grpo
from medix_jax.rl import programs as programs_module
from medix_jax.rl import update as update_module
from medix_jax.rl.programs import StepPrograms
from medix_jax.rl.rollout import ScoredNow
from medix_jax.rl.trainer import Trainer
from medix_jax.train import DEFAULT_CONFIG, build_model, main, prepare_embedded_data, tokenizer_and_model_config
from tests.support.judge_server import JudgeServer
from tests.support.letter_reward import LetterReward

ROOT = Path(__file__).resolve().parent.parent
# The update's mechanics at full rate from the first update (the default warms GRPO's rate up over 50 updates).
FAST = ["rollout.max_new_tokens=8", "rollout.num_samples=8", "train.optim.learning_rate=3e-3",
        "train.optim.warmup_steps=0", "mesh.fsdp=1", "sft.steps=0", "eval.split=null", "train.loss.kl_coef=0.0",
        "data.batch_size=4"]


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """Embedded data and tokenizer prepared once for the in-process tests."""
    run_dir = tmp_path_factory.mktemp("run")
    cfg = load_config(DEFAULT_CONFIG, [*FAST, f"train.run_dir={run_dir}"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=prepare_embedded_data(run_dir)))
    tokenizer, model_cfg, _ = tokenizer_and_model_config(cfg, run_dir)
    return cfg, tokenizer, model_cfg


def make_trainer(shared_run, rewards, mesh=None, model_changes=None, rollout_changes=None, **train_changes):
    cfg, tokenizer, model_cfg = shared_run
    cfg = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, **(rollout_changes or {})))
    model_cfg = dataclasses.replace(model_cfg, **(model_changes or {}))
    mesh = mesh or parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
    data = PromptBatches(data_source(cfg.data), cfg.data, model_cfg, tokenizer, cfg.buckets, cfg.seed)
    train = dataclasses.replace(cfg.train, **train_changes)
    rewards = rewards if isinstance(rewards, RewardPool) else ScoredNow(rewards)
    return Trainer(build_model(cfg, model_cfg, mesh), tokenizer, data, rewards, train, cfg.rollout, cfg.buckets,
                   mesh, cfg.seed)


@pytest.mark.slow
def test_learning_is_real(shared_run):
    trainer = make_trainer(shared_run, LetterReward())
    curve = []
    for _ in range(60):
        curve.append(trainer.step()["reward_composite_mean"])
        if len(curve) == 1:
            compiled = trainer.compile_count  # process-wide caches: other tests may have filled them too
        if len(curve) >= 3 and np.mean(curve[-3:]) >= 0.9:
            break
    assert np.mean(curve[:3]) < 0.6, curve  # the random policy starts far from the target
    assert np.mean(curve[-3:]) >= 0.9, curve  # ... and reaches it within 60 steps
    # bucketed shapes: at most one more prompt bucket's programs (sampler x2, gradient, update) after step 1
    assert trainer.compile_count - compiled <= 4


class ConstantForSomeAnswers(LetterReward):
    """The letter reward, except a flat 1.0 for prompts whose answer is a circle or a square: those groups carry
    no signal and DAPO's dynamic sampling must drop them."""

    flat = ("circle", "square")

    def score(self, completions, solutions):
        batch = super().score(completions, solutions)
        composite = np.where([s.endswith(self.flat) for s in solutions], 1.0, batch.composite).astype(np.float32)
        return batch._replace(composite=composite)


def test_dynamic_filtering_drops_flat_groups_refills_and_masks_a_shortfall(shared_run):
    trainer = make_trainer(shared_run, ConstantForSomeAnswers(), dynamic_filtering=True, rollout_batches=2,
                           max_tries=8)
    groups, metrics = trainer.collect(jax.random.PRNGKey(0))
    assert len(groups) == 8 and metrics["groups_kept"] == 8
    assert not any(g.example["solution"].endswith(ConstantForSomeAnswers.flat) for g in groups)
    assert metrics["rollout_batches"] > 2  # refilled from further prompt batches
    short = make_trainer(shared_run, ConstantForSomeAnswers(), dynamic_filtering=True, rollout_batches=2,
                         max_tries=2)
    groups, metrics = short.collect(jax.random.PRNGKey(0))
    real = [g for g in groups if g.mask.any()]
    assert len(groups) == 8 and len(real) == metrics["groups_kept"] < 8  # the rest: masked filler
    assert all(not g.advantages.any() for g in groups if not g.mask.any())
    # mini-batches of filler only make no optimizer update (AdamW momentum and decay would still move weights)
    short.train = short.updater.train = dataclasses.replace(short.train, mini_batches=8)  # one group each
    assert short.update(groups)["optimizer_updates"] == len(real)


def test_sampler_and_trainer_agree_on_old_logprobs(shared_run):
    trainer = make_trainer(shared_run, LetterReward())
    metrics = trainer.step()
    assert abs(metrics["ratio_mean"] - 1.0) < 1e-4  # first update on-policy: ratio 1 up to float rounding
    assert metrics["clip_fraction"] == 0.0


def flat_params(params):
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(params)}


def micro_batch_gradients(trainer, groups, micro: int):
    """(the running sum of the gradients after each micro-batch, that micro-batch's metrics) of one mini-batch of
    ``groups`` cut into ``micro`` micro-batches, as ``Trainer.update`` computes them (the embedding's share through
    ``embed_gradients`` added to the sum at each point), every micro-batch at full width."""
    shards = parallel.batch_split(trainer.mesh) // jax.process_count()
    members = update_module.mini_batch(groups, 0, 1, micro)
    updater, programs = trainer.updater, trainer.programs
    host = updater.host_prompts(members)
    parts, rows = update_module.micro_batches(members, host.attention_mask.sum(1), host.input_ids.shape[1], micro,
                                              programs.widths, shards, updater.samples_per_row)
    prompts = parallel.shard_prompts(host, trainer.mesh)
    embedded = programs.embed(trainer.params, prompts)
    out, grads, d_embedded = [], None, None
    chunk = [updater.device_batch(members, host, part, rows) for part in parts]
    totals = grpo.totals(jnp.concatenate([batch.mask for _, batch, _ in chunk]))  # the mini-batch's denominators
    full = jnp.int32(len(programs.widths) - 1)
    for layout, batch, _ in chunk:
        g, d, m, _ = programs.gradients(trainer.params, embedded, layout, batch, totals, np.asarray(False), full)
        grads = g if grads is None else programs.accumulate(grads, g)
        d_embedded = d if d_embedded is None else programs.add(d_embedded, d)
        out.append((programs.embed_gradients(trainer.params, prompts, d_embedded, jax.tree.map(jnp.copy, grads)), m))
    return out


@pytest.mark.parametrize("mesh_sizes", [{"data": 1, "fsdp": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}],
                         ids=["fsdp4-tensor2", "data2-fsdp2-tensor2"])
@pytest.mark.slow
def test_sharded_update_equals_single_device(shared_run, mesh_sizes):
    """Gradients, loss and the updated parameters of one update on an 8-device mesh equal the
    single-device ones to 1e-5. Parameters are compared at the reference learning rate (1e-6): Adam's first step
    is lr * sign(g) for tiny g, so at a large rate float noise in a near-zero gradient would dominate the test."""
    single = make_trainer(shared_run, LetterReward(), micro_batches=2, rollout_batches=2, optim=dataclasses.replace(
        shared_run[0].train.optim, learning_rate=1e-6))
    groups, _ = single.collect(jax.random.PRNGKey(5))
    mesh = parallel.make_mesh(mesh_sizes)
    sharded = make_trainer(shared_run, LetterReward(), mesh=mesh, micro_batches=2, rollout_batches=2,
                           optim=single.train.optim)
    assert any(len(leaf.sharding.device_set) == 8 for leaf in jax.tree.leaves(sharded.params))
    grads = []
    for trainer in (single, sharded):
        parts = micro_batch_gradients(trainer, groups, 2)  # sorted by length within each batch shard
        grads.append((flat_params(parts[-1][0]), sum(float(m["loss"]) for _, m in parts)))
    (g1, loss1), (g2, loss2) = grads  # the mini-batch's gradient and loss
    assert abs(loss1 - loss2) <= 1e-5 and max(float(np.abs(v).max()) for v in g1.values()) > 1e-3
    assert max(float(np.abs(g1[k] - g2[k]).max()) for k in g1) <= 1e-5
    m1, m2 = single.update(groups), sharded.update(groups)
    assert abs(m1["loss"] - m2["loss"]) <= 1e-5
    a, b = flat_params(single.params), flat_params(sharded.params)
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) <= 1e-5
    assert max(float(np.abs(a[k] - np.asarray(v)).max()) for k, v in flat_params(
        make_trainer(shared_run, LetterReward()).params).items()) > 0  # the update did move the parameters


def test_a_sharded_training_state_resumes_where_it_was(shared_run, tmp_path):
    """A new job restores into its fresh trainer's state (train.py), and restored arrays are committed to those
    shardings: the optimizer's scalars must be on the mesh like the parameters, or the first update after a
    resume on several devices fails."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    trainer = make_trainer(shared_run, LetterReward(), mesh=mesh)
    checkpoints = Checkpoints(tmp_path, keep=1)
    saved = {"params": trainer.params, "opt_state": trainer.opt_state}
    checkpoints.save(1, saved, {}, {"step": 1})
    checkpoints.wait()
    expected = flat_params(saved)
    resumed = make_trainer(shared_run, LetterReward(), mesh=mesh)
    _, restored, _ = checkpoints.restore_latest({"params": resumed.params, "opt_state": resumed.opt_state})
    checkpoints.close()
    assert all(leaf.sharding.mesh == mesh for leaf in jax.tree.leaves(restored))
    got = flat_params(restored)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
    resumed.params, resumed.opt_state, resumed.step_count = restored["params"], restored["opt_state"], 1
    assert np.isfinite(resumed.step()["loss"])


class AsAnswers:
    """The random policy writes no <answer> tags, so the judge and the embedding would never be asked: wrap each
    decoded completion as the answer of a well-formed MediX completion before the real pool scores it."""

    def __init__(self, pool):
        self.pool, self.active = pool, pool.active

    def score(self, completions, solutions):
        # a random policy may write tags of its own (they are words of its tokenizer): out of the answer with them
        wrapped = [f"<CT_SCAN><thinking>t</thinking><answer>{re.sub('</?(thinking|answer)>', '', c)}</answer>"
                   for c in completions]
        return self.pool.score(wrapped, solutions)


def test_one_step_with_the_full_reward_pool_logs_every_component(shared_run, tmp_path):
    with JudgeServer() as server:
        pool = RewardPool(RewardsConfig(judge=JudgeConfig(url=server.url, model="judge", max_retries=1)))
        trainer = make_trainer(shared_run, AsAnswers(pool))
        metrics = trainer.step()
        pool.close()
        requests = len(server.requests)
    for component in ("format", "modality", "embed", "llm"):
        assert f"reward_{component}_mean" in metrics and metrics[f"reward_{component}_missing"] == 0
    assert metrics["reward_format_mean"] == 1.0 and metrics["reward_invalid"] == 0
    assert requests > 0 and metrics["judge_calls"] >= requests and np.isfinite(metrics["loss"])


def test_an_unreadable_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    state = {"params": {"w": jax.numpy.arange(4.0)}, "opt_state": {"m": jax.numpy.zeros(2)}}
    checkpoints = Checkpoints(tmp_path, keep=3)
    checkpoints.save(1, state, {"next_index": 1}, {"step": 1})
    checkpoints.save(2, {"params": {"w": state["params"]["w"] + 1}, "opt_state": state["opt_state"]},
                     {"next_index": 2}, {"step": 2})
    checkpoints.wait()
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    reopened = Checkpoints(tmp_path, keep=3)
    step, restored, data_state = reopened.restore_latest(state)
    assert step == 1 and data_state == {"next_index": 1}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))
    assert "cannot be restored" in capsys.readouterr().out
    assert not (tmp_path / "2").exists()  # deleted, so that the resumed run can write step 2 again
    reopened.save(2, state, {"next_index": 2}, {"step": 2})
    reopened.wait()
    for f in (tmp_path / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    for f in (tmp_path / "2" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="can be restored"):  # none readable: an error, not a silent restart
        Checkpoints(tmp_path, keep=3).restore_latest(state)


def train_cli(run_dir: Path, steps: int, cache: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "XLA_FLAGS": ""}
    args = [*FAST, f"train.run_dir={run_dir}", f"train.steps={steps}", "train.save_every=1",
            "train.export_hf=false", *extra]
    return subprocess.Popen([sys.executable, "-m", "tests.support.letter_reward", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def final_state(run_dir: Path, step: int):
    manager = ocp.CheckpointManager(run_dir / "checkpoints")
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    manager.close()
    return flat_params(restored["state"])


def metric_lines(run_dir: Path):
    timing = ("time", "seconds", "tokens_per_second", "compile_count")
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not any(t in k for t in timing)} for m in lines]


@pytest.mark.slow
def test_kill_9_then_resume_is_exact(tmp_path):
    straight, killed, cache = tmp_path / "straight", tmp_path / "killed", tmp_path / "xla-cache"
    out, _ = train_cli(straight, 5, cache).communicate(timeout=600)
    assert (straight / "checkpoints" / "5").is_dir(), out
    victim = train_cli(killed, 5, cache)
    deadline = time.monotonic() + 600
    while not (killed / "checkpoints" / "2").is_dir():  # orbax renames a step's directory when it is complete
        assert victim.poll() is None and time.monotonic() < deadline, victim.communicate()[0]
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)
    assert not (killed / "checkpoints" / "5").exists()
    out, _ = train_cli(killed, 5, cache).communicate(timeout=600)
    assert "resumed at step" in out, out
    a, b = final_state(straight, 5), final_state(killed, 5)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert metric_lines(straight) == metric_lines(killed)
    assert [m["step"] for m in metric_lines(killed)] == [1, 2, 3, 4, 5]


@pytest.mark.slow
def test_sigterm_saves_and_exits_cleanly(tmp_path):
    run_dir = tmp_path / "run"
    proc = train_cli(run_dir, 200, tmp_path / "xla-cache")
    deadline = time.monotonic() + 600
    while not (run_dir / "checkpoints" / "1").is_dir():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert f"saved step {saved}" in out and saved < 200
    shutil.rmtree(run_dir)


# -- the reference settings (issue 13): bf16, KL with scanned or unrolled layers, GSPO-token, DAPO band filtering --

GSPO = grpo.LossConfig(clip_low=3e-4, clip_high=4e-4, aggregation="seq_mean", sequence_ratio=True)


def test_bf16_gspo_first_update_is_exactly_on_policy(shared_run):
    """bf16, GSPO-token clips 3e-4/4e-4, default settings: the old log-probabilities are the trainer's own, so the
    first update (parameters unchanged since sampling) has ratio exactly 1 and nothing clipped, while the logged
    sampler-vs-trainer mismatch shows the KV-cache decode's bf16 difference."""
    trainer = make_trainer(shared_run, LetterReward(), model_changes=dict(dtype="bfloat16"), loss=GSPO)
    assert trainer.recompute  # the default whenever the compute dtype is not float32
    first, second = trainer.step(), trainer.step()
    assert first["ratio_mean"] == 1.0 and first["clip_fraction"] == 0.0, first
    assert first["logprob_mismatch_mean"] > 0 and first["logprob_mismatch_max"] >= first["logprob_mismatch_mean"]
    assert second["optimizer_updates"] == 1 and np.isfinite(second["loss"]) and second["ratio_mean"] == 1.0


@pytest.mark.slow
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_kl_loss_with_scanned_and_unrolled_layers(shared_run, scan):
    """kl_coef > 0 (the 3B GRPO reference) traces with scanned layers too; the reference parameters stay where they
    were, and the k3 KL is finite, logged, and grows once the policy has moved."""
    trainer = make_trainer(shared_run, LetterReward(), model_changes=dict(scan_layers=scan),
                           loss=grpo.LossConfig(kl_coef=0.01, aggregation="token_mean"))
    reference = flat_params(trainer.ref_params)
    first, second = trainer.step(), trainer.step()
    assert first["kl"] == 0.0 and np.isfinite(second["kl"]) and second["kl"] > 0, (first["kl"], second["kl"])
    held = flat_params(trainer.ref_params)
    assert all(np.array_equal(held[k], reference[k]) for k in reference)
    moved = flat_params(trainer.params)
    assert any(not np.array_equal(moved[k], reference[k]) for k in reference)


class GroupPattern(LetterReward):
    """Rewards by position in the group (G = 8), per answer: a group of mean 0.995 (not all equal), a group of
    mean 0.5, and a group whose rewards are all 0.5."""

    patterns = {"circle": [1.0] * 7 + [0.96], "square": [0.5] * 8}
    other = [1.0, 0.0] * 4

    def score(self, completions, solutions):
        batch = super().score(completions, solutions)
        composite = []
        for i, s in enumerate(solutions):
            pattern = next((p for word, p in self.patterns.items() if s.endswith(word)), self.other)
            composite.append(pattern[i % 8])
        return batch._replace(composite=np.asarray(composite, np.float32))


def test_dapo_band_filtering_keeps_groups_whose_mean_is_inside(shared_run):
    """The reference's online filtering: a group is kept when 0.01 < mean reward < 0.99. A group of mean 0.995 is
    dropped although its rewards differ; a group of mean 0.5 is kept, also when all its rewards are 0.5."""
    trainer = make_trainer(shared_run, GroupPattern(), dynamic_filtering=True, rollout_batches=2, max_tries=8)
    groups, metrics = trainer.collect(jax.random.PRNGKey(0))
    answers = [g.example["solution"] for g in groups if g.mask.any()]
    assert answers and not any(a.endswith("circle") for a in answers)
    assert any(a.endswith("square") for a in answers)  # all rewards equal, mean 0.5: kept
    means = [float(g.rewards.mean()) for g in groups if g.mask.any()]
    assert all(0.01 < m < 0.99 for m in means), means
    distinct = make_trainer(shared_run, GroupPattern(), dynamic_filtering=True, rollout_batches=2, max_tries=8,
                            filter_rule="distinct")
    kept = [g.example["solution"] for g in distinct.collect(jax.random.PRNGKey(0))[0] if g.mask.any()]
    assert not any(a.endswith("square") for a in kept) and any(a.endswith("circle") for a in kept)
    for _ in range(2):
        assert np.isfinite(trainer.step()["loss"])


def test_a_mini_batch_without_signal_makes_no_update(shared_run):
    """All advantages 0 (every reward equal) and no KL: AdamW would only decay the weights, so no update is made,
    and the skipped update is counted."""

    class Flat(LetterReward):
        def score(self, completions, solutions):
            batch = super().score(completions, solutions)
            return batch._replace(composite=np.full_like(batch.composite, 0.5))

    trainer = make_trainer(shared_run, Flat(), mini_batches=2)
    before = flat_params(trainer.params)
    metrics = trainer.step()
    assert metrics["optimizer_updates"] == 0 and metrics["updates_skipped"] == 2
    after = flat_params(trainer.params)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_gradients_keep_the_parameters_shardings(shared_run):
    """fsdp=4 x tensor=2: every gradient (and the accumulated sum) is sharded like its parameter, so a device holds
    exactly its share of the parameters' bytes in gradients."""
    mesh = parallel.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    trainer = make_trainer(shared_run, LetterReward(), mesh=mesh, micro_batches=2, rollout_batches=2)
    groups, _ = trainer.collect(jax.random.PRNGKey(1))
    for total, _ in micro_batch_gradients(trainer, groups, 2):
        pairs = list(zip(jax.tree.leaves(total), jax.tree.leaves(trainer.params), strict=True))
        assert all(a.sharding.is_equivalent_to(p.sharding, p.ndim) for a, p in pairs)
        per_device = lambda tree: sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))  # noqa
        assert per_device(total) == per_device(trainer.params)


def test_rollout_weights_dtype_samples_from_a_cast_copy_refreshed_after_each_update(shared_run):
    """rollout.weights_dtype=bfloat16: the sampler gets the parameters cast to bf16 (in their shardings), a new copy
    after every update, while the trainer keeps float32 parameters (and recomputes the old log-probabilities, so
    the first update is exactly on-policy); without it the sampler gets the parameters themselves."""
    cfg, tokenizer, model_cfg = shared_run

    def spy(trainer):
        seen = []
        generate = trainer.sampler.generate

        def record(model, prompts, key):
            leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
            seen.append((flat_params(nnx.state(model, nnx.Param)), flat_params(trainer.params),
                         all(a is b for a, b in zip(leaves, jax.tree.leaves(trainer.params), strict=True))))
            return generate(model, prompts, key)

        trainer.sampler.generate = record
        return seen

    plain = make_trainer(shared_run, LetterReward())
    seen = spy(plain)
    plain.collect(jax.random.PRNGKey(0))
    assert seen and all(same for _, _, same in seen) and plain.rollout_params is None  # no copy

    bf16 = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, weights_dtype="bfloat16"))
    trainer = make_trainer((bf16, tokenizer, model_cfg), LetterReward())
    assert trainer.recompute
    seen = spy(trainer)
    first, second = trainer.step(), trainer.step()
    assert len(seen) == 2 and first["optimizer_updates"] == 1 and np.isfinite(second["loss"])
    assert first["ratio_mean"] == 1.0 and first["logprob_mismatch_max"] > 0  # old log-probs: the trainer's own
    cast = lambda flat: {k: np.asarray(jnp.asarray(v).astype(jnp.bfloat16)) for k, v in flat.items()}  # noqa: E731
    for sampled, params, same in seen:
        assert not same and all(v.dtype == jnp.bfloat16 for v in sampled.values())
        assert all(v.dtype == np.float32 for v in params.values())
        expected = cast(params)
        assert all(np.array_equal(sampled[k], expected[k]) for k in expected)  # the current policy, cast
    (s1, p1, _), (s2, p2, _) = seen
    assert any(not np.array_equal(p1[k], p2[k]) for k in p1) and any(not np.array_equal(s1[k], s2[k]) for k in s1)
    assert trainer.rollout_params is None  # dropped by the last update, cast again on the next rollout
    copy = nnx.state(trainer.rollout_model, nnx.Param)
    pairs = list(zip(jax.tree.leaves(copy), jax.tree.leaves(trainer.params), strict=True))
    assert all(c.dtype == jnp.bfloat16 and c.sharding.is_equivalent_to(p.sharding, p.ndim) for c, p in pairs)


class NoReward(LetterReward):
    """Every reward missing (e.g. the judge down): the components' NaN and invalid samples."""

    active = ["judge"]

    def score(self, completions, solutions):
        n = len(completions)
        return RewardBatch({"llm": np.full(n, np.nan, np.float32)}, np.zeros(n, np.float32), np.zeros(n, bool),
                           {"reward_composite_mean": float("nan"), "reward_llm_missing": float(n),
                            "reward_invalid": float(n)})


def test_a_run_with_every_reward_missing_saves_and_stops(tmp_path, capsys):
    run_dir = tmp_path / "run"
    code = main([*FAST, f"train.run_dir={run_dir}", "train.steps=10", "train.max_missing_steps=2",
                 "train.export_hf=false", "mesh.fsdp=4", "mesh.tensor=2"], rewards=NoReward())  # 8 test devices
    assert code == 3
    err = capsys.readouterr().err
    assert "stopped after step 2" in err and "llm (32 missing)" in err, err
    assert Checkpoints(run_dir / "checkpoints", 3).manager.latest_step() == 2


def test_only_the_running_mini_batch_holds_its_pixels_on_the_device(shared_run):
    """A step's mini-batches wait on the host: when a gradient program runs, the only prompt pixels on the device are
    its own mini-batch's (before, every micro-batch of the step was placed up front: 2.9 GiB per v6e chip for 7B,
    issue 14)."""
    trainer = make_trainer(shared_run, LetterReward(), micro_batches=2, rollout_batches=2, mini_batches=2)
    groups, _ = trainer.collect(jax.random.PRNGKey(3))
    patch_dim = trainer.model_cfg.vision.patch_dim
    seen, gradients = [], trainer.programs.gradients

    def counting(*args):
        seen.append(sum(a.ndim == 3 and a.shape[-1] == patch_dim for a in jax.live_arrays()))
        return gradients(*args)

    trainer.programs.gradients = counting
    trainer.update(groups)
    assert len(seen) >= 2 and max(seen) == 1, seen  # one or two (packed) micro-batches per mini-batch


def test_completion_widths():
    assert programs_module.completion_widths(4096) == (512, 1024, 2048, 4096)
    assert programs_module.completion_widths(256) == (64, 128, 256)
    assert programs_module.completion_widths(100) == (100,)


@pytest.mark.slow
def test_a_length_bucketed_update_equals_the_padded_one_without_new_programs(shared_run):
    """Samples packed several to a row, in micro-batches trimmed to a width bucket, give the update of full-width
    micro-batches of one sample per row (the gradient sums over the same mini-batch) with less work; other lengths
    next time compile nothing new."""
    kw = dict(rollout_changes=dict(max_new_tokens=128), micro_batches=2)
    bucketed, padded = make_trainer(shared_run, LetterReward(), **kw), make_trainer(shared_run, LetterReward(), **kw)
    assert bucketed.programs.widths == (64, 128)
    padded.programs = padded.updater.programs = StepPrograms(  # every micro-batch at full width, one sample a row
        padded.graphdef, padded.params, padded.mesh, micro_batches=2, loss=padded.train.loss, rollout=padded.rollout,
        tx=padded.tx, widths=(128,))
    padded.updater.samples_per_row = 1
    initial = flat_params(bucketed.params)
    groups, _ = bucketed.collect(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)

    def forced(groups, long_groups):  # completions of long-tailed lengths; the long ones in some groups only
        out = []
        for i, grp in enumerate(groups):
            cap = 128 if i in long_groups else 40
            lengths = np.clip(rng.lognormal(np.log(24), 0.8, len(grp.mask)).astype(int), 1, cap)
            lengths[0] = cap  # the group's longest
            out.append(grp._replace(mask=np.arange(grp.mask.shape[1])[None] < lengths[:, None]))
        return out

    first = forced(groups, long_groups={1})
    assert max(int(g.mask.sum(1).max()) for g in first) > 64
    calls, applied = {}, {}  # per trainer: (width, samples in its fullest row) per micro-batch; the gradient

    def record(trainer):
        programs = trainer.programs
        gradients, apply = programs.gradients, programs.apply
        calls[trainer] = []

        def recording(params, embedded, layout, *args):
            calls[trainer].append((programs.widths[int(args[-1])], int(np.asarray(layout.segments).max())))
            return gradients(params, embedded, layout, *args)

        def applying(params, state, grads):
            applied[trainer] = flat_params(grads)
            return apply(params, state, grads)
        programs.gradients, programs.apply = recording, applying
        return gradients, apply

    for trainer in (bucketed, padded):
        gradients, apply = record(trainer)
        trainer.update(first)
        trainer.programs.gradients, trainer.programs.apply = gradients, apply
    assert calls[padded] == [(128, 1), (128, 1)]  # two micro-batches of one sample per row at full width
    work = {trainer: sum(width for width, _ in c) for trainer, c in calls.items()}  # rows x (prompt + width)
    assert work[bucketed] < work[padded] and max(n for _, n in calls[bucketed]) >= 2, calls[bucketed]
    # The same gradient up to float32 summation order. (Not compared after AdamW: its first step is lr * g / (|g| +
    # eps), which turns rounding in a near-zero gradient into a visible change.)
    g, h = applied[bucketed], applied[padded]
    scale = max(float(np.abs(v).max()) for v in h.values())
    print("gradient difference", max(float(np.abs(g[k] - h[k]).max()) for k in g), "largest", scale)
    assert max(float(np.abs(g[k] - h[k]).max()) for k in g) <= 1e-5 * scale and scale > 1e-3
    a = flat_params(bucketed.params)
    assert max(float(np.abs(a[k] - initial[k]).max()) for k in a) > 1e-4  # the update really moved the parameters
    compiled = bucketed.compile_count
    for long_groups in ({0, 3}, set(), {0, 1, 2, 3}, {2}):  # other lengths, other widths: no new program
        bucketed.update(forced(groups, long_groups))
    assert bucketed.compile_count == compiled
