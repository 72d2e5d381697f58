"""Prepare a MediX-style dataset once: ``python -m medix_jax.data.prepare --src DIR --data-dir DIR [--name NAME]``.

Reads a local copy of the data as the hub stores it (``*.parquet`` shards, images as ``{"bytes", "path"}``) or JSONL
files (``train.jsonl`` / ``test.jsonl``, images as paths relative to the file), validates every record and writes
the splits with the tfds builder (``builder.py``). The split of a file is the start of its name (``train-00003-of-
00010.parquet`` -> train); with no test file, ``--test-fraction`` of train is held out by a hash of the id.

A record may carry a target completion for supervised fine-tuning (e.g. a reasoning trace
``<CT_SCAN><thinking>...</thinking><answer>...</answer>``) in the column named by ``--completion-field`` (default
``completion``). It is optional -- a source or a record without it (or with null) stores "" -- and is checked like
the other text fields (UTF-8, ``--max-text-chars``), stored exactly as given. How many records of each split carry
one is part of the report, so a misspelt column name shows as 0.

A record that cannot be used is skipped and counted under one reason (``REASONS``); preparation never stops on one
bad record. The counts are printed and written to ``prepare_report.json`` beside the dataset. A split left with no
valid record is an error, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import tensorflow_datasets as tfds
from tqdm import tqdm

from medix_jax.data.builder import VERSION, builder
from medix_jax.data.image import MAX_ASPECT_RATIO, BadImage, decode_image, to_rgb
from medix_jax.rewards.rules import MEDIX_MODALITY_TAGS, BadSolution, parse_solution

REASONS = {
    "malformed_record": "not a JSON object / a field of the wrong type",
    "non_utf8_text": "a text field that is not valid UTF-8",
    "text_too_long": "a text field longer than --max-text-chars",
    "empty_problem": "no question text",
    "missing_tag": "solution does not start with a <TAG>",
    "unknown_tag": "solution's tag is not one of the modality tags",
    "empty_answer": "solution has a tag but no answer",
    "duplicate_id": "an id seen before",
    "image_count": "fewer than --min-images or more than --max-images images",
    "missing_image_file": "an image path that does not exist",
    "empty_image": "zero-byte image",
    "undecodable_image": "image bytes PIL cannot read",
    "truncated_image": "image file cut short",
    "image_too_large": "over PIL's decompression-bomb limit",
    "image_aspect_ratio": f"aspect ratio above {MAX_ASPECT_RATIO}",
}
SPLITS = ("train", "test", "validation")


class Skip(Exception):
    def __init__(self, reason: str):
        assert reason in REASONS, reason
        super().__init__(reason)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    modality_tags: tuple[str, ...] = MEDIX_MODALITY_TAGS
    min_images: int = 1
    max_images: int = 1
    max_text_chars: int = 32768
    test_fraction: float = 0.05  # held out of train when the source has no test split
    completion_field: str = "completion"  # source column with a target completion (optional; "" when absent)

    def __post_init__(self):
        if not self.completion_field.strip():
            raise ValueError("completion_field must name a column")


# ----------------------------------------------------------------------------------------------------------------
# Sources: each yields (origin, raw record or Skip) in file order.


SPLIT_ALIASES = {"val": "validation", "valid": "validation", "dev": "validation", "eval": "test"}


def _split_of(path: Path) -> str:
    """The start of the file name: train / test / validation (val, valid, dev); anything else is train."""
    stem = path.name.split("-")[0].split(".")[0].split("_")[0].lower()
    stem = SPLIT_ALIASES.get(stem, stem)
    return stem if stem in SPLITS else "train"


def _parquet_rows(path: Path) -> Iterator[tuple[str, dict | Skip]]:
    import pyarrow.parquet as pq

    row = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
        for record in batch.to_pylist():
            yield f"{path.name}:{row}", record
            row += 1


def _jsonl_rows(path: Path) -> Iterator[tuple[str, dict | Skip]]:
    with path.open("rb") as f:
        for row, line in enumerate(f):
            if not line.strip():
                continue
            try:
                record = json.loads(line.decode("utf-8"))
            except UnicodeDecodeError:
                record = Skip("non_utf8_text")
            except json.JSONDecodeError:
                record = Skip("malformed_record")
            yield f"{path.name}:{row}", record if isinstance(record, dict | Skip) else Skip("malformed_record")


def source_files(src: Path) -> dict[str, list[Path]]:
    """Split name -> source files (parquet preferred over JSONL), in name order."""
    files = sorted(src.rglob("*.parquet")) or sorted(src.rglob("*.jsonl"))
    if not files:
        raise FileNotFoundError(f"no *.parquet or *.jsonl files under {src}")
    splits: dict[str, list[Path]] = {}
    for path in files:
        splits.setdefault(_split_of(path), []).append(path)
    return splits


# ----------------------------------------------------------------------------------------------------------------
# Validation


def _text(record: dict, field: str, opts: PrepareOptions) -> str:
    value = record.get(field)
    if value is None:
        return ""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise Skip("non_utf8_text") from None
    if not isinstance(value, str):
        raise Skip("malformed_record")
    if len(value) > opts.max_text_chars:
        raise Skip("text_too_long")
    return value


def _image_bytes(entry, base_dir: Path) -> bytes:
    if isinstance(entry, dict):  # the hub's Image struct: inline bytes, or a path
        if entry.get("bytes") is not None:
            return entry["bytes"]
        entry = entry.get("path")
    if isinstance(entry, bytes):
        return entry
    if isinstance(entry, str):
        path = Path(entry) if Path(entry).is_absolute() else base_dir / entry
        if not path.is_file():
            raise Skip("missing_image_file")
        return path.read_bytes()
    raise Skip("malformed_record")


def validate(record: dict, base_dir: Path, opts: PrepareOptions) -> dict:
    """A raw record -> the record to store; ``Skip(reason)`` when it cannot be used."""
    problem = _text(record, "problem", opts)
    solution = _text(record, "solution", opts)
    prepared: dict[str, str | list[bytes]] = {
        "id": _text(record, "id", opts).strip(), "source": _text(record, "source", opts), "problem": problem,
        "solution": solution, "completion": _text(record, opts.completion_field, opts)}
    if not problem.strip():
        raise Skip("empty_problem")
    try:
        prepared["modality"], prepared["answer"] = parse_solution(solution, opts.modality_tags)
    except BadSolution as e:
        raise Skip(e.reason) from None
    images = record.get("image", record.get("images"))
    images = [] if images is None else images if isinstance(images, list) else [images]
    if not opts.min_images <= len(images) <= opts.max_images:
        raise Skip("image_count")
    encoded = [_image_bytes(entry, base_dir) for entry in images]
    prepared["images"] = encoded
    for data in encoded:
        try:
            image = decode_image(data)
        except BadImage as e:
            raise Skip(e.reason) from None
        if max(image.size) > MAX_ASPECT_RATIO * min(image.size):
            raise Skip("image_aspect_ratio")
        to_rgb(image)  # every mode we accept converts (RGBA, L, P, CMYK, 16-bit, ...)
    return prepared


# ----------------------------------------------------------------------------------------------------------------
# Preparation


@dataclasses.dataclass
class Report:
    kept: Counter = dataclasses.field(default_factory=Counter)  # split -> records written
    completions: Counter = dataclasses.field(default_factory=Counter)  # split -> of those, with a completion
    skipped: dict[str, Counter] = dataclasses.field(default_factory=dict)  # split -> reason -> count
    examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # reason -> first origins

    def skip(self, split: str, reason: str, origin: str) -> None:
        self.skipped.setdefault(split, Counter())[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 10:
            shown.append(origin)

    def to_dict(self) -> dict:
        return {"kept": dict(self.kept), "completions": dict(self.completions),
                "skipped": {s: dict(c) for s, c in self.skipped.items()}, "examples": self.examples}

    def summary(self) -> str:
        lines = []
        for split in sorted(set(self.kept) | set(self.skipped)):
            skipped = self.skipped.get(split, Counter())
            lines.append(f"  {split}: {self.kept[split]} written ({self.completions[split]} with a completion), "
                         f"{sum(skipped.values())} skipped")
            lines += [f"    {reason:<20} {n}" for reason, n in skipped.most_common()]
        return "\n".join(lines)


class EmptySplit(ValueError):
    """A split that got no valid record; the message says where the valid records went and what fixes it."""

    def __init__(self, split: str, files: list[Path], report: Report, diverted: int, test_fraction: float):
        skipped = dict(report.skipped.get(split, {}))
        went = {s: n for s, n in report.kept.items() if n and s != split}
        if diverted:  # the held-out split of the same files, whether or not it was written yet
            went = {"test" if split == "train" else "train": diverted}
        text = (f"split {split!r} got no valid record from {', '.join(str(f) for f in files)}"
                + (f" (skipped: {skipped})" if skipped else "")
                + (f"; the valid records went to {', '.join(f'{s} ({n})' for s, n in went.items())}" if went else ""))
        if test_fraction:
            text += (f"; with no test file, --test-fraction {test_fraction} of train is held out by a hash of the id: "
                     "add records, raise --test-fraction, or add a test file")
        else:
            text += "; add valid records to that split's files (the counts above say why records were skipped)"
        super().__init__(text)


def _held_out(record_id: str, fraction: float) -> bool:
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) < fraction * 16**8


def prepare(src: str | Path, data_dir: str | Path, name: str = "medix_rl", opts: PrepareOptions = PrepareOptions(),
            overwrite: bool = False) -> Report:
    src, data_dir = Path(src), Path(data_dir)
    target = data_dir / name / VERSION
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists (pass --overwrite to prepare it again)")
        shutil.rmtree(target)
    files = source_files(src)
    hold_out = "test" not in files and opts.test_fraction > 0
    report = Report()
    seen: set[str] = set()
    diverted: Counter = Counter()  # split -> valid records its files gave to the other split (held out by hash)

    def records(split_files: list[Path], out_split: str, keep=lambda _: True):
        def generate():
            for path in split_files:
                rows = _parquet_rows(path) if path.suffix == ".parquet" else _jsonl_rows(path)
                for origin, raw in tqdm(rows, desc=f"{out_split} {path.name}", unit=" records", leave=False):
                    try:
                        if isinstance(raw, Skip):
                            raise raw
                        record = validate(raw, path.parent, opts)
                        record["id"] = record["id"] or origin
                        if not keep(record["id"]):  # held out for the other split
                            diverted[out_split] += 1
                            continue
                        if record["id"] in seen:
                            raise Skip("duplicate_id")
                    except Skip as e:
                        report.skip(out_split, e.reason, origin)
                        continue
                    seen.add(record["id"])
                    report.kept[out_split] += 1
                    report.completions[out_split] += bool(record["completion"])
                    yield record
            if not report.kept[out_split]:
                raise EmptySplit(out_split, split_files, report, diverted[out_split], hold_out and opts.test_fraction)
        return generate

    splits = {split: records(paths, split) for split, paths in files.items() if split != "train" or not hold_out}
    if hold_out:
        splits["train"] = records(files["train"], "train", lambda i: not _held_out(i, opts.test_fraction))
        splits["test"] = records(files["train"], "test", lambda i: _held_out(i, opts.test_fraction))
    tfds.disable_progress_bar()  # our own bar per source file; the builder says where it writes
    builder(name, str(data_dir), splits).download_and_prepare()
    (target / "prepare_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def main(argv=None) -> int:
    from medix_jax import cli

    parser = cli.parser("medix_jax.data.prepare", __doc__)
    parser.add_argument("--src", required=True, help="directory with the parquet shards or JSONL files")
    parser.add_argument("--data-dir", required=True, help="tfds data directory to write into")
    parser.add_argument("--name", default="medix_rl", help="dataset name")
    parser.add_argument("--min-images", type=int, default=PrepareOptions.min_images,
                        help="fewest images a record may carry")
    parser.add_argument("--max-images", type=int, default=PrepareOptions.max_images,
                        help="most images a record may carry")
    parser.add_argument("--max-text-chars", type=int, default=PrepareOptions.max_text_chars,
                        help="longest text field kept, in characters")
    parser.add_argument("--test-fraction", type=float, default=PrepareOptions.test_fraction,
                        help="share of train held out as test (by a hash of the id) when the source has no test split")
    parser.add_argument("--completion-field", default=PrepareOptions.completion_field, metavar="NAME",
                        help="source column holding a target completion for supervised fine-tuning, e.g. a "
                             "reasoning trace (optional: absent or null stores \"\")")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing prepared copy")
    args = parser.parse_args(argv)
    try:
        opts = PrepareOptions(min_images=args.min_images, max_images=args.max_images,
                              max_text_chars=args.max_text_chars, test_fraction=args.test_fraction,
                              completion_field=args.completion_field)
        cli.check_writable(args.data_dir, "--data-dir")
        report = prepare(args.src, args.data_dir, args.name, opts, args.overwrite)
    except (OSError, ValueError) as e:
        return cli.fail("data.prepare", e)
    print(f"prepared {args.name} {VERSION} in {Path(args.data_dir) / args.name / VERSION}\n{report.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
