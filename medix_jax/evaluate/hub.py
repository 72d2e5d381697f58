"""Hub downloads under ``--src``, as ``hf download`` or a Hugging Face cache leaves them: finding a dataset
repository (``find_repo``) and its files (``source_files``), reading their records (``read_records``) and the
image files they name (``Images``)."""

from __future__ import annotations

import csv
import io
import json
import zipfile
from pathlib import Path


class SourceError(ValueError):
    """A source file that is not as its hub distributes it (a missing column, an unreadable file)."""


def read_records(path: Path) -> list[dict]:
    """The records of a parquet, JSONL, JSON (a list, ``{"data": [...]}`` or ``{key: record}``) or CSV file."""
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".csv":
            return list(csv.DictReader(io.StringIO(text)))
        if path.suffix == ".json":
            try:
                data = json.loads(text)
            except json.JSONDecodeError:  # JSON lines under a .json name (as some hubs store them)
                return [json.loads(line) for line in text.splitlines() if line.strip()]
            if isinstance(data, dict) and isinstance(data.get("data"), list):
                return data["data"]
            if isinstance(data, dict):  # keyed by id (PubMedQA's own files)
                return [{"_key": k, **v} for k, v in data.items() if isinstance(v, dict)]
            return list(data)
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except (OSError, ValueError) as e:  # includes pyarrow's ArrowInvalid and json's errors
        raise SourceError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None


class Images:
    """Image files referred to by name, looked up in directories and zip archives (as hubs ship image folders)."""

    def __init__(self, containers: list[Path]):
        self.dirs = [c for c in containers if c.is_dir()]
        self.zips = [c for c in containers if c.is_file() and zipfile.is_zipfile(c)]
        self._subdirs: dict[Path, list[Path]] = {}
        self._members: dict[Path, tuple[zipfile.ZipFile, dict[str, str]]] = {}

    def read(self, name: str) -> bytes | None:
        """The file ``name`` (a relative path) from the first container that has it: ``DIR/name``, ``DIR/*/name``,
        or a zip member ``name`` or ``.../name``; None when none has it."""
        name = name.strip().lstrip("/")
        for root in self.dirs:
            if root not in self._subdirs:
                self._subdirs[root] = [d for d in root.iterdir() if d.is_dir()]
            for candidate in [root / name] + [d / name for d in self._subdirs[root]]:
                if candidate.is_file():
                    return candidate.read_bytes()
        for archive in self.zips:
            if archive not in self._members:
                z = zipfile.ZipFile(archive)
                index: dict[str, str] = {}
                for member in z.namelist():
                    parts = member.split("/")
                    for k in range(len(parts)):  # every suffix, so "imgs/a/b.jpg" is found as "a/b.jpg"
                        index.setdefault("/".join(parts[k:]), member)
                self._members[archive] = (z, index)
            z, index = self._members[archive]
            if name in index:
                return z.read(index[name])
        return None

    def close(self) -> None:
        """Close the zip archives opened so far."""
        for z, _ in self._members.values():
            z.close()


def find_repo(src: Path, repo: str) -> Path | None:
    """A hub repository's download under ``src``: ``OWNER/NAME``, ``NAME``, ``OWNER--NAME`` or a Hugging Face
    cache's newest snapshot."""
    owner, name = repo.split("/")
    for candidate in (src / owner / name, src / name, src / f"{owner}--{name}"):
        if candidate.is_dir():
            return candidate
    snapshots = sorted((src / f"datasets--{owner}--{name}" / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
    return snapshots[-1] if snapshots else None


def source_files(repo_dir: Path, patterns: tuple[str, ...]) -> list[Path]:
    """The files of the first pattern that matches anything (shards in name order)."""
    for pattern in patterns:
        files = sorted(p for p in repo_dir.glob(pattern) if p.is_file())
        if files:
            return files
    return []


def get_command(repo: str, src: Path) -> str:
    """The command that downloads ``repo`` to where ``find_repo`` looks for it."""
    return f"hf download {repo} --repo-type dataset --local-dir {src / repo}"
