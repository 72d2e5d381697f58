"""The main job: ``python -m medix_jax.train [--config FILE] [key=value ...]``.

A run is ``sft.steps`` supervised steps (``rl/sft.py``; 0: none) then ``train.steps`` GRPO steps (``rl/trainer.py``;
0: none), one step counter, and after each stage the held-out evaluation of ``eval.split`` (``HeldOut``).

With no arguments it runs the embedded default (``configs/tiny.yaml``): a tiny random Qwen2.5-VL with a tokenizer
trained on the spot, on a synthetic dataset generated and prepared into the run directory; a cold start on the
records' reasoning traces with random answers, then GRPO rewarded by the format and modality rules and the offline
embedding model (the LLM judge joins when ``rewards.judge.url`` is set). Real runs name a config
(``configs/qwen2_5_vl_3b_grpo.yaml``, ...) whose ``checkpoint`` is a local HF checkpoint directory (weights and
tokenizer) and whose ``data.data_dir`` is a prepared dataset.

Everything lands in ``train.run_dir``: ``checkpoints/`` (orbax; the run resumes from the newest one), ``metrics.jsonl``
and ``tensorboard/``, ``config.yaml`` (resolved), ``eval/step_N/`` and ``results.md`` / ``results.json`` (the
held-out evaluations, side by side), ``curves.png`` and, at the end, ``hf/`` (an HF checkpoint). Running a finished
run again only says where its results are.
SIGTERM or SIGINT (TPU preemption, Ctrl-C) finishes the current step, saves and exits cleanly; a second one stops
at once.

Several processes (``distributed.*``, one per host or GPU node) run the same command. Each reads its own rows of
every batch and keeps its own data position in the checkpoint. Process 0 writes the run directory's files. All
of them stop after the same step when any one is signalled.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import signal
import sys
from pathlib import Path

import jax
import yaml
from tqdm import tqdm

from medix_jax import cli, parallel
from medix_jax.checkpoint import Checkpoints, IncompatibleCheckpoint
from medix_jax.config import Config, ConfigError, load_config, to_dict
from medix_jax.data.image import processor_config
from medix_jax.data.pipeline import NotPrepared, check_prepared
from medix_jax.metrics import MetricsWriter
from medix_jax.models.qwen_vl.hf_io import AUX_FILES, has_tokenizer
from medix_jax.plot import plot_run

ROOT = Path(__file__).resolve().parent.parent  # the project: configs/ beside the package
DEFAULT_CONFIG = ROOT / "configs" / "tiny.yaml"
SYNTHETIC_SIZES = {"train": 512, "test": 128}
SYNTHETIC_IMAGE_SIZE = (56, 56)  # pixels per side: 2 x 2 merged image tokens for the tiny model
TOKENIZER = "tokenizer"  # run_dir/tokenizer: the run's tokenizer, chat template and processor files


class RewardsUnavailable(RuntimeError):
    """Every reward was missing for ``train.max_missing_steps`` steps in a row; the run saved before stopping."""


def prepare_embedded_data(run_dir: Path) -> str:
    """The synthetic dataset, generated and prepared once into ``run_dir/data``; returns the tfds data dir."""
    from medix_jax.data.builder import VERSION
    from medix_jax.data.prepare import prepare
    from medix_jax.data.synthetic import write_synthetic

    data_dir = run_dir / "data" / "tfds"
    if jax.process_index() == 0 and not (data_dir / "medix_rl" / VERSION).exists():
        write_synthetic(run_dir / "data" / "source", "parquet", **SYNTHETIC_SIZES, image_size=SYNTHETIC_IMAGE_SIZE)
        prepare(run_dir / "data" / "source", data_dir)
    parallel.barrier("embedded dataset")
    return str(data_dir)


def tokenizer_and_model_config(cfg: Config, run_dir: Path):
    """The tokenizer of ``checkpoint`` or, for a preset, one trained on the spot (by process 0, into
    ``run_dir/tokenizer``); the model config's special token ids are taken from it."""
    from transformers import AutoTokenizer

    from medix_jax.data.prompts import token_ids
    from medix_jax.data.synthetic import synthetic_records
    from medix_jax.data.tokenizer import train_tokenizer
    from medix_jax.rewards.rules import parse_solution

    checkpoint = _checkpoint_dir(cfg)
    tokenizer_dir = run_dir / TOKENIZER
    if checkpoint:  # copied into the run, so that the run directory stands alone (moved, copied, exported)
        if jax.process_index() == 0 and not has_tokenizer(tokenizer_dir):
            tokenizer_dir.mkdir(parents=True, exist_ok=True)
            for name in AUX_FILES:
                if (checkpoint / name).is_file():
                    shutil.copy2(checkpoint / name, tokenizer_dir / name)
        parallel.barrier("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        records = list(synthetic_records(256))
        texts = [cfg.data.prompt] * 8 + [r["problem"] + " " + r["solution"] for r in records]
        texts += [cfg.sft.template.format(tag=tag, answer=answer, thinking=cfg.sft.thinking)  # the answer format
                  for tag, answer in (parse_solution(r["solution"]) for r in records)]
        texts += [r["completion"] for r in records]  # the reasoning traces
        if jax.process_index() == 0:
            train_tokenizer(texts, tokenizer_dir, cfg.model.text.vocab_size)
        parallel.barrier("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) > cfg.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size {cfg.model.text.vocab_size} is smaller than the tokenizer "
                          f"({len(tokenizer)} tokens)")
    tokens = token_ids(tokenizer, checkpoint)
    return tokenizer, dataclasses.replace(cfg.model, tokens=tokens), tokenizer_dir


def _checkpoint_dir(cfg: Config) -> Path | None:
    """``checkpoint`` as a directory of HF safetensors (None without one); anything else is a ``ConfigError``."""
    if not cfg.checkpoint:
        return None
    path = Path(cfg.checkpoint)
    if not path.is_dir():
        raise ConfigError(f"checkpoint {path} does not exist: set checkpoint=DIR to a local HF checkpoint directory "
                          "(weights and tokenizer), or drop it to start from model.preset")
    if not any(path.glob("*.safetensors")):
        runs = " (it is a training run: export it with python -m medix_jax.export --checkpoint " \
               f"{path} --out DIR, then checkpoint=DIR)" if (path / "checkpoints").is_dir() else ""
        raise ConfigError(f"checkpoint {path} holds no *.safetensors{runs}: set checkpoint=DIR to a local HF "
                          "checkpoint directory (weights and tokenizer)")
    if not has_tokenizer(path):
        raise ConfigError(f"checkpoint {path} holds no tokenizer (tokenizer_config.json and tokenizer.json or "
                          "vocab.json): copy the base model's tokenizer files into it")
    return path


def build_model(cfg: Config, model_cfg, mesh):
    from flax import nnx

    from medix_jax.models.qwen_vl import QwenVL
    from medix_jax.models.qwen_vl.hf_io import load_hf

    rules = {**parallel.DEFAULT_RULES, **cfg.sharding_rules}
    checkpoint = _checkpoint_dir(cfg)
    if checkpoint:
        return load_hf(checkpoint, model_cfg.dtype, model_cfg.param_dtype, mesh, rules, tokens=model_cfg.tokens,
                       remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, attention=model_cfg.attention)
    return parallel.init_sharded(lambda: QwenVL(model_cfg, rngs=nnx.Rngs(cfg.seed)), mesh, rules)


def run(cfg: Config, rewards=None) -> Path:
    """Run the job to its end: ``sft.steps`` supervised steps, then ``train.steps`` GRPO steps, each stage followed by
    the held-out evaluation (resuming if the run has checkpoints; a finished run only says where its results are).
    ``rewards``: anything with the reward pool's ``score(completions, solutions) -> RewardBatch`` (default:
    ``RewardPool(cfg.rewards)``)."""
    job = Job(cfg, rewards)
    try:
        restored = job.restore()
        if restored and job.complete():
            return job.run_dir
        job.announce(restored)
        halt = job.steps()
    finally:
        job.close()
    if halt or job.trainer.step_count < job.total:
        if job.lead and halt:
            print(f"medix_jax.train: {f'signal {job.stop[0]}' if job.stop else 'another process was signalled'}: "
                  f"saved step {job.trainer.step_count}; run again to resume")
        return job.run_dir
    job.finish()
    return job.run_dir


class Job:
    """One run (``run``): its set-up -- run directory, mesh, data, model, trainer, supervised stage, held-out
    evaluation, checkpoints --, resuming, the steps with saves and signals, and the end (export, curves, results)."""

    def __init__(self, cfg: Config, rewards=None):
        from medix_jax.data.pipeline import PromptBatches, data_source
        from medix_jax.rewards.pool import RewardPool
        from medix_jax.rl.rollout import Rewards, ScoredNow
        from medix_jax.rl.sft import SupervisedStage, label_sets
        from medix_jax.rl.trainer import Trainer

        self.run_dir = run_dir = Path(cfg.train.run_dir)
        self.lead = jax.process_index() == 0
        self.total = cfg.sft.steps + cfg.train.steps
        if self.total == 0:
            raise ConfigError("sft.steps and train.steps are both 0: nothing to run")
        if self.lead:
            cli.check_writable(run_dir, "train.run_dir")
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
        _checkpoint_dir(cfg)  # before any data work
        if cfg.data.data_dir:
            check_prepared(cfg.data.data_dir, cfg.data.name)
        self.mesh = mesh = parallel.make_mesh(dataclasses.asdict(cfg.mesh))
        if not cfg.data.data_dir:
            cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=prepare_embedded_data(run_dir)))
        tokenizer, model_cfg, _ = tokenizer_and_model_config(cfg, run_dir)
        self.cfg = cfg = dataclasses.replace(cfg, model=model_cfg)  # the config records the tokenizer's token ids
        model = build_model(cfg, model_cfg, mesh)
        source = data_source(cfg.data)
        self.data = PromptBatches(source, cfg.data, model_cfg, tokenizer, cfg.buckets, cfg.seed,
                                  parallel.process_rows(mesh, cfg.data.batch_size))
        self.pool: Rewards = RewardPool(cfg.rewards) if rewards is None else ScoredNow(rewards)
        self.trainer = Trainer(model, tokenizer, self.data, self.pool,
                               cfg.train, cfg.rollout, cfg.buckets, mesh, cfg.seed, end=self.total)
        labels = label_sets(source) if "random" in (cfg.sft.answers, cfg.sft.tags) else None
        self.sft = SupervisedStage(self.trainer, cfg.sft, labels) if cfg.sft.steps else None
        self.held_out = HeldOut(cfg, run_dir, tokenizer, self.pool, labels)
        # The end of the supervised stage is kept: the KL reference of the GRPO stage that follows it.
        self.checkpoints = Checkpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints,
                                       (cfg.sft.steps,) * bool(self.sft))
        self.meta = {"config": to_dict(cfg), "tokenizer": TOKENIZER}  # the tokenizer's directory, relative to the run
        self.stop: list[int] = []
        self.saved: list[int] = []

    def stage(self):
        """The stage that the next step (or the newest checkpoint) belongs to."""
        sft, trainer = self.sft, self.trainer
        return sft if sft is not None and trainer.step_count < self.cfg.sft.steps else trainer

    def opt_state(self):
        """The optimizer state to save: a checkpoint at the end of the supervised stage holds its state."""
        sft, trainer = self.sft, self.trainer
        return sft.opt_state if sft is not None and trainer.step_count <= self.cfg.sft.steps else trainer.opt_state

    def restore(self) -> bool:
        """Resume from the newest checkpoint, if any (parameters, optimizer state, step, data positions, the KL
        reference of a GRPO stage after a supervised one); whether there was one."""
        cfg, trainer, sft, checkpoints = self.cfg, self.trainer, self.sft, self.checkpoints
        like = {"params": trainer.params, "opt_state": trainer.opt_state}  # the SFT optimizer state has its tree
        restored = checkpoints.restore_latest(like, to_dict(cfg))
        if restored:
            step, state, data_state = restored
            trainer.params, trainer.step_count = state["params"], step
            if sft is not None and step <= cfg.sft.steps:
                sft.opt_state = state["opt_state"]
            else:
                trainer.opt_state = state["opt_state"]
            states = data_state.get("processes", [data_state])  # one state: written before per-process states
            self.data.set_state(this_process_state(states, step, checkpoints.directory))
            if sft is not None and step > cfg.sft.steps and cfg.train.loss.kl_coef > 0:
                trainer.set_reference(_reference(checkpoints, cfg.sft.steps, like))
        self.saved = [trainer.step_count]
        return bool(restored)

    def complete(self) -> bool:
        """Whether the restored run is already complete (then it says where its results are)."""
        cfg, run_dir = self.cfg, self.run_dir
        if self.trainer.step_count < self.total or not self.held_out.complete() or \
                (run_dir / "hf").exists() != cfg.train.export_hf:
            return False
        if self.lead:
            print(f"medix_jax.train: the run in {run_dir.absolute()} is already complete ({self.trainer.step_count} "
                  f"of {self.total} steps); its results: {run_dir / RESULTS}.md, metrics {run_dir / 'metrics.jsonl'},"
                  f" curves {run_dir / 'curves.png'}" + (f", HF checkpoint {run_dir / 'hf'}" if cfg.train.export_hf
                                                         else "")
                  + ". Start a new run in another train.run_dir (or raise sft.steps / train.steps to go on).")
        return True

    def announce(self, restored: bool) -> None:
        cfg = self.cfg
        if self.lead:
            stages = [f"{cfg.sft.steps} supervised"] * bool(cfg.sft.steps) + [f"{cfg.train.steps} GRPO"] * bool(
                cfg.train.steps)
            print(f"medix_jax.train: run {self.run_dir.absolute()}, {jax.device_count()} {jax.devices()[0].platform} "
                  f"device(s) in {jax.process_count()} process(es), mesh {dict(self.mesh.shape)}; rewards: "
                  f"{', '.join(self.pool.active)}; {' then '.join(stages)} steps; "
                  + (f"resumed at step {self.trainer.step_count}" if restored else "starting at step 0")
                  + f" of {self.total}", flush=True)

    def save(self) -> None:
        trainer = self.trainer
        if self.saved[-1] != trainer.step_count:
            data_states = {"processes": parallel.host_gather(trainer.data_state())}  # every process's position
            self.checkpoints.save(trainer.step_count, {"params": trainer.params, "opt_state": self.opt_state()},
                                  data_states, {**self.meta, "step": trainer.step_count})
            if len(self.saved) == 1:  # config.yaml says what the newest checkpoint holds: written once one is saved
                self.checkpoints.wait()
                if self.lead:
                    (self.run_dir / "config.yaml").write_text(yaml.safe_dump(self.meta["config"], sort_keys=False))
            self.saved.append(trainer.step_count)

    def halted(self) -> bool:
        """Any process signalled: all stop after the same step (a collective)."""
        return bool(parallel.host_max(bool(self.stop)))

    def steps(self) -> bool:
        """The steps to the end of the run, saving every ``train.save_every`` and at each stage's end; SIGTERM or
        SIGINT saves after the current step (a second one stops at once). Returns whether a signal stopped it."""
        def on_signal(signum, _frame):
            if self.stop:  # a second signal: stop now, without the save
                raise KeyboardInterrupt
            self.stop.append(signum)

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            with MetricsWriter(self.run_dir, enabled=self.lead) as writer:
                writer.truncate_after(self.trainer.step_count)
                bar = tqdm(total=self.total, initial=self.trainer.step_count, desc="train", disable=not self.lead)
                halt = self.halted()
                while not halt and self.step(writer, bar):
                    halt = self.halted()
                    count = self.trainer.step_count
                    if count % self.cfg.train.save_every == 0 or count in (self.cfg.sft.steps, self.total) or halt:
                        self.save()
                bar.close()
            self.checkpoints.wait()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        return halt

    def step(self, writer: MetricsWriter, bar) -> bool:
        """One step of the current stage, its metrics written; False when the run has nothing more to do."""
        trainer, sft, cfg = self.trainer, self.sft, self.cfg
        self.held_out.catch_up(trainer)  # a stage that just ended (or ended before a kill) is evaluated first
        if trainer.step_count >= self.total:
            return False
        current = self.stage()
        if current is trainer and sft is not None and trainer.step_count == cfg.sft.steps:
            trainer.set_reference()  # the policy GRPO starts from
        try:
            metrics = current.step()
        except StopIteration:  # a finite data.epochs ran out
            if self.lead:
                print(f"medix_jax.train: the data ran out after step {trainer.step_count}", flush=True)
            self.save()
            return False
        writer.write(trainer.step_count, metrics)
        bar.update(1)
        bar.set_description("sft" if current is sft else "grpo")
        bar.set_postfix(progress(metrics, supervised=current is sft))
        if current is trainer:
            problem = trainer.rewards_down(metrics)  # the same on every process (combined metrics)
            if problem:
                self.save()
                raise RewardsUnavailable(f"stopped after step {trainer.step_count}: {problem}")
        return True

    def close(self) -> None:
        self.trainer.close()  # rollouts ahead first: they read the data and use the reward pool
        self.checkpoints.close()
        self.data.close()
        self.pool.close()

    def finish(self) -> None:
        """The end of a complete run: the HF export, the curves, the held-out results table."""
        from medix_jax.models.qwen_vl.hf_io import save_hf

        cfg, run_dir, trainer = self.cfg, self.run_dir, self.trainer
        if cfg.train.export_hf:  # every process takes part (the parameters are gathered); process 0 writes
            save_hf(trainer.model, run_dir / "hf", base_dir=run_dir / TOKENIZER,
                    image_processor=processor_config(cfg.data.min_pixels, cfg.data.max_pixels,
                                                     cfg.model.vision.patch_size, family=cfg.model.family))
        if self.lead:
            if (run_dir / "metrics.jsonl").exists():
                plot_run(run_dir)
            table = self.held_out.report()
            if table:
                print(table)
            print(f"medix_jax.train: done, {trainer.step_count} steps; metrics {run_dir / 'metrics.jsonl'}, curves "
                  f"{run_dir / 'curves.png'}" + (f", results {run_dir / RESULTS}.md" if table else "")
                  + (f", HF checkpoint {run_dir / 'hf'}" if cfg.train.export_hf else ""))


def _reference(checkpoints: Checkpoints, step: int, like: dict):
    """The parameters of the checkpoint at the end of the supervised stage (``step``): the KL reference of a run
    resumed in its GRPO stage."""
    if step not in checkpoints.manager.all_steps():
        raise ConfigError(f"{checkpoints.directory / str(step)} is missing: it holds the policy at the end of the "
                          "supervised stage, the GRPO stage's KL reference; without it this run cannot resume "
                          "(start a new train.run_dir)")
    return checkpoints.restore(step, like)["params"]


def progress(metrics: dict, supervised: bool) -> dict[str, str]:
    """The progress bar's figures for a step: the mean composite reward and the NLL (supervised) or the loss, in
    significant digits, so that a small loss shows as 3.2e-05, never as 0.0000."""
    shown = {"reward": f"{metrics.get('reward_composite_mean', float('nan')):.3f}"}
    if supervised:
        shown["nll"] = f"{metrics['sft_loss']:.4g}"
    else:
        shown["loss"] = f"{metrics['loss']:.3g}" if "loss" in metrics else "no update (no signal)"
    return shown


RESULTS = "results"  # run_dir/results.{md,json}: the held-out evaluation after each stage, side by side


class HeldOut:
    """The held-out evaluation at the end of each stage: greedy generations on ``eval.split`` of the run's data,
    through ``medix_jax.evaluate`` (the code path of ``python -m medix_jax.evaluate``), scored by the run's own reward
    pool. Each evaluation is written to ``run_dir/eval/step_N/`` (``results.json``, ``results.md``, cached
    generations); ``report`` writes the stages side by side to ``run_dir/results.{md,json}``. In a job of several
    processes the run is evaluated afterwards (``python -m medix_jax.evaluate``)."""

    def __init__(self, cfg: Config, run_dir: Path, tokenizer, pool, labels=None):
        from medix_jax import evaluate

        self.cfg, self.run_dir, self.tokenizer, self.pool = cfg, run_dir, tokenizer, pool
        self.points = [("after SFT", cfg.sft.steps)] * bool(cfg.sft.steps) + [
            ("after GRPO", cfg.sft.steps + cfg.train.steps)] * bool(cfg.train.steps)
        self.chance = 1 / len(labels[0]) if labels and labels[0] else None
        self.task = None
        if cfg.eval.split is None:
            return
        if jax.process_count() > 1:
            if jax.process_index() == 0:
                print("medix_jax.train: the held-out evaluation runs in single-process jobs only; evaluate this run "
                      f"afterwards: python -m medix_jax.evaluate --model {run_dir}", flush=True)
            return
        assert cfg.data.data_dir is not None  # the job has resolved it (the embedded dataset by default)
        self.task = evaluate.medix_task("held_out", cfg.data.data_dir, cfg.eval.split, cfg.data.name,
                                        cfg.eval.max_samples)
        self.samples = len(evaluate.load_items(self.task))  # a missing split fails now, not after training

    def _dir(self, step: int) -> Path:
        return self.run_dir / "eval" / f"step_{step}"

    def complete(self) -> bool:
        return self.task is None or all((self._dir(step) / "results.json").exists() for _, step in self.points)

    def catch_up(self, trainer) -> None:
        """Evaluate the stage that ends at the current step, unless that was done (e.g. before a kill)."""
        for name, step in self.points:
            if self.task is not None and trainer.step_count == step and not (self._dir(step) / "results.json").exists():
                # the sampler's own copy and layout (rollout.weights_dtype, rollout.mesh), as rollouts sample
                self.run(trainer.rollout_model, name, step, trainer.programs.rollout_mesh)

    def run(self, model, name: str, step: int, mesh) -> dict:
        from medix_jax import evaluate

        d, task = self.cfg.data, self.task
        assert task is not None  # catch_up evaluates only with a held-out split
        generator = evaluate.SamplerGenerator(model, self.tokenizer, self.cfg.rollout.max_new_tokens, d.prompt,
                                              d.min_pixels, d.max_pixels, mesh=mesh)
        print(f"medix_jax.train: evaluating {name} (step {step}) on {self.samples} held-out samples "
              f"({d.data_dir}, split {self.cfg.eval.split})", flush=True)
        summary = evaluate.evaluate([task], generator, None, self._dir(step), self.cfg.eval.batch_size,
                                    pool=self.pool)
        print(self.row(name, step, summary["tasks"][task.name]), flush=True)
        return summary

    COLUMNS = ("format", "modality", "accuracy", "embed", "llm", "composite")

    def row(self, name: str, step: int, result: dict) -> str:
        cells = [f"{100 * result[c]:.1f}" if result.get(c) is not None else "–" for c in self.COLUMNS]
        return f"| {name} (step {step}) | " + " | ".join(cells) + " |"

    def report(self) -> str | None:
        """The stages' held-out results side by side (markdown, also written to ``run_dir/results.md`` and
        ``.json``), or None without an evaluation."""
        if self.task is None:
            return None
        rows, data = [], {}
        for name, step in self.points:
            path = self._dir(step) / "results.json"
            if path.exists():
                result = json.loads(path.read_text())["tasks"][self.task.name]
                rows.append(self.row(name, step, result))
                data[name] = {"step": step, **result}
        chance = f"; answering at random scores {100 * self.chance:.1f} % accuracy" if self.chance else ""
        table = "\n".join([
            f"held-out evaluation: {self.samples} samples of split {self.cfg.eval.split!r}, greedy; percentages of "
            f"samples{chance}",
            "", "| | " + " | ".join(self.COLUMNS) + " |", "|---" + "|---:" * len(self.COLUMNS) + "|", *rows])
        (self.run_dir / f"{RESULTS}.md").write_text(table + "\n")
        (self.run_dir / f"{RESULTS}.json").write_text(json.dumps(
            {"split": self.cfg.eval.split, "samples": self.samples, "chance_accuracy": self.chance, **data}, indent=2))
        return table


def this_process_state(states: list[dict], step: int, directory: Path) -> dict:
    """This process's data position from a checkpoint's per-process list."""
    if len(states) != jax.process_count():
        raise RuntimeError(
            f"checkpoint {directory / str(step)} was written by {len(states)} process(es), each reading its own rows "
            f"of every batch; resume it with {len(states)} (this job has {jax.process_count()}). Its parameters "
            "restore anywhere: python -m medix_jax.export, then start a new run from that HF checkpoint")
    return states[jax.process_index()]


def main(argv=None, rewards=None) -> int:
    parser = cli.parser("medix_jax.train", __doc__)
    parser.add_argument("--config", action="append", help="YAML config; repeat to layer files, e.g. a run config "
                        f"then a mesh preset (default: the embedded tiny run, {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--no-judge-check", dest="judge_check", action="store_false",
                        help="start without sending the judge (rewards.judge.url) one probe request first")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 data.batch_size=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config or [DEFAULT_CONFIG], args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        return cli.fail("train", e)
    try:
        parallel.initialize_distributed(cfg.distributed)
    except (ValueError, RuntimeError) as e:
        return cli.fail("train", e)
    if args.judge_check and rewards is None and cfg.rewards.judge.url:
        from medix_jax.rewards.judge import JudgeUnreachable, check_judge

        try:
            check_judge(cfg.rewards.judge)
        except JudgeUnreachable as e:
            return cli.fail("train", e)
    try:
        run(cfg, rewards)
    except RewardsUnavailable as e:
        return cli.fail("train", e, 3)
    except (ConfigError, IncompatibleCheckpoint, NotPrepared, cli.Unwritable) as e:
        return cli.fail("train", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
