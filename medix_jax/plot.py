"""Training curves of a run as a PNG, from its ``metrics.jsonl``.

``python -m medix_jax.plot RUN_DIR [--out FILE.png] [--keys k1,k2,...]``

One subplot per key against the step; by default the rewards, the supervised NLL, loss, KL, entropy, clip fraction
and response length that the run logged (keys it never logged are skipped). Null values (NaN/inf when logged) are
gaps in the curve. A run with a supervised stage before GRPO gets a dashed line where GRPO begins (after the last
step that logged ``sft_loss``).
Writes ``RUN_DIR/curves.png`` unless ``--out`` says otherwise; exits with status 2 when there is nothing to plot.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from medix_jax.metrics import METRICS_FILE, read_metrics

DEFAULT_KEYS = (
    "reward_composite_mean",
    "reward_format_mean",
    "reward_modality_mean",
    "reward_llm_mean",
    "reward_embed_mean",
    "sft_loss",
    "loss",
    "kl",
    "entropy",
    "clip_fraction",
    "response_length_mean",
)


def _series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the records that have ``key``; null or non-numeric values become NaN (a gap)."""
    steps, values = [], []
    for record in records:
        if key in record:
            value = record[key]
            steps.append(record["step"])
            values.append(float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan)
    return steps, values


def plot_run(run_dir: str | Path, out: str | Path | None = None, keys: list[str] | None = None) -> Path:
    """Render the curves of ``keys`` (default: ``DEFAULT_KEYS``) to ``out`` (default ``run_dir/curves.png``).

    Keys the run never logged are named on stderr (a ValueError when none of ``keys`` was logged); raises
    FileNotFoundError without a metrics.jsonl and ValueError when none of the keys has a finite value.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / METRICS_FILE} does not exist")
    # Last record wins for a step logged twice (a resume without truncate_after), then step order.
    by_step = {record["step"]: record for record in read_metrics(run_dir) if isinstance(record.get("step"), int)}
    records = [by_step[step] for step in sorted(by_step)]
    logged = {key for record in records for key in record} - {"step"}
    if keys and (unknown := [key for key in keys if key not in logged]):
        message = f"{run_dir / METRICS_FILE} has no key {', '.join(unknown)}; it logged: {', '.join(sorted(logged))}"
        if len(unknown) == len(keys):
            raise ValueError(message)
        print(f"plot: {message}", file=sys.stderr)  # the known keys are still drawn
    series = {key: _series(records, key) for key in (keys or DEFAULT_KEYS)}
    series = {key: xy for key, xy in series.items() if any(math.isfinite(v) for v in xy[1])}
    if not series:
        raise ValueError(f"no values to plot in {run_dir / METRICS_FILE} for keys {', '.join(keys or DEFAULT_KEYS)}")

    supervised = [r["step"] for r in records if r.get("sft_loss") is not None]
    boundary = max(supervised) if supervised and max(supervised) < records[-1]["step"] else None
    ncols = 1 if len(series) == 1 else 2
    nrows = math.ceil(len(series) / ncols)
    fig = Figure(figsize=(6 * ncols, 2.8 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (key, (steps, values)) in zip(axes[:len(series)], series.items(), strict=True):  # extra axes: hidden below
        ax.plot(steps, values, marker="." if len(steps) < 50 else None)  # markers keep isolated points visible
        ax.set_title(key)
        ax.set_xlabel("step")
        if boundary is not None:
            ax.axvline(boundary + 0.5, color="grey", linestyle="--", linewidth=1)
            ax.text(boundary + 0.5, 1.0, " GRPO", transform=ax.get_xaxis_transform(), va="top", fontsize=8,
                    color="grey")
            ax.text(boundary + 0.5, 1.0, "SFT ", transform=ax.get_xaxis_transform(), va="top", ha="right",
                    fontsize=8, color="grey")
        ax.grid(alpha=0.3)
    for ax in axes[len(series):]:
        ax.set_visible(False)
    fig.suptitle(run_dir.resolve().name)

    out = Path(out) if out is not None else run_dir / "curves.png"
    tmp = out.with_name(f"{out.stem}.tmp{out.suffix}")  # a viewer never sees a half-written image
    fig.savefig(tmp, dpi=100)
    os.replace(tmp, out)
    return out


def main(argv: list[str] | None = None) -> None:
    from medix_jax import cli

    parser = cli.parser("medix_jax.plot", __doc__)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a training run (its metrics.jsonl)")
    parser.add_argument("--out", type=Path, help="image file (default: RUN_DIR/curves.png)")
    parser.add_argument("--keys", help=f"comma-separated metric keys (default: {','.join(DEFAULT_KEYS)})")
    args = parser.parse_args(argv)
    keys = [key.strip() for key in args.keys.split(",") if key.strip()] if args.keys else None
    try:
        out = plot_run(args.run_dir, args.out, keys)
    except (FileNotFoundError, ValueError) as e:
        parser.error(str(e))  # exit status 2
    print(out)


if __name__ == "__main__":
    main()
