"""Packed update rows: several samples (each its prompt's real tokens, then its completion) share a row of the
update's micro-batch, told apart by segment ids -- EasyR1's ``padding_free``. The update then computes on real
tokens instead of on each row's padding up to ``max_new_tokens`` and up to the prompt bucket.

The host decides everything here (numpy); the device only gathers (``trainer.packed_hidden``):

* ``pack`` puts a shard's samples into rows, first fit by decreasing length (Johnson 1974), and ``arrange`` picks
  the cheapest of a few such packings;
* ``layout`` writes where each token of a micro-batch's rows comes from (``Layout``): prompt tokens from the
  mini-batch's embedded prompts, completion tokens from their ids; each sample's M-RoPE positions are those of its
  own unpacked sequence, so attention within a segment sees exactly what it sees unpacked, and a sample's
  log-probabilities are the same packed or not (``tests/test_logprobs_chunked.py``, ``tests/test_qwen3_vl.py``).

A micro-batch of R rows of ``P + T`` tokens (P the prompt bucket, T the completion width) holds at most
``R x per_row`` samples: its completions ``[R x per_row, T]`` keep one row per sample slot, so the loss
(``grpo.policy_loss``) is unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from medix_jax.models import attention

PACK_SAMPLES = 4  # at most this many samples share a row (``samples_per_row``)


class Layout(NamedTuple):
    """Where a micro-batch's samples sit in its R packed rows of L = P + T tokens (int32; the batch axis -- rows,
    or sample slots -- is split over the mesh's batch axes; every index is local to its batch shard)."""

    source: np.ndarray  # [R, L] the prompt token at each position, m * P + p into the shard's prompts; -1: none
    ids: np.ndarray  # [R, L] completion token ids at completion positions, 0 elsewhere
    positions: np.ndarray  # [3, R, L] each sample's own M-RoPE positions
    segments: np.ndarray  # [R, L] 1, 2, ... per sample of the row; 0 is padding
    predict: np.ndarray  # [R, T] the row's completion tokens one after the other: the position predicting each
    slot_row: np.ndarray  # [S, T] sample slot s's completion token t is the row's (slot_row, slot_col)-th token
    slot_col: np.ndarray  # [S, T]   of ``predict``


def samples_per_row(implementation: str, platform: str) -> int:
    """How many samples may share an update row: ``PACK_SAMPLES``, or 1 where the decoder's attention
    (``ModelConfig.attention`` on ``platform``) is cuDNN, which masks one run of real tokens per row only."""
    decoder = attention.resolve(implementation, platform=platform, q_len=1024, kv_len=1024, decode=False,
                                contiguous=True)
    return 1 if decoder == "cudnn" else PACK_SAMPLES


def shapes(rows: int, prompt_width: int, width: int, per_row: int) -> tuple[tuple[int, ...], ...]:
    """The shapes of a ``Layout``'s fields, in order, for ``rows`` rows of ``prompt_width + width`` tokens (all
    int32; the batch is axis 1 of ``positions``, axis 0 of the rest)."""
    length, slots = prompt_width + width, rows * per_row
    return (rows, length), (rows, length), (3, rows, length), (rows, length), (rows, width), (slots, width), \
        (slots, width)


def need(lengths: list[tuple[int, int]], prompt_width: int) -> int:
    """The completion width a row of samples ``(prompt tokens, completion tokens)`` needs: its completion tokens
    must fit the width, and all its tokens ``prompt_width`` plus the width."""
    return max(sum(c for _, c in lengths), sum(p + c for p, c in lengths) - prompt_width, 0)


def width_index(length: int, widths: tuple[int, ...]) -> int:
    """The narrowest of ``widths`` that holds ``length`` completion tokens."""
    return next(i for i, w in enumerate(widths) if w >= length)


def pack(lengths: list[tuple[int, int]], prompt_width: int, widths: tuple[int, ...], per_row: int,
         limit: int | None) -> list[list[int]]:
    """Rows of sample indices: samples ``(prompt tokens, completion tokens)`` by decreasing total length, each into
    the first row with room (first fit decreasing, Johnson 1974) -- at most ``per_row`` samples, their completions
    within ``widths[-1]`` and their tokens within ``prompt_width + limit``; with ``limit`` None, within the width
    bucket the row's first sample needs (short samples fill the gaps of long ones' rows, and no row gets wider) --;
    rows in decreasing ``need``."""
    rows: list[list[int]] = []
    sums: list[list[int]] = []  # per row: tokens, completion tokens, the width bucket it may grow to
    for i in sorted(range(len(lengths)), key=lambda i: -sum(lengths[i])):
        p, c = lengths[i]
        alone = need([lengths[i]], prompt_width)
        if alone > widths[-1]:
            raise ValueError(f"pack: a sample of {lengths[i]} (prompt, completion) tokens does not fit a row of "
                             f"{prompt_width} + {widths[-1]} tokens")
        for row, filled in zip(rows, sums, strict=True):
            tokens, completion, room = filled
            if len(row) < per_row and max(completion + c, tokens + p + c - prompt_width) <= room:
                row.append(i)
                filled[:2] = [tokens + p + c, completion + c]
                break
        else:
            rows.append([i])
            sums.append([p + c, c, min(widths[width_index(alone, widths)] if limit is None else limit, widths[-1])])
    return sorted(rows, key=lambda row: -need([lengths[j] for j in row], prompt_width))


def arrange(shards: list[list[tuple[int, int]]], prompt_width: int, widths: tuple[int, ...], rows: int,
            per_row: int) -> list[list[list[int]]]:
    """Each batch shard's samples ``(prompt tokens, completion tokens)`` packed into rows (``pack``), the cheapest of
    a few packings: rows up to each width bucket, or rows kept within their first sample's bucket. Micro-batch j is
    every shard's rows ``[j x rows, (j + 1) x rows)`` at the widest bucket they need, so a packing costs
    ``sum_j (prompt_width + width_j)`` row-tokens per row; the fullest packing is not always the cheapest, as its
    rows all need the widest bucket."""
    def cost(packed):
        needs = [[need([lengths[i] for i in row], prompt_width) for row in shard_rows]
                 for lengths, shard_rows in zip(shards, packed, strict=True)]
        count = max(-(-len(n) // rows) for n in needs)
        widest = (max(n[j * rows] for n in needs if len(n) > j * rows) for j in range(count))
        return sum(prompt_width + widths[width_index(n, widths)] for n in widest)

    candidates = [[pack(lengths, prompt_width, widths, per_row, limit) for lengths in shards]
                  for limit in (*widths, None)]
    return min(candidates, key=cost)


def layout(prompt_mask: np.ndarray, prompt_positions: np.ndarray, rope_delta: np.ndarray,
           shards: list[list[list[tuple[int, np.ndarray]]]], rows: int, per_row: int, width: int) -> Layout:
    """The ``Layout`` of one micro-batch: ``shards[b]`` is batch shard b's rows (at most ``rows``), each a list of
    samples ``(prompt index within the shard, completion token ids)``; the prompts' left-padded ``prompt_mask``
    ``[M, P]``, ``prompt_positions`` ``[3, M, P]`` and ``rope_delta`` ``[M]`` are the shards' prompts one after the
    other (``M / len(shards)`` each). Sample slot ``(b, r, j)`` -- shard, row, place in the row -- is slot
    ``(b * rows + r) * per_row + j``. Completion positions continue their prompt's exactly as the sampler's do
    (``num_prompt_tokens + rope_delta + t`` on all three axes)."""
    n, p = prompt_mask.shape
    per_shard = n // len(shards)
    r_all, length = len(shards) * rows, p + width
    out = Layout(np.full((r_all, length), -1, np.int32), np.zeros((r_all, length), np.int32),
                 np.zeros((3, r_all, length), np.int32), np.zeros((r_all, length), np.int32),
                 np.zeros((r_all, width), np.int32), np.zeros((r_all * per_row, width), np.int32),
                 np.zeros((r_all * per_row, width), np.int32))
    for b, shard_rows in enumerate(shards):
        if len(shard_rows) > rows:
            raise ValueError(f"layout: {len(shard_rows)} rows in batch shard {b}, room for {rows}")
        for r, samples in enumerate(shard_rows):
            row, at, column = b * rows + r, 0, 0  # the row's next token, next completion token
            for j, (m, tokens) in enumerate(samples):
                prompt = b * per_shard + m
                real = np.flatnonzero(prompt_mask[prompt])
                k, c = len(real), len(tokens)
                if at + k + c > length or column + c > width:
                    raise ValueError(f"layout: row {r} of batch shard {b} overflows {length} tokens / {width} "
                                     "completion tokens")
                out.source[row, at:at + k] = m * p + real
                out.positions[:, row, at:at + k] = prompt_positions[:, prompt, real]
                start = k + int(rope_delta[prompt])
                out.positions[:, row, at + k:at + k + c] = start + np.arange(c)
                out.ids[row, at + k:at + k + c] = tokens
                out.segments[row, at:at + k + c] = j + 1
                out.predict[row, column:column + c] = at + k - 1 + np.arange(c)  # state t predicts token t + 1
                slot = row * per_row + j
                out.slot_row[slot, :c] = r
                out.slot_col[slot, :c] = column + np.arange(c)
                at, column = at + k + c, column + c
    return out
