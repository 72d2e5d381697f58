"""Training checkpoints with orbax ``CheckpointManager``: asynchronous, the newest ``keep`` kept.

A checkpoint at step s holds everything needed to continue exactly: ``state`` (parameters and optimizer state,
restored straight into their shardings), ``data`` (the grain iterator state, JSON) and ``meta`` (step and the
resolved config, JSON). Randomness is derived from (seed, step), so it needs no state of its own. orbax writes
each step into a temporary directory and renames it when complete, so a killed save never looks finished. A
checkpoint that is structurally unreadable is moved aside (never deleted) and the previous one is tried; a
transient read error (I/O, timeout) is retried and then raised, leaving every checkpoint untouched.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp

RESTORE_ATTEMPTS = 3  # tries per checkpoint when reading fails transiently
RETRY_BACKOFF_S = 2.0  # seconds before the second try, doubling after
# tensorstore reports every failure as ValueError prefixed by its status code; these codes are not the data's fault.
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL",
                   "UNKNOWN")


def is_structural(e: BaseException) -> bool:
    """Whether a restore error proves the checkpoint unreadable (missing or corrupt parts, a tree/shape/dtype
    mismatch) rather than a hiccup of the storage (I/O errors, timeouts) or something unrelated."""
    if isinstance(e, FileNotFoundError | KeyError):
        return True
    return isinstance(e, ValueError) and not str(e).startswith(TRANSIENT_CODES)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int):
        self.directory = Path(directory).absolute()
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True),
        )

    def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
        """Start writing (returns while the write finishes in the background)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def restore_latest(self, like: dict) -> tuple[int, dict, dict] | None:
        """(step, state, data state) of the newest readable checkpoint, ``like`` giving structure and shardings;
        None when there is none. A structurally unreadable checkpoint (missing or corrupt files, a changed tree,
        shape or dtype) is moved aside to ``unreadable-<step>`` in the same directory, which orbax does not take
        for a step (so the run can write that step again), and the previous one is tried. Any other error (I/O,
        timeout) is retried ``RESTORE_ATTEMPTS`` times and then raised, nothing moved. If checkpoints exist but
        none restores, that is an error, not a fresh start."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        broken = {}
        for step in sorted(self.manager.all_steps(), reverse=True):
            for attempt in range(RESTORE_ATTEMPTS):
                try:
                    restored = self.manager.restore(step, args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                        meta=ocp.args.JsonRestore()))
                    return step, restored["state"], restored["data"]
                except Exception as e:  # sorted below: unreadable (move aside), or maybe passing (retry)
                    error = f"{type(e).__name__}: {str(e)[:300]}"
                    if is_structural(e):
                        broken[step] = self._move_aside(step)
                        print(f"checkpoint {self.directory / str(step)} cannot be restored ({error}); moved to "
                              f"{broken[step]}; trying the previous one", flush=True)
                        break
                    if attempt == RESTORE_ATTEMPTS - 1:
                        raise RuntimeError(f"checkpoint {self.directory / str(step)} could not be read in "
                                           f"{RESTORE_ATTEMPTS} attempts ({error}); it was left untouched") from e
                    print(f"reading checkpoint {self.directory / str(step)} failed ({error}); retrying", flush=True)
                    time.sleep(RETRY_BACKOFF_S * 2**attempt)
        if broken:
            raise RuntimeError(f"none of the checkpoints {sorted(broken)} in {self.directory} can be restored (a "
                               "changed model, optimizer or KL setting?); they were moved to "
                               f"{', '.join(map(str, broken.values()))}")
        return None

    def _move_aside(self, step: int) -> Path:
        """Rename step's directory to a free ``unreadable-<step>[.n]`` (process 0, like orbax's deletes), then
        reread the step list."""
        dest, n = self.directory / f"unreadable-{step}", 0
        while dest.exists():
            n += 1
            dest = self.directory / f"unreadable-{step}.{n}"
        ocp.multihost.sync_global_processes(f"medix_jax.checkpoint.unreadable:{step}:chosen")  # all chose `dest`
        if jax.process_index() == 0:
            (self.directory / str(step)).rename(dest)
        ocp.multihost.sync_global_processes(f"medix_jax.checkpoint.unreadable:{step}:moved")
        self.manager.reload()
        return dest

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
