"""MetricsWriter (JSON lines + real TensorBoard event files), read_metrics, truncate_after, and the curves plot."""

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from medix_jax.metrics import MetricsWriter, read_metrics
from medix_jax.plot import plot_run

REPO = Path(__file__).resolve().parents[1]


def read_events(run_dir: Path) -> list[list[event_pb2.Event]]:
    """Events of each TensorBoard event file (in name order, as TensorBoard reads them), via TFRecord framing + CRCs."""
    files = []
    for path in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        data, pos, events = path.read_bytes(), 0, []
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,), (header_crc,) = struct.unpack("<Q", header), struct.unpack("<I", data[pos + 8:pos + 12])
            assert header_crc == masked_crc32c(header)
            payload = data[pos + 12:pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            pos += 16 + length
        files.append(events)
    return files


def scalars(events: list[event_pb2.Event]) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in events:
        for value in event.summary.value:
            out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_write_jsonl_and_tensorboard(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 0.5, "kl": 0.01, "n": 3})
        writer.write(2, {"loss": float("nan"), "kl": float("inf"), "n": 4})
        writer.write(3, {"loss": 0.25, "kl": 0.02, "n": 5})

    def no_nan(name):
        raise AssertionError(f"{name} in metrics.jsonl")

    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=no_nan) for line in lines]  # strict JSON
    assert records == read_metrics(tmp_path)
    assert [(r["step"], r["loss"], r["kl"], r["n"]) for r in records] == [
        (1, 0.5, 0.01, 3), (2, None, None, 4), (3, 0.25, 0.02, 5)
    ]
    assert isinstance(records[0]["n"], int) and all(abs(r["time"] - records[0]["time"]) < 60 for r in records)

    (events,) = read_events(tmp_path)
    got = scalars(events)
    assert set(got) == {"loss", "kl", "n"}
    assert got["loss"] == {1: 0.5, 3: 0.25}  # NaN skipped
    assert got["kl"] == {1: pytest.approx(0.01), 3: pytest.approx(0.02)}  # inf skipped
    assert got["n"] == {1: 3.0, 2: 4.0, 3: 5.0}


def test_read_metrics_skips_truncated_last_line(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "lo')  # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]

    with MetricsWriter(tmp_path) as writer:  # appending after the torn line starts a fresh line
        writer.write(3, {"loss": 3.0})
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_truncate_after_resume(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 6):
            writer.write(step, {"loss": float(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "lo')

    with MetricsWriter(tmp_path) as writer:  # resume from the checkpoint of step 3
        writer.truncate_after(3)
        assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
        for step in (4, 5):
            writer.write(step, {"loss": 10.0 * step})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40), (5, 50)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "tensorboard"]  # no temp file left

    first, second = read_events(tmp_path)
    assert scalars(first)["loss"] == {s: float(s) for s in range(1, 6)}
    # The resumed file starts with the purge marker at step 4, which hides the first run's steps 4 and 5.
    starts = [e.step for e in second if e.HasField("session_log") and e.session_log.status == e.session_log.START]
    assert starts == [4]
    assert scalars(second)["loss"] == {4: 40.0, 5: 50.0}


def test_truncate_after_without_file(tmp_path):
    writer = MetricsWriter(tmp_path / "run")
    writer.truncate_after(10)
    writer.close()
    assert list((tmp_path / "run").iterdir()) == []


def test_disabled_creates_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
        writer.truncate_after(0)
    assert not (tmp_path / "run").exists()


def test_plot_run(tmp_path):
    with MetricsWriter(tmp_path) as writer:
        for step in range(1, 21):
            writer.write(step, {
                "reward_composite_mean": math.sin(step / 3),
                "loss": float("nan") if step == 7 else 1.0 / step,
                "kl": 0.001 * step,
                "not_default": 1.0,
            })
    out = plot_run(tmp_path)
    assert out == tmp_path / "curves.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width, _ = matplotlib.image.imread(out).shape
    assert height > 100 and width > 100

    custom = plot_run(tmp_path, out=tmp_path / "one.png", keys=["not_default", "missing"])
    assert matplotlib.image.imread(custom).shape[1] < width  # one column of subplots
    with pytest.raises(ValueError, match="has no key missing; it logged: "):
        plot_run(tmp_path, keys=["missing"])


def test_cli(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "medix_jax.plot", *map(str, args)], cwd=REPO,
                              capture_output=True, text=True, timeout=60)

    result = cli(tmp_path)
    assert result.returncode == 2 and "metrics.jsonl does not exist" in result.stderr

    with MetricsWriter(tmp_path) as writer:
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 0.5})
    result = cli(tmp_path, "--keys", "kl")
    assert result.returncode == 2 and "has no key kl; it logged: loss" in result.stderr

    result = cli(tmp_path, "--out", tmp_path / "c.png", "--keys", "loss,kl")
    assert result.returncode == 0 and "has no key kl" in result.stderr, result.stderr  # named, the rest drawn
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
