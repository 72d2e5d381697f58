"""The main job: ``python -m medix_jax.train [--config FILE] [key=value ...]``.

With no arguments it runs the embedded default (``configs/tiny.yaml``): a tiny random Qwen2.5-VL with a tokenizer
trained on the spot, on a synthetic dataset generated and prepared into the run directory, rewarded by the format
and modality rules and the offline embedding model (the LLM judge joins when ``rewards.judge.url`` is set). Real
runs name a config (``configs/qwen2_5_vl_3b_grpo.yaml``, ...) whose ``checkpoint`` is a local HF checkpoint
directory (weights and tokenizer) and whose ``data.data_dir`` is a prepared dataset.

Everything lands in ``train.run_dir``: ``checkpoints/`` (orbax; the run resumes from the newest one), ``metrics.jsonl``
and ``tensorboard/``, ``config.yaml`` (resolved), ``curves.png`` and, at the end, ``hf/`` (an HF checkpoint).
SIGTERM or SIGINT (TPU preemption, Ctrl-C) finishes the current step, saves and exits cleanly; a second one stops
at once.

Several processes (``distributed.*``, one per host or GPU node) run the same command. Each reads its own rows of
every batch and keeps its own data position in the checkpoint. Process 0 writes the run directory's files. All
of them stop after the same step when any one is signalled.
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
from pathlib import Path

import jax
import yaml
from tqdm import tqdm

from medix_jax import parallel
from medix_jax.checkpoint import Checkpoints
from medix_jax.config import Config, ConfigError, load_config, to_dict
from medix_jax.metrics import MetricsWriter
from medix_jax.plot import plot_run

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"
SYNTHETIC_SIZES = {"train": 256, "test": 32}


class RewardsUnavailable(RuntimeError):
    """Every reward was missing for ``train.max_missing_steps`` steps in a row; the run saved before stopping."""


def prepare_embedded_data(run_dir: Path) -> str:
    """The synthetic dataset, generated and prepared once into ``run_dir/data``; returns the tfds data dir."""
    from medix_jax.data.builder import VERSION
    from medix_jax.data.prepare import prepare
    from medix_jax.data.synthetic import write_synthetic

    data_dir = run_dir / "data" / "tfds"
    if jax.process_index() == 0 and not (data_dir / "medix_rl" / VERSION).exists():
        write_synthetic(run_dir / "data" / "source", "parquet", **SYNTHETIC_SIZES)
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

    checkpoint = _checkpoint_dir(cfg)
    if checkpoint:
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    else:
        texts = [cfg.data.prompt] * 8 + [r["problem"] + " " + r["solution"] for r in synthetic_records(256)]
        texts += ["<thinking>the lesion is round</thinking><answer>circle</answer>"] * 8
        if jax.process_index() == 0:
            train_tokenizer(texts, run_dir / "tokenizer", cfg.model.text.vocab_size)
        parallel.barrier("tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(run_dir / "tokenizer")
    if len(tokenizer) > cfg.model.text.vocab_size:
        raise ConfigError(f"model.text.vocab_size {cfg.model.text.vocab_size} is smaller than the tokenizer "
                          f"({len(tokenizer)} tokens)")
    tokens = token_ids(tokenizer, checkpoint)
    return tokenizer, dataclasses.replace(cfg.model, tokens=tokens), checkpoint or run_dir / "tokenizer"


def _checkpoint_dir(cfg: Config) -> Path | None:
    if not cfg.checkpoint:
        return None
    path = Path(cfg.checkpoint)
    if not any(path.glob("*.safetensors")):
        raise ConfigError(f"checkpoint: no *.safetensors in {path}")
    return path


def build_model(cfg: Config, model_cfg, mesh):
    from flax import nnx

    from medix_jax.models.qwen2_5_vl import Qwen2_5_VL
    from medix_jax.models.qwen2_5_vl.hf_io import load_hf

    rules = {**parallel.DEFAULT_RULES, **cfg.sharding_rules}
    checkpoint = _checkpoint_dir(cfg)
    if checkpoint:
        return load_hf(checkpoint, model_cfg.dtype, model_cfg.param_dtype, mesh, rules, tokens=model_cfg.tokens,
                       remat=model_cfg.remat, scan_layers=model_cfg.scan_layers, attention=model_cfg.attention)
    return parallel.init_sharded(lambda: Qwen2_5_VL(model_cfg, rngs=nnx.Rngs(cfg.seed)), mesh, rules)


def run(cfg: Config, rewards=None) -> Path:
    """Train to ``train.steps`` (resuming if the run has checkpoints). ``rewards``: anything with the reward pool's
    ``score(completions, solutions) -> RewardBatch`` (default: ``RewardPool(cfg.rewards)``)."""
    from medix_jax.data.pipeline import PromptBatches, data_source
    from medix_jax.models.qwen2_5_vl.hf_io import save_hf
    from medix_jax.rewards.pool import RewardPool
    from medix_jax.rl.trainer import Trainer

    run_dir = Path(cfg.train.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    lead = jax.process_index() == 0
    mesh = parallel.make_mesh(dataclasses.asdict(cfg.mesh))
    if not cfg.data.data_dir:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, data_dir=prepare_embedded_data(run_dir)))
    tokenizer, model_cfg, aux_dir = tokenizer_and_model_config(cfg, run_dir)
    cfg = dataclasses.replace(cfg, model=model_cfg)  # the resolved config records the tokenizer's token ids
    if lead:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    model = build_model(cfg, model_cfg, mesh)
    data = PromptBatches(data_source(cfg.data), cfg.data, model_cfg, tokenizer, cfg.buckets, cfg.seed,
                         parallel.process_rows(mesh, cfg.data.batch_size))
    pool = rewards or RewardPool(cfg.rewards)
    trainer = Trainer(model, tokenizer, data, pool, cfg.train, cfg.rollout, cfg.buckets, mesh, cfg.seed)
    checkpoints = Checkpoints(run_dir / "checkpoints", cfg.train.keep_checkpoints)
    restored = checkpoints.restore_latest({"params": trainer.params, "opt_state": trainer.opt_state})
    if restored:
        step, state, data_state = restored
        trainer.params, trainer.opt_state, trainer.step_count = state["params"], state["opt_state"], step
        states = data_state.get("processes", [data_state])  # one state: written before per-process states
        data.set_state(_this_process(states, step, checkpoints.directory))
    if lead:
        print(f"medix_jax.train: run {run_dir.absolute()}, {jax.device_count()} {jax.devices()[0].platform} "
              f"device(s) in {jax.process_count()} process(es), mesh {dict(mesh.shape)}; rewards: "
              f"{', '.join(getattr(pool, 'active', ['custom']))}; "
              + (f"resumed at step {trainer.step_count}" if restored else "starting at step 0")
              + f" of {cfg.train.steps}", flush=True)

    stop: list[int] = []
    saved = [trainer.step_count]

    def save() -> None:
        if saved[-1] != trainer.step_count:
            data_states = {"processes": parallel.host_gather(data.get_state())}  # every process's position
            checkpoints.save(trainer.step_count, {"params": trainer.params, "opt_state": trainer.opt_state},
                             data_states, {**meta, "step": trainer.step_count})
            saved.append(trainer.step_count)

    def on_signal(signum, _frame):
        if stop:  # a second signal: stop now, without the save
            raise KeyboardInterrupt
        stop.append(signum)

    def halted() -> bool:  # any process signalled: all stop after the same step (a collective)
        return bool(parallel.host_max(bool(stop)))

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    meta = {"config": to_dict(cfg), "aux_dir": str(Path(aux_dir).absolute())}
    try:
        with MetricsWriter(run_dir, enabled=lead) as writer:
            writer.truncate_after(trainer.step_count)
            bar = tqdm(total=cfg.train.steps, initial=trainer.step_count, desc="train", disable=not lead)
            halt = halted()
            while trainer.step_count < cfg.train.steps and not halt:
                try:
                    metrics = trainer.step()
                except StopIteration:  # a finite data.epochs ran out
                    if lead:
                        print(f"medix_jax.train: the data ran out after step {trainer.step_count}", flush=True)
                    save()
                    break
                writer.write(trainer.step_count, metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics.get('reward_composite_mean', float('nan')):.3f}",
                                loss=f"{metrics['loss']:.4f}" if "loss" in metrics else "no update (no signal)")
                problem = trainer.rewards_down(metrics)  # the same on every process (combined metrics)
                if problem:
                    save()
                    raise RewardsUnavailable(f"stopped after step {trainer.step_count}: {problem}")
                halt = halted()
                if trainer.step_count % cfg.train.save_every == 0 or trainer.step_count == cfg.train.steps or halt:
                    save()
            bar.close()
        checkpoints.wait()
    finally:
        checkpoints.close()
        data.close()
        getattr(pool, "close", lambda: None)()
        for s, handler in previous.items():
            signal.signal(s, handler)
    if halt:
        if lead:
            print(f"medix_jax.train: {f'signal {stop[0]}' if stop else 'another process was signalled'}: saved "
                  f"step {trainer.step_count}; run again to resume")
        return run_dir
    if cfg.train.export_hf:  # every process takes part (the parameters are gathered); process 0 writes
        save_hf(trainer.model, run_dir / "hf", base_dir=aux_dir)
    if lead:
        if (run_dir / "metrics.jsonl").exists():
            plot_run(run_dir)
        print(f"medix_jax.train: done, {trainer.step_count} steps; metrics {run_dir / 'metrics.jsonl'}, curves "
              f"{run_dir / 'curves.png'}" + (f", HF checkpoint {run_dir / 'hf'}" if cfg.train.export_hf else ""))
    return run_dir


def _this_process(states: list[dict], step: int, directory: Path) -> dict:
    """This process's data position from a checkpoint's per-process list."""
    if len(states) != jax.process_count():
        raise RuntimeError(
            f"checkpoint {directory / str(step)} was written by {len(states)} process(es), each reading its own rows "
            f"of every batch; resume it with {len(states)} (this job has {jax.process_count()}). Its parameters "
            "restore anywhere: python -m medix_jax.export, then start a new run from that HF checkpoint")
    return states[jax.process_index()]


def main(argv=None, rewards=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", help="YAML config; repeat to layer files, e.g. a run config "
                        "then a mesh preset (default: the embedded tiny run, configs/tiny.yaml)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=10 data.batch_size=2")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config or [DEFAULT_CONFIG], args.overrides)
    except (ConfigError, FileNotFoundError) as e:
        print(f"medix_jax.train: {e}", file=sys.stderr)
        return 2
    try:
        parallel.initialize_distributed(cfg.distributed)
    except (ValueError, RuntimeError) as e:
        print(f"medix_jax.train: {e}", file=sys.stderr)
        return 2
    try:
        run(cfg, rewards)
    except RewardsUnavailable as e:
        print(f"medix_jax.train: {e}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
