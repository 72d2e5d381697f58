"""Rollouts: ``Sampler(sampling, mesh).generate(model, prompts, key)`` -- G samples per prompt, from the static
sampler (``static.py``) or with continuous batching (``continuous.py``, the default).

Prompts must be **left-padded** (the last column is every row's last prompt token). Shapes come from buckets
(``data.buckets``), so a new batch with the same buckets reuses the compiled programs (``Sampler.compile_count``).
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from medix_jax import parallel
from medix_jax.generate import continuous, static
from medix_jax.generate.sampling import SampleOutput, SamplingConfig
from medix_jax.models.qwen_vl.model import ModelInputs, QwenVL


class Sampler:
    """Rollouts for GRPO: ``Sampler(sampling, mesh).generate(model, prompts, key)``.

    ``model`` is used as the caller holds it (e.g. the trainer's sharded parameters); nothing is copied. With a
    ``mesh``, the batch is sharded over the ``batch`` rule (data x fsdp) and the KV cache's heads over ``tensor``.
    """

    def __init__(self, sampling: SamplingConfig, mesh: Mesh | None = None):
        self.sampling = sampling
        self.mesh = mesh

    @property
    def compile_count(self) -> int:
        """Programs compiled so far by the static and continuous samplers' functions (all in this process)."""
        return static.compile_count() + continuous.compile_count()

    def generate(self, model: QwenVL, prompts: ModelInputs, key: jax.Array,
                 max_lengths: np.ndarray | None = None) -> SampleOutput:
        """G samples per prompt; row r of the output is sample r % G of prompt r // G. ``max_lengths`` (optional,
        ``[B*G]`` int, this process's rows): a sample also ends after that many tokens (benchmarks force lengths)."""
        mask = np.asarray(prompts.attention_mask)
        if not mask[:, -1].all():
            raise ValueError("prompts must be left-padded: the last column must be a real token in every row")
        s = self.sampling
        rows = len(mask) * s.num_samples
        limits = np.full(rows, s.max_new_tokens, np.int32)
        if max_lengths is not None:
            limits = np.minimum(limits, np.asarray(max_lengths, np.int32).reshape(rows))
            if (limits < 1).any():
                raise ValueError("max_lengths must be >= 1")
        limits = parallel.batch_array(limits, self.mesh)
        prompts = parallel.shard_prompts(prompts, self.mesh)
        graphdef, state = nnx.split(model)
        ends = model.config.tokens.end_token_ids if s.stop_token_ids is None else s.stop_token_ids
        if s.batching == "continuous":
            return continuous.generate(graphdef, state, prompts, key, limits, s, ends, self.mesh)
        cache, logits, next_position, key_valid = static.prefill(
            graphdef, state, prompts, s.max_new_tokens, s.num_samples, self.mesh)
        out, _ = static.decode(graphdef, state, cache, logits, next_position, key_valid, s,
                         prompts.input_ids.shape[1], ends, key, limits, self.mesh)
        return out
