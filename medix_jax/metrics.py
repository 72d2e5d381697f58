"""Training metrics: a JSON line per step in ``RUN_DIR/metrics.jsonl``, TensorBoard scalars in ``RUN_DIR/tensorboard/``.

Only JAX process 0 should write: the others build ``MetricsWriter(run_dir, enabled=False)``, which does nothing.
On resume the trainer calls ``truncate_after(restored_step)`` before the first ``write`` so that neither the JSON
lines nor TensorBoard show the steps past the checkpoint twice.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from pathlib import Path
from typing import IO, Any

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _clean(value: Any) -> float | int | None:
    """A JSON-safe scalar: integers stay integers, NaN/inf become None (JSON has no NaN)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    value = float(value)  # also numpy and 0-d jax scalars
    return value if math.isfinite(value) else None


def _parse(line: str) -> dict | None:
    """A line's record, or None for a malformed one (a line cut short by a kill)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl`` in file order; malformed lines (a truncated last line) are skipped."""
    with open(Path(run_dir) / METRICS_FILE, encoding="utf-8") as f:
        return [record for line in f if line.strip() and (record := _parse(line)) is not None]


class MetricsWriter:
    """Appends ``{"step", "time", **metrics}`` to ``metrics.jsonl`` (flushed every call) and scalars to TensorBoard.

    Files are opened on the first ``write``, so a writer that never writes creates nothing but ``run_dir``.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._jsonl: IO[str] | None = None
        self._tb = None  # tensorboardX.SummaryWriter, opened lazily
        self._purge_step: int | None = None
        if enabled:
            self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def path(self) -> Path:
        return self.run_dir / METRICS_FILE

    def write(self, step: int, metrics: dict[str, float | int]) -> None:
        """Log one step: a JSON line (NaN/inf as null) and a TensorBoard scalar per finite value."""
        if not self.enabled:
            return
        step = int(step)
        values = {key: _clean(value) for key, value in metrics.items()}
        if self._jsonl is None:
            # After a kill -9 the file may end in a partial line: start on a fresh line so ours stays parseable.
            self._jsonl = open(self.path, "a", encoding="utf-8")
            if self._jsonl.tell() > 0 and not _ends_with_newline(self.path):
                self._jsonl.write("\n")
        record = {"step": step, "time": time.time(), **values}
        self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
        self._jsonl.flush()

        tb = self._tensorboard()
        for key, value in values.items():
            if value is not None:
                tb.add_scalar(key, value, step)

    def _tensorboard(self):
        if self._tb is None:
            from tensorboardX import SummaryWriter

            # The writer's thread flushes to disk at most flush_secs after an event; close() writes everything.
            # tensorboardX names its file after the second and opens it "wb": the nanoseconds keep a file reopened
            # within the same second (after truncate_after or close) from overwriting the previous one, in name order.
            self._tb = SummaryWriter(
                str(self.run_dir / TENSORBOARD_DIR),
                flush_secs=5,
                purge_step=self._purge_step,
                filename_suffix=f".{time.time_ns() % 10**9:09d}",
            )
            self._purge_step = None
        return self._tb

    def truncate_after(self, step: int) -> None:
        """Keep only the JSON lines with ``step <= step`` (atomic rewrite) and hide later TensorBoard steps.

        TensorBoard's event files are append-only: the next event file starts with a purge marker at ``step + 1``,
        which makes TensorBoard drop the older events from that step on.
        """
        if not self.enabled:
            return
        self._close_files()
        self._purge_step = int(step) + 1
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as f:
            kept = [line for line in f if (record := _parse(line)) is not None and record.get("step", math.inf) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(line if line.endswith("\n") else line + "\n" for line in kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _close_files(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def close(self) -> None:
        """Flush and close both outputs; a later ``write`` reopens them."""
        if self.enabled:
            self._close_files()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
