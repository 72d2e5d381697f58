"""The host side of packed update rows (rl/packing.py): every sample in exactly one row within its limits, the
cheaper of the packings chosen, and a layout whose positions and segments are each sample's own. (That packed rows
give each sample its unpacked log-probabilities and gradients: tests/test_logprobs_chunked.py, on text prompts, and
tests/test_qwen3_vl.py, on image prompts with DeepStack.)"""

import numpy as np
import pytest

from medix_jax.rl import packing


@pytest.mark.parametrize("per_row", [1, 4])
def test_arrange_places_every_sample_once_within_its_row_limits(per_row):
    rng = np.random.default_rng(0)
    widths, prompt_width = (64, 128, 256, 512), 96
    shards = [[(int(p), int(c)) for p, c in zip(rng.integers(20, 97, n), np.clip(rng.lognormal(np.log(128), 0.8, n),
                                                                               1, 512).astype(int), strict=True)]
              for n in (40, 37)]
    arranged = packing.arrange(shards, prompt_width, widths, rows=10, per_row=per_row)
    for lengths, rows in zip(shards, arranged, strict=True):
        assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
        assert all(1 <= len(row) <= per_row for row in rows)
        needs = [packing.need([lengths[i] for i in row], prompt_width) for row in rows]
        assert max(needs) <= widths[-1] and needs == sorted(needs, reverse=True)
    if per_row > 1:
        assert max(len(row) for rows in arranged for row in rows) >= 2  # short samples do share rows


@pytest.mark.parametrize("rows, packed", [(2, True), (4, False)])
def test_arrange_takes_the_cheaper_packing(rows, packed):
    """Four samples of 10 prompt + 6 completion tokens, prompt bucket 10, widths 16 / 32. Two to a row they need
    width 32 (22 tokens past the prompt bucket): with 2 rows a micro-batch, one micro-batch of 10 + 32 instead of
    two of 10 + 16; with 4 rows, one micro-batch either way, and single rows are narrower."""
    arranged = packing.arrange([[(10, 6)] * 4], 10, (16, 32), rows=rows, per_row=4)[0]
    assert [len(row) for row in arranged] == ([2, 2] if packed else [1, 1, 1, 1])


def test_layout_gives_each_sample_its_own_positions_and_segment():
    """Two left-padded prompts (3 and 2 real tokens, M-RoPE delta 5 and 0): a row holds prompt 1's sample of 2
    tokens then prompt 0's of 1; another row prompt 0's sample of 3 tokens."""
    mask = np.array([[0, 1, 1, 1], [0, 0, 1, 1]], bool)
    positions = np.broadcast_to(np.array([[0, 0, 1, 2], [0, 0, 0, 1]]), (3, 2, 4)).copy()
    positions[1:, 0, 1:] = 7  # an 'image' token's height / width positions
    layout = packing.layout(mask, positions, np.array([5, 0]), [[[(1, np.array([21, 22])), (0, np.array([31]))],
                                                                [(0, np.array([41, 42, 43]))]]], rows=2, per_row=2,
                            width=4)
    assert layout.source.tolist() == [[6, 7, -1, -1, 1, 2, 3, -1], [1, 2, 3, -1, -1, -1, -1, -1]]
    assert layout.ids.tolist() == [[0, 0, 21, 22, 0, 0, 0, 31], [0, 0, 0, 41, 42, 43, 0, 0]]
    assert layout.segments.tolist() == [[1, 1, 1, 1, 2, 2, 2, 2], [1, 1, 1, 1, 1, 1, 0, 0]]
    assert layout.positions[0].tolist() == [[0, 1, 2, 3, 0, 1, 2, 8], [0, 1, 2, 8, 9, 10, 0, 0]]
    assert layout.positions[1].tolist() == [[0, 1, 2, 3, 7, 7, 7, 8], [7, 7, 7, 8, 9, 10, 0, 0]]
    # compact completion tokens: row 0 holds 22, 21 predicted at 1, 2 and 31 at 6; row 1 41, 42, 43 at 2, 3, 4
    assert layout.predict.tolist() == [[1, 2, 6, 0], [2, 3, 4, 0]]
    assert layout.slot_row.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    assert layout.slot_col.tolist() == [[0, 1, 0, 0], [2, 0, 0, 0], [0, 1, 2, 0], [0, 0, 0, 0]]
