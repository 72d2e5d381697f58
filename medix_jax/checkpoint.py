"""Training checkpoints with orbax ``CheckpointManager``: asynchronous, the newest ``keep`` kept.

A checkpoint at step s holds everything needed to continue exactly: ``state`` (parameters and optimizer state,
restored straight into their shardings), ``data`` (the grain iterator state, JSON) and ``meta`` (step and the
resolved config, JSON). Randomness is derived from (seed, step), so it needs no state of its own. orbax writes
each step into a temporary directory and renames it when complete, so a killed save never looks finished; a
checkpoint that still fails to restore is reported and the previous one is tried.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp


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
        None when there is none. Unreadable newer checkpoints are deleted once an older one restores (the run will
        write those steps again); if checkpoints exist but none restores, that is an error, not a fresh start."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        broken = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(),
                    meta=ocp.args.JsonRestore()))
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint: say so, fall back to the previous
                print(f"checkpoint {self.directory / str(step)} cannot be restored ({type(e).__name__}: "
                      f"{str(e)[:300]}); trying the previous one", flush=True)
                broken.append(step)
                continue
            for bad in broken:
                print(f"deleting unreadable checkpoint {self.directory / str(bad)}", flush=True)
                self.manager.delete(bad)
            return step, restored["state"], restored["data"]
        if broken:
            raise RuntimeError(f"none of the checkpoints {sorted(broken)} in {self.directory} can be restored (a "
                               "changed model, optimizer or KL setting?); move them away to start afresh")
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
