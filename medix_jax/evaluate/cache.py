"""The per-task cache of a run: every generation, judgement and medix reward, appended as soon as it exists, so an
interrupted run resumes without redoing finished samples."""

from __future__ import annotations

import json
from pathlib import Path


class Cache:
    """Append-only JSONL per task: ``{"id", "generation"}``, ``{"id", "judgement"}`` and (medix tasks: the rewards of
    the latest run, with the pool's reason for each missing one) ``{"id", "reward"}`` lines; the last one wins."""

    def __init__(self, path: Path):
        self.path, self.generations, self.judgements, self.rewards = path, {}, {}, {}
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a kill
                    continue
                if "generation" in record:
                    self.generations[record["id"]] = record["generation"]
                if "judgement" in record:
                    self.judgements[record["id"]] = record["judgement"]
                if "reward" in record:
                    self.rewards[record["id"]] = record["reward"]
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = path.open("a", encoding="utf-8")

    def add(self, item_id: str, **record) -> None:
        """Append ``record`` (``generation=``, ``judgement=`` or ``reward=``) for ``item_id``, flushed at once."""
        self.file.write(json.dumps({"id": item_id, **record}, ensure_ascii=False) + "\n")
        self.file.flush()
        for key, value in record.items():
            getattr(self, key + "s")[item_id] = value

    def close(self) -> None:
        self.file.close()
