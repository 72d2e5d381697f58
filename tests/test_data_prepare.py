"""Data preparation: synthetic parquet / JSONL sources -> tfds ArrayRecord, read back byte for byte; bad records are
skipped one by one with the right reason, never a crash."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from medix_jax.data.builder import VERSION
from medix_jax.data.prepare import PrepareOptions, prepare
from medix_jax.data.prepare import main as prepare_main
from medix_jax.data.synthetic import png_bytes, synthetic_records, write_synthetic


def read_split(data_dir, name, split):
    source = tfds.data_source(name, data_dir=str(data_dir), split=split)
    return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_synthetic_source_round_trips_byte_for_byte(tmp_path, fmt):
    write_synthetic(tmp_path / "src", fmt, train=240, test=30, seed=1)
    report = prepare(tmp_path / "src", tmp_path / "data")
    assert report.kept == {"train": 240, "test": 30} and not report.skipped
    for split, n in (("train", 240), ("test", 30)):
        expected = list(synthetic_records(n, seed=1, split=split))
        got = read_split(tmp_path / "data", "medix_rl", split)
        assert len(got) == n
        for want, have in zip(expected, got, strict=True):
            assert have["images"] == want["image"]  # identical encoded bytes
            for field in ("id", "source", "problem", "solution", "completion"):  # completion: the record's trace
                assert have[field].decode() == want[field]
            tag, answer = want["solution"].split(" ", 1)
            assert (have["modality"].decode(), have["answer"].decode()) == (tag, answer)
    info = json.loads((tmp_path / "data" / "medix_rl" / VERSION / "prepare_report.json").read_text())
    assert info["kept"] == {"train": 240, "test": 30} and info["completions"] == {"train": 240, "test": 30}


def test_without_a_test_file_a_fraction_of_train_is_held_out(tmp_path):
    write_synthetic(tmp_path / "src", "jsonl", train=200, test=0)
    report = prepare(tmp_path / "src", tmp_path / "data", name="held")
    assert report.kept["train"] + report.kept["test"] == 200 and 2 <= report.kept["test"] <= 25
    train = {r["id"] for r in read_split(tmp_path / "data", "held", "train")}
    test = {r["id"] for r in read_split(tmp_path / "data", "held", "test")}
    assert not train & test


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def bad_corpus() -> tuple[list[tuple[str, dict]], dict, set]:
    """(id, record) pairs covering every failure and every convertible oddity; expected skip counts."""
    good = png_bytes(Image.new("RGB", (64, 48), (10, 200, 30)))
    sixteen = Image.fromarray((np.arange(80 * 60).reshape(60, 80) * 13 % 65535).astype(np.uint16))
    fine = {
        "rgba": encoded(Image.new("RGBA", (60, 60), (255, 0, 0, 128))),
        "gray": encoded(Image.new("L", (60, 60), 90)),
        "cmyk": encoded(Image.new("CMYK", (60, 60), (0, 50, 100, 20)), "JPEG"),
        "sixteen_bit": encoded(sixteen),
        "palette": encoded(Image.new("P", (60, 60), 3)),
        "tiny_image": encoded(Image.new("RGB", (3, 5), (1, 2, 3))),  # under min_pixels: scaled up later
        "huge_image": encoded(Image.new("RGB", (4000, 3000), (9, 9, 9))),  # over max_pixels: scaled down later
        "unicode": good,
    }
    records = [(key, {"image": [data], "problem": "Which finding?", "solution": "<CT_SCAN> nodule"})
               for key, data in fine.items()]
    records[-1][1]["problem"] = "Quelle lésion ? 病变 🫁"
    bad = {
        "corrupt": ({"image": [b"\x89PNG\r\n\x1a\nnot really a png"]}, "undecodable_image"),
        "truncated": ({"image": [good[: len(good) // 2]]}, "truncated_image"),
        "zero_bytes": ({"image": [b""]}, "empty_image"),
        "aspect": ({"image": [encoded(Image.new("RGB", (2, 500)))]}, "image_aspect_ratio"),
        "no_image": ({"image": []}, "image_count"),
        "two_images": ({"image": [good, good]}, "image_count"),
        "missing_tag": ({"solution": "nodule"}, "missing_tag"),
        "unknown_tag": ({"solution": "<PHOTO> nodule"}, "unknown_tag"),
        "empty_answer": ({"solution": "<CT_SCAN>   "}, "empty_answer"),
        "empty_problem": ({"problem": "  \n "}, "empty_problem"),
        "long_text": ({"problem": "x" * 100_000}, "text_too_long"),
    }
    for key, (change, _) in bad.items():
        records.append((key, {"image": [good], "problem": "Which finding?", "solution": "<CT_SCAN> nodule",
                              **change}))
    records.append(("unicode", {"image": [good], "problem": "again", "solution": "<CT_SCAN> x"}))  # duplicate id
    expected = {reason: sum(r == reason for _, r in bad.values()) for _, reason in bad.values()}
    expected["duplicate_id"] = 1
    return [(key, {"id": key, "source": "test", **record}) for key, record in records], expected, set(fine)


def test_bad_parquet_records_are_skipped_with_their_reasons(tmp_path):
    records, expected, fine = bad_corpus()
    rows = [{**r, "image": [{"bytes": b, "path": None} for b in r["image"]]} for _, r in records]
    (tmp_path / "src").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "train-00000-of-00001.parquet")
    report = prepare(tmp_path / "src", tmp_path / "data", opts=PrepareOptions(test_fraction=0))
    assert dict(report.skipped["train"]) == expected and report.kept == {"train": len(fine)}
    assert sorted(r["id"].decode() for r in read_split(tmp_path / "data", "medix_rl", "train")) == sorted(fine)


def test_bad_jsonl_lines_are_skipped_with_their_reasons(tmp_path):
    records, expected, fine = bad_corpus()
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    lines = []
    for key, record in records:
        names = []
        for k, data in enumerate(record["image"]):
            (src / "img" / f"{key}{k}").write_bytes(data)
            names.append(f"img/{key}{k}")
        lines.append(json.dumps({**record, "image": names}).encode())
    lines.append(json.dumps({"id": "latin1", "image": ["img/gray0"], "problem": "x",
                             "solution": "<CT_SCAN> y"}).encode().replace(b'"x"', b'"caf\xe9"'))
    lines.append(b'{"id": "broken", "image": [')
    lines.append(b'["a list, not an object"]')
    lines.append(json.dumps({"id": "lost", "image": ["img/nowhere.png"], "problem": "x",
                             "solution": "<CT_SCAN> y"}).encode())
    (src / "train.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (src / "test.jsonl").write_text(json.dumps({"id": "t1", "image": ["img/gray0"], "problem": "p",
                                                "solution": "<MRI_SCAN> q"}) + "\n")
    report = prepare(src, tmp_path / "data")
    assert dict(report.skipped["train"]) == {**expected, "non_utf8_text": 1, "malformed_record": 2,
                                             "missing_image_file": 1}
    assert report.kept == {"train": len(fine), "test": 1}
    assert sorted(r["id"].decode() for r in read_split(tmp_path / "data", "medix_rl", "train")) == sorted(fine)


def test_a_split_with_no_valid_record_writes_nothing_and_the_cli_says_why(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "train.jsonl").write_text(json.dumps({"id": "a", "image": [], "problem": "p", "solution": "<X_RAY> b"}))
    assert prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data")]) == 2
    assert "no valid record" in capsys.readouterr().err
    assert not (tmp_path / "data" / "medix_rl" / VERSION).exists()
    write_synthetic(src, "jsonl", train=20, test=5)
    assert prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data")]) == 0
    assert prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data")]) == 2  # exists: no overwrite
    assert "already exists" in capsys.readouterr().err
    assert prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data"), "--overwrite"]) == 0


def test_completions_are_checked_like_the_other_text_fields(tmp_path, capsys):
    """The completion column is optional (null: ""), but a bad value skips its record under the usual reason."""
    good = png_bytes(Image.new("RGB", (64, 48), (10, 200, 30)))
    trace = "<CT_SCAN><thinking>Rundlich, 病变 🫁\n</thinking><answer>nodule</answer>"
    completions = {"ok": trace.encode(), "null": None, "empty": b"", "latin1": "café".encode("latin-1"),
                   "too_long": b"x" * 40_000}
    rows = [{"id": key, "image": [{"bytes": good, "path": None}], "problem": "Which finding?",
             "solution": "<CT_SCAN> nodule", "completion": value} for key, value in completions.items()]
    (tmp_path / "src").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "src" / "train-00000-of-00001.parquet")
    report = prepare(tmp_path / "src", tmp_path / "data", opts=PrepareOptions(test_fraction=0))
    assert dict(report.skipped["train"]) == {"non_utf8_text": 1, "text_too_long": 1}
    assert report.kept == {"train": 3} and report.completions == {"train": 1}
    got = {r["id"].decode(): r["completion"].decode() for r in read_split(tmp_path / "data", "medix_rl", "train")}
    assert got == {"ok": trace, "null": "", "empty": ""}

    src = tmp_path / "jsonl"
    src.mkdir()
    (src / "g.png").write_bytes(good)
    lines = [{"id": key, "image": ["g.png"], "problem": "p", "solution": "<X_RAY> q", "completion": value}
             for key, value in {"number": 3, "list": ["a"], "fine": trace}.items()]
    (src / "train.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    report = prepare(src, tmp_path / "data2", opts=PrepareOptions(test_fraction=0))
    assert dict(report.skipped["train"]) == {"malformed_record": 2} and report.completions == {"train": 1}

    assert prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data3"), "--completion-field", " "]) == 2
    assert "completion_field" in capsys.readouterr().err
