"""Checkpoints and exports survive hiccups: an interrupted export leaves the previous one, a transient read error
deletes no checkpoint, a broken checkpoint is moved aside, never deleted."""

import jax
import numpy as np
import pytest

from medix_jax import checkpoint
from medix_jax.checkpoint import Checkpoints
from medix_jax.models.qwen_vl import hf_io, init_model, preset
from medix_jax.models.qwen_vl.hf_io import load_hf, save_hf


def kernel(model):
    return np.asarray(model.model.layers[0].mlp.up_proj.kernel[...])


def test_an_interrupted_export_leaves_the_previous_one(tmp_path, monkeypatch):
    out, cfg = tmp_path / "hf", preset("tiny")
    first, second = init_model(cfg, 0), init_model(cfg, 1)
    save_hf(first, out, max_shard_bytes=200_000)  # several shards: the second one fails mid-export
    (out / "README.md").write_text("notes")
    real, calls = hf_io.save_file, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(hf_io, "save_file", failing)
    with pytest.raises(OSError, match="No space left"):
        save_hf(second, out, max_shard_bytes=200_000)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left or in its place
    np.testing.assert_array_equal(kernel(load_hf(out)), kernel(first))

    monkeypatch.setattr(hf_io, "save_file", real)
    (tmp_path / ".hf.tmp-999999").mkdir()  # left by a save killed mid-write
    (tmp_path / ".hf.tmp-999999" / "model.safetensors").write_bytes(b"partial")
    out.rename(tmp_path / ".hf.old-999999")  # a save killed between moving the old export aside and the new in
    assert save_hf(second, out) == out
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    np.testing.assert_array_equal(kernel(load_hf(out)), kernel(second))
    assert (out / "README.md").read_text() == "notes"  # files of the previous export that are not weights stay
    assert not list(out.glob("model-*.safetensors")) and not (out / hf_io.SAFETENSORS_INDEX).exists()


def two_checkpoints(directory):
    state = {"params": {"w": jax.numpy.arange(4.0)}, "opt_state": {"m": jax.numpy.zeros(2)}}
    checkpoints = Checkpoints(directory, keep=3)
    checkpoints.save(1, state, {"next_index": 1}, {"step": 1})
    checkpoints.save(2, {"params": {"w": state["params"]["w"] + 1}, "opt_state": state["opt_state"]},
                     {"next_index": 2}, {"step": 2})
    checkpoints.wait()
    checkpoints.close()
    return state


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), TimeoutError("read timed out"),
                                   ValueError("UNAVAILABLE: Error reading local file")],
                         ids=["io", "timeout", "tensorstore-unavailable"])
def test_a_transient_read_error_is_raised_and_deletes_nothing(tmp_path, monkeypatch, error):
    state = two_checkpoints(tmp_path)
    monkeypatch.setattr(checkpoint, "RETRY_BACKOFF_S", 0.0, raising=False)
    reopened = Checkpoints(tmp_path, keep=3)
    real, failures = reopened.manager.restore, []

    def flaky(step, *args, **kwargs):
        if step == 2 and len(failures) < limit:
            failures.append(step)
            raise error
        return real(step, *args, **kwargs)

    monkeypatch.setattr(reopened.manager, "restore", flaky)
    limit = 100
    with pytest.raises(RuntimeError, match=rf"checkpoint {tmp_path / '2'} .*left untouched"):
        reopened.restore_latest(state)
    assert len(failures) > 1  # retried before giving up
    assert (tmp_path / "2" / "state").is_dir() and reopened.manager.all_steps() == [1, 2]

    failures.clear()
    limit = 1  # a hiccup that passes: the retry restores the newest checkpoint
    step, restored, data_state = reopened.restore_latest(state)
    assert step == 2 and data_state == {"next_index": 2}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0) + 1)
    reopened.close()


def test_a_broken_checkpoint_is_moved_aside_not_deleted(tmp_path, capsys):
    state = two_checkpoints(tmp_path)
    parts = [f for f in (tmp_path / "2" / "state").rglob("*") if f.is_file() and f.parent.name == "d"]
    assert parts
    for f in parts:
        f.unlink()  # the array data is gone: structurally unreadable
    reopened = Checkpoints(tmp_path, keep=3)
    step, restored, data_state = reopened.restore_latest(state)
    assert step == 1 and data_state == {"next_index": 1}
    np.testing.assert_array_equal(restored["params"]["w"], np.arange(4.0))
    moved = tmp_path / "unreadable-2"
    assert not (tmp_path / "2").exists() and (moved / "state").is_dir() and (moved / "meta").is_dir()
    assert f"moved to {moved}" in capsys.readouterr().out
    fresh = Checkpoints(tmp_path, keep=3)
    assert reopened.manager.all_steps() == [1] and fresh.manager.all_steps() == [1]  # orbax sees no step in it
    fresh.close()

    reopened.save(2, state, {"next_index": 2}, {"step": 2})  # the run writes step 2 again
    reopened.close()
    again = Checkpoints(tmp_path, keep=3)
    step, _, data_state = again.restore_latest(state)
    again.close()
    assert step == 2 and data_state == {"next_index": 2} and moved.is_dir()
