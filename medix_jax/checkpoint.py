"""Training checkpoints with orbax ``CheckpointManager``: asynchronous, the newest ``keep`` kept (and chosen steps).

A checkpoint at step s holds everything needed to continue exactly: ``state`` (parameters and optimizer state,
restored straight into their shardings), ``data`` (the grain iterator state, JSON) and ``meta`` (step and the
resolved config, JSON). Randomness is derived from (seed, step), so it needs no state of its own. orbax writes
each step into a temporary directory and renames it when complete, so a killed save never looks finished. A
checkpoint that is structurally unreadable is moved aside (never deleted) and the previous one is tried; a
transient read error (I/O, timeout) is retried and then raised, leaving every checkpoint untouched.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy as pp

RESTORE_ATTEMPTS = 3  # tries per checkpoint when reading fails transiently
RETRY_BACKOFF_S = 2.0  # seconds before the second try, doubling after
# tensorstore reports every failure as ValueError prefixed by its status code; these codes are not the data's fault.
TRANSIENT_CODES = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "ABORTED", "RESOURCE_EXHAUSTED", "CANCELLED", "INTERNAL",
                   "UNKNOWN")


class IncompatibleCheckpoint(ValueError):
    """The newest checkpoint holds a state of another shape (a changed model or optimizer): nothing was touched."""


def flat_leaves(tree, prefix: str = "") -> dict:
    """``{"a.b.0": leaf}`` for a pytree or nested dicts, in the dotted names orbax gives stored arrays."""
    def name(part):
        return str(getattr(part, "key", getattr(part, "idx", getattr(part, "name", part))))
    return {prefix + ".".join(name(p) for p in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def is_structural(e: BaseException) -> bool:
    """Whether a restore error proves the checkpoint unreadable (missing or corrupt parts, a tree/shape/dtype
    mismatch) rather than a hiccup of the storage (I/O errors, timeouts) or something unrelated."""
    if isinstance(e, FileNotFoundError | KeyError):
        return True
    return isinstance(e, ValueError) and not str(e).startswith(TRANSIENT_CODES)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int, preserve: tuple[int, ...] = ()):
        """The newest ``keep`` checkpoints are kept, and those of the steps in ``preserve`` always (the end of a
        supervised stage: the KL reference of the GRPO stage after it)."""
        self.directory = Path(directory).absolute()
        policy = pp.AnyPreservationPolicy([pp.LatestN(keep), *([pp.CustomSteps(list(preserve))] if preserve else [])])
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=True,
                                                 create=True),
        )

    def save(self, step: int, state: dict, data_state: dict, meta: dict) -> None:
        """Start writing (returns while the write finishes in the background)."""
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)), force=True)

    def stored_tree(self, step: int) -> dict[str, tuple] | None:
        """``{name: (shape, dtype)}`` of step's stored state, from its metadata alone (None if that is unreadable)."""
        absl = logging.getLogger("absl")
        level = absl.level
        absl.setLevel(logging.ERROR)  # orbax warns that a PyTree item has no step-level metadata file of its own
        try:
            tree = ocp.PyTreeCheckpointer().metadata(self.directory / str(step) / "state").item_metadata.tree
        except Exception:  # broad on purpose: for a damaged checkpoint, restore_latest's own handling decides
            return None
        finally:
            absl.setLevel(level)
        return {k: (tuple(m.shape), str(m.dtype)) for k, m in flat_leaves(tree).items()}

    def restore(self, step: int, like: dict) -> dict:
        """Step's state, ``like`` giving structure and shardings (errors as orbax raises them)."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        return self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]

    def meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def check_compatible(self, step: int, like: dict, config: dict | None = None) -> None:
        """``IncompatibleCheckpoint`` if step's stored state differs from ``like`` in names, shapes or dtypes -- a
        run resumed with another model or optimizer -- naming the tensors and, given the current ``config``, the
        settings that differ from the checkpoint's own. Reads metadata only and changes nothing."""
        stored = self.stored_tree(step)
        if stored is None:
            return
        want = {k: (tuple(a.shape), str(a.dtype)) for k, a in flat_leaves(like).items()}
        problems = [f"{k} {stored.get(k, 'absent')} stored, {want.get(k, 'absent')} now"
                    for k in sorted(set(stored) | set(want), key=lambda k: (not k.startswith("params"), k))
                    if stored.get(k) != want.get(k)]
        if not problems:
            return
        settings = ""
        if config is not None:
            try:
                old = flat_leaves(self.meta(step).get("config", {}))
            except Exception:  # broad on purpose: the tensors alone still say what is wrong
                old = {}
            now = flat_leaves(config)
            changed = sorted((k for k in set(old) | set(now) if old.get(k) != now.get(k)),
                             key=lambda k: (not k.startswith("model."), k))
            settings = "; settings changed: " + ", ".join(
                f"{k} {old.get(k)!r} -> {now.get(k)!r}" for k in changed[:6]) + (" ..." if len(changed) > 6 else "")
        raise IncompatibleCheckpoint(
            f"checkpoint {self.directory / str(step)} holds another model or optimizer state ({len(problems)} tensors "
            f"differ, e.g. {'; '.join(problems[:2])}{settings}); nothing was changed: resume with the run's own "
            f"config ({self.directory.parent / 'config.yaml'}) or start a new run in another train.run_dir")

    def restore_latest(self, like: dict, config: dict | None = None) -> tuple[int, dict, dict] | None:
        """(step, state, data state) of the newest readable checkpoint, ``like`` giving structure and shardings;
        None when there is none. A structurally unreadable checkpoint (missing or corrupt files, a changed tree,
        shape or dtype) is moved aside to ``unreadable-<step>`` in the same directory, which orbax does not take
        for a step (so the run can write that step again), and the previous one is tried. Any other error (I/O,
        timeout) is retried ``RESTORE_ATTEMPTS`` times and then raised, nothing moved. If checkpoints exist but
        none restores, that is an error, not a fresh start. A newest checkpoint whose stored tree differs from
        ``like`` is an ``IncompatibleCheckpoint`` (``check_compatible``), raised before anything is read or moved."""
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        broken = {}
        steps = sorted(self.manager.all_steps(), reverse=True)
        if steps:
            self.check_compatible(steps[0], target, config)
        for step in steps:
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
