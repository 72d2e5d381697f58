"""The update of one GRPO step: ``ppo_epochs`` passes over ``mini_batches`` mini-batches, each one AdamW update
(``optim``) whose gradient is accumulated exactly over its micro-batches (``grpo.Totals`` keeps the mini-batch
denominators).

* **Mini-batches.** Mini-batch k holds the groups m, m + n, m + 2n, ... of the step for its micro-batch strides m
  (n = mini x micro: ``mini_batch``). Its prompts are embedded once (``programs.embed``: vision tower and token
  embeddings).
* **Packed micro-batches.** Its *samples* are packed several to a row -- each its prompt's real tokens, then its
  completion, told apart by segment ids and keeping its own M-RoPE positions (``rl/packing.py``, EasyR1's
  ``padding_free``) -- within each batch shard, and the rows cut into micro-batches of as many rows as a
  micro-batch had samples (``micro_batches``): fewer micro-batches where samples are short, each computed only up
  to its fullest row, rounded up to a width bucket (``programs.completion_widths``; one program, a branch per
  width). A row's prompt tokens are gathered from their prompts' embeddings on their own chip, and a micro-batch's
  gradient comes with the cotangent of those embeddings; the mini-batch's summed cotangent then goes back through
  the embedding once (``programs.embed_gradients``: ``minibatch_gradients``).
* **Old and reference log-probabilities** are computed once per step, before any update, outside the gradient. Old
  ones are recomputed by the trainer's own forward (as the reference always does) whenever the compute dtype is not
  float32 or the sampler ran a copy of the weights in another dtype (``policy.recomputes_old_logprobs``); the first
  mini-batch's come from its own first gradient pass (the parameters have not moved yet).
  ``logprob_mismatch_{mean,max}`` logs the sampler-vs-trainer |delta log p| over completion tokens.
* A mini-batch with nothing to learn from (only masked filler, or all advantages 0 without a KL term) makes no
  optimizer update: AdamW would only decay the weights. Gradients and their accumulator keep the parameters'
  shardings.

With several processes, an update's global micro-batch is every process's micro-batch m (``device_batch``).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from medix_jax import parallel
from medix_jax.data.buckets import Buckets
from medix_jax.data.pipeline import collate, sizes
from medix_jax.models.qwen_vl.model import ModelInputs
from medix_jax.rl import grpo, packing
from medix_jax.rl.forward import Completions
from medix_jax.rl.packing import width_index
from medix_jax.rl.programs import StepPrograms, mismatch
from medix_jax.rl.rollout import Group


class MiniBatch(NamedTuple):
    """A mini-batch that has something to learn from: its prompts (host), its packed micro-batches on the device
    (``packing.Layout``, ``Completions``, width index) and the mini-batch's loss denominators."""

    prompts: ModelInputs
    parts: list
    totals: grpo.Totals


class Mismatch:
    """Running sum, count and maximum of ``|sampler - trainer|`` log-probabilities over completion tokens."""

    def __init__(self):
        self.total = self.count = self.peak = 0.0

    def add(self, sampler_logp, trainer_logp, mask) -> None:
        total, count, peak = mismatch(sampler_logp, trainer_logp, mask)
        self.total, self.count, self.peak = self.total + float(total), self.count + float(count), max(self.peak,
                                                                                                     float(peak))


def minibatch_gradients(programs: StepPrograms, params, prompts: ModelInputs, parts: list, totals: grpo.Totals,
                        own_old: bool, seen: Mismatch | None = None) -> tuple[object, dict[str, float]]:
    """(the mini-batch's gradient, its metrics) over its placed ``prompts`` and micro-batches ``parts`` (``(layout,
    completions, width index)``): the prompts embedded once, each micro-batch's gradient and embedding cotangent
    summed, the summed cotangent taken back through the embedding once. ``own_old``: the old log-probabilities are
    the first pass's own (written into ``parts``; ``seen`` measures them against the sampler's). Per-token means
    over the mini-batch add up over its parts; ``*_max`` metrics take the maximum."""
    embedded = programs.embed(params, prompts)
    grads = d_embedded = None
    sums: dict[str, float] = {}
    for i, (layout, batch, width) in enumerate(parts):
        grad, d, metrics, logp = programs.gradients(params, embedded, layout, batch, totals, jnp.asarray(own_old),
                                                    jnp.int32(width))
        if own_old:  # later epochs reuse these old log-probabilities
            if seen is not None:
                seen.add(batch.old_logprobs, logp, batch.mask)
            parts[i] = (layout, batch._replace(old_logprobs=logp), width)
        grads = grad if grads is None else programs.accumulate(grads, grad)
        d_embedded = d if d_embedded is None else programs.add(d_embedded, d)
        for key, value in metrics.items():
            sums[key] = max(sums.get(key, 0.0), float(value)) if key.endswith("_max") \
                else sums.get(key, 0.0) + float(value)
    return programs.embed_gradients(params, prompts, d_embedded, grads), sums


class PolicyUpdate:
    """``run(params, opt_state, ref_params, groups)``: the step's optimizer updates on ``groups`` (module
    docstring) with ``programs``; ``recompute``: old log-probabilities from the trainer's forward."""

    def __init__(self, programs: StepPrograms, train, model_cfg, buckets: Buckets, mesh, recompute: bool):
        self.programs, self.train, self.model_cfg, self.buckets, self.mesh = programs, train, model_cfg, buckets, mesh
        self.recompute = recompute
        self.samples_per_row = packing.samples_per_row(model_cfg.attention, mesh.devices.flat[0].platform)

    def host_prompts(self, groups: list[Group]) -> ModelInputs:
        """The groups' prompts, on the host (numpy; ``shard_prompts`` at each use), bucketed alike on every
        process. A step holds every mini-batch's prompts at once, and their pixels are most of its bytes (one
        21,504-row image is 100 MB in float32): on the device, 31 idle micro-batches took 2.9 GiB of each v6e chip
        during the update."""
        examples = [grp.example for grp in groups]
        at_least = parallel.host_max(sizes(examples, self.model_cfg))
        return collate(examples, self.model_cfg, self.buckets, at_least).inputs

    def device_batch(self, members: list[Group], prompts: ModelInputs, micro: list[list[list[tuple[int, int]]]],
                      rows: int) -> tuple[packing.Layout, Completions, int]:
        """This process's part of a micro-batch (``micro_batches``: packed rows of (member, sample) per batch
        shard; ``prompts`` the members' host prompts) -> the global micro-batch (``pack_micro_batch``) and the index
        of its completion width in ``self.programs.widths``, the same on every process."""
        samples = [pair for shard in micro for row in shard for pair in row]
        where = {pair: j for j, pair in enumerate(samples)}
        def stacked(field):  # the samples' rows of a Group field, in sample order
            return np.stack([getattr(members[i], field)[s] for i, s in samples]) if samples \
                else getattr(members[0], field)[:0]

        correct = self.train.loss.rollout_correction != "none"  # keeps the sampler's beside the old ones
        completions = Completions(stacked("tokens"), stacked("mask"), stacked("logprobs"), stacked("advantages"),
                                  sampler_logprobs=stacked("logprobs") if correct else None)
        per_shard = len(members) // len(micro)
        layout, batch, longest = pack_micro_batch(
            prompts, completions, np.array([i % per_shard for i, _ in samples], np.int32),
            [[[where[pair] for pair in row] for row in shard] for shard in micro], rows, self.samples_per_row)
        return (packing.Layout(*(parallel.batch_array(a, self.mesh, axis=int(a.ndim == 3)) for a in layout)),
                Completions._make(None if a is None else parallel.batch_array(a, self.mesh) for a in batch),
                width_index(int(parallel.host_max(longest)), self.programs.widths))

    def mini_batches(self, groups: list[Group]) -> list[MiniBatch]:
        """The step's mini-batches that have something to learn from, their micro-batches on the device."""
        t = self.train
        shards = parallel.batch_split(self.mesh) // jax.process_count()  # this process's
        minis = []
        for k in range(t.mini_batches):
            members = mini_batch(groups, k, t.mini_batches, t.micro_batches)
            prompts = self.host_prompts(members)
            parts, rows = micro_batches(members, prompts.attention_mask.sum(1), prompts.input_ids.shape[1],
                                        t.micro_batches, self.programs.widths, shards, self.samples_per_row)
            parts += [[[]] * shards] * (int(parallel.host_max(len(parts))) - len(parts))  # as many on every process
            chunk = [self.device_batch(members, prompts, part, rows) for part in parts]
            if not chunk:  # only masked filler
                continue
            mask = jnp.concatenate([b.mask for _, b, _ in chunk])  # the mini-batch's, over all processes
            signal = jnp.concatenate([b.mask.any(1) & (b.advantages != 0) for _, b, _ in chunk])
            if bool(signal.any()) or (t.loss.kl_coef > 0 and bool(mask.any())):
                minis.append(MiniBatch(prompts, chunk, grpo.totals(mask)))
        return minis

    def old_and_reference(self, minis: list[MiniBatch], params, ref_params, seen: Mismatch) -> None:
        """Old (recomputing; every mini-batch but the first, whose come from its own first gradient pass) and
        reference (``ref_params``, when there is one) log-probabilities, written into the mini-batches' parts."""
        for k, mini in enumerate(minis):
            placed = parallel.shard_prompts(mini.prompts, self.mesh)
            policies = [(name, p) for name, p, on in (("old", params, self.recompute and k > 0),
                                                      ("ref", ref_params, ref_params is not None)) if on]
            for name, policy in policies:
                embedded = self.programs.embed(policy, placed)
                for i, (layout, batch, width) in enumerate(mini.parts):
                    logp = self.programs.logprobs(policy, embedded, layout, batch, jnp.int32(width))
                    if name == "old":
                        seen.add(batch.old_logprobs, logp, batch.mask)
                    mini.parts[i] = (layout, batch._replace(**{f"{name}_logprobs": logp}), width)

    def run(self, params, opt_state, ref_params, groups: list[Group]) -> tuple[Any, Any, dict]:
        """(new parameters, new optimizer state, metrics) after the step's updates on ``groups``."""
        t = self.train
        minis = self.mini_batches(groups)
        seen = Mismatch()
        self.old_and_reference(minis, params, ref_params, seen)
        per_update: list[dict[str, float]] = []
        norms = []
        for epoch in range(t.ppo_epochs):
            for k, mini in enumerate(minis):
                own = self.recompute and epoch == 0 and k == 0
                placed = parallel.shard_prompts(mini.prompts, self.mesh)
                grads, sums = minibatch_gradients(self.programs, params, placed, mini.parts, mini.totals, own, seen)
                per_update.append(sums)
                params, opt_state, norm = self.programs.apply(params, opt_state, grads)
                norms.append(float(norm))
        metrics = {k: max(u[k] for u in per_update) if k.endswith("_max")
                   else float(np.mean([u[k] for u in per_update])) for k in (per_update[0] if per_update else {})}
        mismatch_mean, mismatch_max = seen.total / max(seen.count, 1.0), seen.peak
        if not self.recompute and per_update:  # the first mini-batch saw the sampler's parameters unchanged
            mismatch_mean, mismatch_max = per_update[0]["logprob_diff"], per_update[0]["logprob_diff_max"]
        if "correction_weight_sq" in metrics:  # effective sample size of eq. 7's weights, mean(w)^2 / mean(w^2)
            squares = metrics.pop("correction_weight_sq")
            metrics["correction_ess"] = metrics["correction_weight"] ** 2 / squares if squares > 0 else 0.0
        metrics.update(grad_norm=float(np.mean(norms)) if norms else 0.0, optimizer_updates=float(len(norms)),
                       updates_skipped=float(t.mini_batches - len(minis)) * t.ppo_epochs,
                       logprob_mismatch_mean=mismatch_mean, logprob_mismatch_max=mismatch_max)
        return params, opt_state, metrics


def mini_batch(groups: list[Group], k: int, mini_batches: int, micro_batches: int) -> list[Group]:
    """Mini-batch ``k``'s groups: m, m + n, m + 2n, ... of the step for its micro-batch strides m (n = mini x
    micro)."""
    parts = mini_batches * micro_batches
    return [grp for m in range(k * micro_batches, (k + 1) * micro_batches) for grp in groups[m::parts]]


def pack_micro_batch(prompts: ModelInputs, completions: Completions, prompt_of: np.ndarray,
                     shards: list[list[list[int]]], rows: int, per_row: int) -> tuple[packing.Layout, Completions, int]:
    """(``packing.Layout``, the completions one per sample slot -- an empty slot is masked --, the completion width
    the fullest row needs) of a micro-batch on the host: ``shards[b]`` batch shard b's rows (at most ``rows``) of
    sample indices into ``completions`` (numpy ``[n, T]``), sample i continuing prompt ``prompt_of[i]`` of its
    shard's part of ``prompts`` (the host ``ModelInputs``, the shards' prompts one after the other)."""
    p, t = prompts.input_ids.shape[1], completions.tokens.shape[1]
    lengths = [completion_length(m) for m in np.asarray(completions.mask)]
    tokens = np.asarray(completions.tokens)
    prompt_tokens = np.asarray(prompts.attention_mask).sum(1)
    per_shard = len(prompt_tokens) // len(shards)
    padded = [shard + [[]] * (rows - len(shard)) for shard in shards]
    slots = [row[j] if j < len(row) else None for shard in padded for row in shard for j in range(per_row)]
    layout = packing.layout(np.asarray(prompts.attention_mask), np.asarray(prompts.positions),
                            np.asarray(prompts.rope_delta),
                            [[[(prompt_of[i], tokens[i, :lengths[i]]) for i in row] for row in shard]
                             for shard in padded], rows, per_row, t)
    longest = max(packing.need([(int(prompt_tokens[b * per_shard + prompt_of[i]]), lengths[i]) for i in row], p)
                  for b, shard in enumerate(padded) for row in shard)

    def take(a):  # one row per sample slot, zeros in an empty one
        a = np.asarray(a)
        return np.stack([np.zeros(a.shape[1:], a.dtype) if i is None else a[i] for i in slots])

    c = completions
    slotted = Completions._make(None if a is None else take(a) for a in c)
    return layout, slotted, int(longest)


def completion_length(mask: np.ndarray) -> int:
    """The number of completion tokens of a sample's ``mask`` ``[T]``, which must be a prefix (the sampler's)."""
    n = int(mask.sum())
    if not mask[:n].all():
        raise ValueError("a completion mask with holes: the update packs each sample's first mask.sum() tokens")
    return n


def micro_batches(members: list[Group], prompt_tokens, prompt_width: int, micro_batches: int,
                  widths: tuple[int, ...], shards: int = 1, per_row: int = packing.PACK_SAMPLES
                  ) -> tuple[list[list[list[list[tuple[int, int]]]]], int]:
    """(the mini-batch's micro-batches -- each a list per batch shard of packed rows of samples (member, sample)
    --, rows per shard in a micro-batch). The members are split into ``shards`` blocks, one per batch shard of this
    process (``PolicyUpdate.host_prompts`` places them so); each block's samples with a completion (the others add
    nothing) are packed into rows of ``prompt_width`` + a width of ``widths`` (``packing.arrange``;
    ``prompt_tokens[i]``: member i's real prompt tokens), and its rows, fullest first, are cut into micro-batches
    of as many rows as a micro-batch of one sample per row had (the memory the plan budgets). So the update
    computes on real tokens: fewer micro-batches than ``micro_batches`` where samples are short, the last ones
    narrower. The gradient is the sum over the mini-batch's samples, so the arrangement changes nothing else."""
    per_block, (g, _) = len(members) // shards, members[0].mask.shape
    if len(members) % shards or per_block * g % micro_batches:
        raise ValueError(f"{len(members)} groups of {g} samples do not split into {shards} batch shards x "
                         f"{micro_batches} micro-batches")
    rows = per_block * g // micro_batches
    samples = [[(i, s) for i in range(b * per_block, (b + 1) * per_block) for s in range(g)
                if members[i].mask[s].any()] for b in range(shards)]
    lengths = [[(int(prompt_tokens[i]), completion_length(members[i].mask[s])) for i, s in block]
               for block in samples]
    packed = packing.arrange(lengths, prompt_width, widths, rows, per_row)
    blocks = [[[block[j] for j in row] for row in part] for block, part in zip(samples, packed, strict=True)]
    count = max(-(-len(block) // rows) for block in blocks)
    return [[block[c * rows:(c + 1) * rows] for block in blocks] for c in range(count)], rows
