"""A synthetic MediX-style dataset in the hub's raw format, for tests and the embedded default training run.

Each record is one PIL-drawn image and a question about it. The image's *style* gives the modality tag (an X-ray is a
bright shape on black, an ultrasound a speckled fan, a fundus photo an orange disc, ...) and the *shape* drawn on it
gives the answer, so both rewards are learnable from the pixels. Fields are those of ``MBZUAI/medix-rl-data``
(docs/reference.md#training-data): ``id``, ``image`` (a list of encoded images), ``source``, ``problem``,
``solution`` = "<TAG> answer", plus a ``completion``: a reasoning trace that says what the image shows (``trace``),
for supervised cold starts.

Written as the hub stores it (``data/{split}-00000-of-00001.parquet``, images as ``{"bytes", "path"}`` structs) or
as JSONL (``{split}.jsonl`` with image paths relative to the file, PNGs under ``images/``).
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "cross")
# Each finding has its own colour as well as its shape: a cue that a tiny model's 14-pixel patches carry directly,
# so that the embedded default run can learn to read the image within minutes on a CPU.
SHAPE_COLOURS = {"circle": (250, 230, 50), "square": (40, 200, 80), "triangle": (60, 100, 250),
                 "cross": (220, 40, 200)}
MODALITIES = ("<X_RAY>", "<CT_SCAN>", "<ULTRASOUND>", "<FUNDUS_PHOTOGRAPHY>", "<MICROSCOPY>")
# What each image shows, in words: the reasoning trace of a record (its ``completion`` field).
BACKGROUNDS = {"<X_RAY>": "a dark film", "<CT_SCAN>": "a grey disc", "<ULTRASOUND>": "a speckled fan",
               "<FUNDUS_PHOTOGRAPHY>": "an orange disc", "<MICROSCOPY>": "a pink slide"}
COLOUR_NAMES = {"circle": "yellow", "square": "green", "triangle": "blue", "cross": "magenta"}
QUESTIONS = (
    "Which shape is the lesion in this image?",
    "What is the shape of the highlighted finding?",
    "Name the shape of the abnormality shown.",
)


def _background(modality: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    if modality == "<X_RAY>":
        return Image.new("L", size, rng.randint(0, 30)).convert("RGB")
    if modality == "<CT_SCAN>":
        image = Image.new("RGB", size, (0, 0, 0))
        ImageDraw.Draw(image).ellipse((w * 0.05, h * 0.05, w * 0.95, h * 0.95), fill=(70, 70, 70))
        return image
    if modality == "<ULTRASOUND>":
        image = Image.new("RGB", size, (0, 0, 0))
        draw = ImageDraw.Draw(image)
        draw.pieslice((-w * 0.5, -h * 0.9, w * 1.5, h * 1.0), 55, 125, fill=(90, 90, 90))
        for _ in range(w * h // 40):
            x, y = rng.randrange(w), rng.randrange(h)
            pixel = image.getpixel((x, y))
            assert isinstance(pixel, tuple)  # an RGB image's pixel is an (r, g, b) tuple
            if pixel[0]:
                draw.point((x, y), fill=(160, 160, 160))
        return image
    if modality == "<FUNDUS_PHOTOGRAPHY>":
        image = Image.new("RGB", size, (0, 0, 0))
        ImageDraw.Draw(image).ellipse((w * 0.02, h * 0.02, w * 0.98, h * 0.98), fill=(200, 90, 30))
        return image
    return Image.new("RGB", size, (235, 200, 225))  # microscopy: a pink stained slide


def draw_example(modality: str, shape: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    image = _background(modality, size, rng)
    w, h = size
    r = min(w, h) * rng.uniform(0.2, 0.3)
    cx, cy = rng.uniform(0.35, 0.65) * w, rng.uniform(0.35, 0.65) * h
    colour = SHAPE_COLOURS[shape]
    draw = ImageDraw.Draw(image)
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "square":
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    else:
        draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=colour)
        draw.rectangle((cx - r / 3, cy - r, cx + r / 3, cy + r), fill=colour)
    return image


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def synthetic_records(n: int, seed: int = 0, split: str = "train", image_size: tuple[int, int] = (56, 112)):
    """``n`` raw records (image bytes inline); side lengths drawn uniformly from ``image_size``."""
    rng = random.Random(f"{seed}-{split}")
    for i in range(n):
        modality, shape = rng.choice(MODALITIES), rng.choice(SHAPES)
        size = (rng.randint(*image_size), rng.randint(*image_size))
        yield {
            "id": f"synthetic-{split}-{i:06d}",
            "image": [png_bytes(draw_example(modality, shape, size, rng))],
            "source": "synthetic",
            "problem": rng.choice(QUESTIONS),
            "solution": f"{modality} {shape}",
            "completion": trace(modality, shape),
        }


def trace(modality: str, shape: str) -> str:
    """A record's reasoning trace in the MediX format: what the image shows, then the tag and answer it implies."""
    return (f"{modality}<thinking>I see {BACKGROUNDS[modality]} with a {COLOUR_NAMES[shape]} lesion.</thinking>"
            f"<answer>{shape}</answer>")


def write_parquet(records, out_dir: Path, split: str) -> Path:
    """Hub layout: ``out_dir/data/{split}-00000-of-00001.parquet``; images as ``list<struct<bytes, path>>``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{**r, "image": [{"bytes": b, "path": None} for b in r["image"]]} for r in records]
    schema = pa.schema([
        ("id", pa.string()),
        ("image", pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))),
        ("source", pa.string()), ("problem", pa.string()), ("solution", pa.string()), ("completion", pa.string()),
    ])
    path = Path(out_dir) / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_jsonl(records, out_dir: Path, split: str) -> Path:
    """``out_dir/{split}.jsonl``; each image saved to ``out_dir/images/{id}-{k}.png`` and named by relative path."""
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{split}.jsonl"
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            names = []
            for k, data in enumerate(r["image"]):
                names.append(f"images/{r['id']}-{k}.png")
                (out_dir / names[-1]).write_bytes(data)
            f.write(json.dumps({**r, "image": names}, ensure_ascii=False) + "\n")
    return path


def write_synthetic(out_dir: Path, fmt: str = "parquet", train: int = 256, test: int = 32, seed: int = 0,
                    image_size: tuple[int, int] = (56, 112)) -> Path:
    """Both splits of the synthetic dataset under ``out_dir`` in ``fmt`` ("parquet" or "jsonl")."""
    writer = {"parquet": write_parquet, "jsonl": write_jsonl}[fmt]
    for split, n in (("train", train), ("test", test)):
        if n:
            writer(synthetic_records(n, seed, split, image_size), Path(out_dir), split)
    return Path(out_dir)
