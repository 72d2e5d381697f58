"""The step's programs are built once (``rl.programs.StepPrograms``): what ``plan`` compiles ahead of time is the very
program the trainer runs, on arguments of the same shapes, dtypes and layouts."""

import dataclasses

import jax
import pytest

from medix_jax import parallel
from medix_jax.config import load_config
from medix_jax.data.pipeline import PromptBatches, data_source
from medix_jax.generate import continuous, static
from medix_jax.plan_programs import build_programs, prefill_outputs
from medix_jax.rl.rollout import ScoredNow
from medix_jax.rl.trainer import Trainer
from medix_jax.train import DEFAULT_CONFIG, build_model, prepare_embedded_data, tokenizer_and_model_config
from tests.support.letter_reward import LetterReward

SETTINGS = ["rollout.max_new_tokens=128", "rollout.num_samples=4", "data.batch_size=8",
            "sft.steps=0", "eval.split=null", "train.micro_batches=2", "train.loss.kl_coef=0.05",
            "model.dtype=bfloat16", "mesh.fsdp=4", "mesh.tensor=2"]  # widths 64/128, KL, recomputed old log-probs


def abstract(args):
    """Arrays as ``ShapeDtypeStruct``s with their shardings; everything else (static arguments) as it is."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding)
                        if isinstance(a, jax.Array) else a, args)


def same_program(fn, ours, program) -> None:
    """The trainer's ``fn`` on its arguments ``ours`` and plan's ``program`` on its own: equal jaxprs, and every
    argument the trainer split over the mesh laid out alike in plan's."""
    theirs = program.args
    assert str(fn.trace(*abstract(ours)).jaxpr) == str(program.fn.trace(*theirs).jaxpr)
    ours, theirs = jax.tree.leaves(abstract(ours)), jax.tree.leaves(theirs)
    arrays = [(a, b) for a, b in zip(ours, theirs, strict=True) if isinstance(a, jax.ShapeDtypeStruct)]
    assert arrays and all((a.shape, a.dtype) == (b.shape, b.dtype) for a, b in arrays)
    split = [(a, b) for a, b in arrays if isinstance(a.sharding, jax.sharding.NamedSharding)
             and not a.sharding.is_fully_replicated]
    assert split and all(a.sharding.is_equivalent_to(b.sharding, len(a.shape)) for a, b in split)


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["static", "continuous"])
def test_plan_compiles_the_trainers_update_and_decode(tmp_path, monkeypatch, sampler):
    """The static sampler on the trainer's layout; the continuous one (the default) on the sampler's own layout
    (``rollout.mesh``: 4 replicas x tensor 2), with the cast + reshard."""
    layout = [] if sampler == "static" else ["rollout.mesh={data: -1, tensor: 2}"]
    cfg = load_config(DEFAULT_CONFIG, [*SETTINGS, f"rollout.batching={sampler}", *layout, f"train.run_dir={tmp_path}"])
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=prepare_embedded_data(tmp_path)))
    tokenizer, model_cfg, _ = tokenizer_and_model_config(cfg, tmp_path)
    cfg = dataclasses.replace(cfg, model=model_cfg)
    mesh = parallel.make_mesh(dataclasses.asdict(cfg.mesh))
    data = PromptBatches(data_source(cfg.data), cfg.data, model_cfg, tokenizer, cfg.buckets, cfg.seed)
    trainer = Trainer(build_model(cfg, model_cfg, mesh), tokenizer, data, ScoredNow(LetterReward()), cfg.train,
                      cfg.rollout, cfg.buckets, mesh, cfg.seed)
    seen = {}

    class recording:  # noqa: N801 -- stands in for a jitted function, recording its first arguments
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __call__(self, *args):
            seen.setdefault(self.name, args)
            return self.fn(*args)

        def __getattr__(self, attr):  # the compile count reads the jitted function's cache
            return getattr(self.fn, attr)

    gradients, logprobs = trainer.programs.gradients, trainer.programs.logprobs
    trainer.programs.gradients = recording("update", gradients)
    trainer.programs.logprobs = recording("logprobs", logprobs)
    module, name = (static, "decode") if sampler == "static" else (continuous, "decode_round")
    monkeypatch.setattr(module, name, recording("decode", getattr(module, name)))
    trainer.step()
    decode = monkeypatch.undo() or getattr(module, name)
    assert seen.keys() == {"update", "logprobs", "decode"}

    planned, shapes = build_programs(cfg, mesh, images=1, image_rows=None)
    by_name = {p.name: p for p in planned}
    planned_decode = (shapes["decode_program"](prefill_outputs(by_name["prefill"])) if sampler == "static"
                      else by_name["round"])
    same_program(gradients, seen["update"], by_name["update"])
    same_program(logprobs, seen["logprobs"], by_name["logprobs"])
    same_program(decode, seen["decode"], planned_decode)
    assert planned_decode.fn is decode  # the sampler's program itself; the update: the same StepPrograms build
    assert not planned_decode.alternative and planned_decode.count == 1
