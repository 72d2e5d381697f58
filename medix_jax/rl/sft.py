"""Supervised fine-tuning (the "cold start" of R1-style recipes): token-level NLL of target completions.

``python -m medix_jax.train sft.steps=N`` runs N supervised steps before the GRPO steps (``train.steps``; 0 for
the supervised stage alone). The stage uses the GRPO trainer's model, mesh, shardings, data iterator,
micro-batching, checkpoints and metrics: one step draws a prompt batch (``data.batch_size`` prompts), makes each
prompt's target completion, and makes one AdamW update (``sft.optim``, its own optimizer state) of eq. 6 of
``grpo.py`` -- the NLL of the completion tokens (the end-of-turn token included), the prompt and its images being
context only -- accumulated exactly over ``sft.micro_batches``.

Targets (``sft.completion``):

* ``template``: ``sft.template`` over the parsed ground truth ``"<TAG> answer"``, with ``{tag}``, ``{answer}`` and
  ``{thinking}`` (``sft.thinking``). ``sft.answers: random`` (``sft.tags: random``) replaces the answer (tag) with one
  drawn uniformly from the training split's set of answers (tags), afresh for every record at every step: the stage
  then teaches the output format and not the answers, so whatever accuracy the policy has later is RL's.
* ``field``: the record's own ``completion`` (prepared from a source column: real reasoning traces). With
  ``answers``/``tags: random`` the trace is kept and only its ``<answer>`` (the text before ``<thinking>``) is
  replaced: the stage teaches the format and the reasoning, not the final answers.

Every ``sft.sample_every`` steps the step also samples G rollouts of its prompts from the current policy (before
the update) and scores them with the run's reward pool, so the reward curves run on through both stages.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
import time
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from medix_jax import parallel
from medix_jax.rewards.rules import MEDIX_MODALITY_TAGS, parse_solution
from medix_jax.rl import grpo
from medix_jax.rl.policy import OptimConfig, make_optimizer
from medix_jax.rl.rollout import Group, combine
from medix_jax.rl.trainer import Trainer

TEMPLATE = "{tag}<thinking>{thinking}</thinking><answer>{answer}</answer>"
_ANSWER = re.compile(r"<answer>.*?</answer>", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class SFTConfig:
    steps: int = 0  # supervised steps before GRPO (0: no supervised stage)
    completion: Literal["template", "field"] = "template"  # targets: the template, or the prepared `completion`
    template: str = TEMPLATE  # {tag}, {answer}, {thinking}
    thinking: str = "I look at the image, name its modality and identify the finding."
    answers: Literal["truth", "random"] = "truth"  # random: drawn from the split's answers (teaches the format only)
    tags: Literal["truth", "random"] = "truth"  # the same for the modality tag
    micro_batches: int = 1  # gradient accumulation inside each step's update
    sample_every: int = 1  # score G rollouts of the step's prompts every this many steps (reward curves); 0: never
    optim: OptimConfig = dataclasses.field(default_factory=lambda: OptimConfig(learning_rate=1e-5))

    def __post_init__(self):
        if self.steps < 0 or self.micro_batches < 1 or self.sample_every < 0:
            raise ValueError(f"sft: need steps >= 0, micro_batches >= 1, sample_every >= 0 ({self})")
        if self.completion == "template":
            unknown = {name for _, name, _, _ in string.Formatter().parse(self.template) if name is not None}
            unknown -= {"tag", "answer", "thinking"}
            if unknown:
                raise ValueError(f"sft.template: unknown field(s) {sorted(unknown)}; use {{tag}}, {{answer}}, "
                                 "{thinking}")


def label_sets(source) -> tuple[list[str], list[str]]:
    """(sorted distinct answers, sorted distinct modality tags) of a prepared split (``data.data_source``)."""
    pairs = {(r["answer"], r["modality"]) for r in map(source.__getitem__, range(len(source)))}  # one at a time
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
    return sorted({text(a) for a, _ in pairs}), sorted({text(t) for _, t in pairs})


class SupervisedStage:
    """The supervised stage of a run: ``step()`` runs one SFT step on ``trainer``'s parameters (its own optimizer
    state, ``opt_state``, checkpointed in place of GRPO's while the stage runs) and advances ``trainer.step_count``.
    ``labels``: (answers, tags) to draw from for ``answers``/``tags: random`` (``label_sets``)."""

    def __init__(self, trainer: Trainer, cfg: SFTConfig, labels: tuple[list[str], list[str]] | None = None):
        self.trainer, self.cfg = trainer, cfg
        if "random" in (cfg.answers, cfg.tags) and not labels:
            raise ValueError("sft.answers/tags: random needs the label sets of the training split")
        self.answers, self.tags = labels or ([], [])
        if cfg.micro_batches and trainer.per_batch % cfg.micro_batches:
            raise ValueError(f"data.batch_size ({trainer.per_batch} prompts on this process) must divide into "
                             f"sft.micro_batches {cfg.micro_batches}")
        self.tx = make_optimizer(cfg.optim, cfg.steps, trainer.model_cfg.param_dtype)
        self.opt_state, self.apply = trainer.optimizer(self.tx)
        self.width = trainer.rollout.max_new_tokens
        self.end = trainer.model_cfg.tokens.eos_token_id
        self.warned = False  # about targets cut to rollout.max_new_tokens

    def target(self, example: dict, step: int) -> str:
        """The completion the policy is taught for ``example`` at ``step`` (module docstring)."""
        cfg = self.cfg
        tag, answer = parse_solution(example["solution"], MEDIX_MODALITY_TAGS)
        rng = random.Random(f"{self.trainer.seed}-{step}-{example['id']}")
        new_tag = rng.choice(self.tags) if cfg.tags == "random" else tag
        new_answer = rng.choice(self.answers) if cfg.answers == "random" else answer
        if cfg.completion == "template":
            return cfg.template.format(tag=new_tag, answer=new_answer, thinking=cfg.thinking)
        text = example.get("completion", "")
        if not text:
            raise ValueError(f"sft.completion: field, but record {example['id']} has no completion (prepare the data "
                             "with a completion column: python -m medix_jax.data.prepare --completion-field NAME)")
        if cfg.tags == "random":  # the text before <thinking> is the tag
            text = new_tag + text[text.index("<thinking>"):] if "<thinking>" in text else text
        if cfg.answers == "random":
            text = _ANSWER.sub(lambda _: f"<answer>{new_answer}</answer>", text, count=1)
        return text

    def tokenize(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """Target texts -> (tokens ``[B, W]``, mask ``[B, W]``, how many were cut), W = ``rollout.max_new_tokens``:
        each text's tokens and the end-of-turn token, cut to W (a cut target never ends: said once, counted in the
        step's ``sft_truncated``)."""
        tokenizer = self.trainer.tokenizer
        pad = self.trainer.model_cfg.tokens.pad_token_id
        tokens = np.full((len(texts), self.width), pad, np.int32)
        mask = np.zeros((len(texts), self.width), bool)
        cut = 0
        for row, text in enumerate(texts):
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [self.end]
            if len(ids) > self.width:
                cut += 1
                if not self.warned:
                    print(f"sft: a target of {len(ids)} tokens is cut to rollout.max_new_tokens {self.width}; the "
                          "policy will not learn to end it (raise rollout.max_new_tokens)", flush=True)
                    self.warned = True
                ids = ids[: self.width]
            tokens[row, : len(ids)], mask[row, : len(ids)] = ids, True
        return tokens, mask, cut

    def step(self) -> dict:
        """One supervised step; returns its metrics (the job's, the same on every process)."""
        trainer, cfg = self.trainer, self.cfg
        step = trainer.step_count
        start = time.perf_counter()
        batch = next(trainer.data)
        metrics: dict[str, float] = {}
        if cfg.sample_every and step % cfg.sample_every == 0:  # rewards of the policy before this update
            g = trainer.rollout.num_samples
            key = jax.random.fold_in(jax.random.PRNGKey(trainer.seed), step)
            out, texts = trainer.rollouts.sample(trainer.rollout_model, batch, key)
            scored = trainer.rollouts.rewards.submit(texts, [s for s in batch.solutions for _ in range(g)]).result()
            metrics.update(scored.metrics, response_length_mean=float(out.lengths.mean()))
        tokens, mask, cut = self.tokenize([self.target(ex, step) for ex in batch.examples])
        zeros = np.zeros(len(tokens), np.float32)
        groups = [Group(ex, tokens[i:i + 1], mask[i:i + 1], zeros[i:i + 1, None] * mask[i:i + 1], zeros[i:i + 1],
                        zeros[i:i + 1]) for i, ex in enumerate(batch.examples)]
        stack = lambda part, field: parallel.batch_array(  # noqa: E731
            np.concatenate([getattr(grp, field) for grp in part]), trainer.mesh)
        parts = [(trainer.updater.host_prompts(part), stack(part, "tokens"), stack(part, "mask"))
                 for part in (groups[m::cfg.micro_batches] for m in range(cfg.micro_batches))]
        totals = grpo.totals(jnp.concatenate([mask for _, _, mask in parts]))
        grads = None
        sums: dict[str, float] = {}
        for prompts, tokens_, mask_ in parts:  # at the full width (the cold start's targets are short and alike)
            grad, m = trainer.programs.sft_gradients(trainer.params, parallel.shard_prompts(prompts, trainer.mesh),
                                                     tokens_, mask_, totals)
            grads = grad if grads is None else trainer.programs.accumulate(grads, grad)
            for key, value in m.items():  # mini-batch means add up over the micro-batches
                sums[key] = sums.get(key, 0.0) + float(value)
        trainer.params, self.opt_state, norm = self.apply(trainer.params, self.opt_state, grads)
        trainer.step_count += 1
        metrics.update(sums, grad_norm=float(norm), sft_tokens=float(mask.sum()),
                       sft_truncated=float(cut), step_seconds=time.perf_counter() - start,
                       compile_count=float(trainer.compile_count))
        per_process = parallel.host_gather(metrics)
        if len(per_process) > 1:
            metrics = {k: combine(k, [m.get(k, np.nan) for m in per_process], over="processes")
                       for k in per_process[0]}
        return metrics
