"""The training input pipeline (grain): prepared records -> prompt batches of static, bucketed shapes.

``tfds.data_source`` -> seeded shuffle, a new order each epoch -> ``repeat(epochs)`` -> this process's rows of
every global batch of ``data.batch_size`` consecutive records (``rows``; all of them in a single process, so the
order of the records is the same whatever the number of processes) -> ``Preprocess`` (in ``num_workers`` worker
processes when > 0: decode, ``smart_resize`` with ``data.min_pixels`` / ``data.max_pixels``, patchify, prompt
rendering and tokenisation) -> in this process: over-long prompts (and other unusable records) dropped and
counted, the process's prompts gathered and padded to the buckets (``data.buckets.prepare_prompts``: prompt length,
images per prompt, rows per image; 3-D M-RoPE positions) -> ``PromptBatch``. The processes of a job agree on the
buckets, and on stopping when any of them runs out, before every batch (``parallel.host_max``).

``PromptBatches.get_state()`` is a small dict saved with the checkpoint; ``set_state`` resumes exactly after the
last batch returned (same ``num_workers`` required: grain's state depends on it). A final incomplete batch of a
finite run is dropped (static shapes). A dropped record is replaced by the process's next one, so with drops the
batches depend on the number of processes; without, they do not.
"""

from __future__ import annotations

import dataclasses
import io
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from medix_jax import parallel
from medix_jax.data.buckets import Buckets, prepare_prompts, prompt_sizes
from medix_jax.data.image import BadImage, decode_image, image_settings, preprocess_images, smart_resize, to_rgb
from medix_jax.data.prompts import MEDIX_PROMPT, check_template, prompt_ids
from medix_jax.models.qwen_vl.model import ModelInputs
from medix_jax.models.qwen_vl.vision import rows_per_frame


@dataclasses.dataclass(frozen=True)
class DataConfig:
    name: str = "medix_rl"  # tfds dataset name (python -m medix_jax.data.prepare --name)
    data_dir: str | None = None  # tfds data dir; None: the job's embedded synthetic dataset
    split: str = "train"
    batch_size: int = 8  # prompts per batch, over all processes (each is sampled rollout.num_samples times)
    epochs: int | None = None  # None: repeat forever
    shuffle: bool = True
    num_workers: int = 0  # grain worker processes for decoding and tokenising (0: in this process)
    min_pixels: int = 262144  # MediX-R1's setting: docs/reference.md#reference-rl-settings
    max_pixels: int = 4194304
    max_prompt_tokens: int = 4352  # longer prompts are dropped (counted as data_dropped_overlong)
    prompt: str = MEDIX_PROMPT  # the user turn; {question} and <image> are filled in (data/prompts.py)

    def __post_init__(self):
        check_template(self.prompt)
        if self.batch_size < 1 or self.num_workers < 0 or (self.epochs is not None and self.epochs < 1):
            raise ValueError(f"invalid data settings: batch_size {self.batch_size}, num_workers "
                             f"{self.num_workers}, epochs {self.epochs}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"need 0 < min_pixels <= max_pixels, got {self.min_pixels}, {self.max_pixels}")


class PromptBatch(NamedTuple):
    inputs: ModelInputs  # left-padded to the buckets, numpy
    ids: list[str]
    solutions: list[str]  # "<TAG> answer", what the reward pool scores against
    examples: list[dict]  # the unpadded examples (token ids, pixel rows, grids): re-collated for the update step


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class Preprocess:
    """One prepared record -> a tokenised example with pixel rows, or ``{"dropped": reason}`` (picklable).

    The example: ``id``, ``solution`` ("<TAG> answer"), ``completion`` (the record's target completion for supervised
    fine-tuning, as a str; "" when it has none or the dataset predates the field, version 1.0.0), ``input_ids`` (the
    prompt) and, with images, ``pixel_values`` and ``image_grid_thw``."""

    def __init__(self, cfg: DataConfig, model_cfg, tokenizer, max_prompt_tokens: int, max_rows_per_image: int,
                 max_images: int | None = None):
        self.cfg, self.model_cfg, self.tokenizer = cfg, model_cfg, tokenizer
        self.max_prompt_tokens, self.max_rows_per_image = max_prompt_tokens, max_rows_per_image
        self.max_images = max_images

    def __call__(self, record: dict) -> dict:
        vision = self.model_cfg.vision
        factor = vision.patch_size * vision.spatial_merge_size
        try:  # sizes from the headers first: an over-long prompt is dropped before any pixel is decoded
            sizes = [Image.open(io.BytesIO(data)).size for data in record["images"]]
            shapes = [smart_resize(h, w, factor, self.cfg.min_pixels, self.cfg.max_pixels) for w, h in sizes]
        except (OSError, ValueError):
            return {"dropped": "bad_image"}
        image_tokens = [h * w // factor**2 for h, w in shapes]
        try:
            ids = prompt_ids(self.tokenizer, self.cfg.prompt, _text(record["problem"]), image_tokens,
                             self.model_cfg.tokens.image_token_id)
        except ValueError:  # special tokens in the question
            return {"dropped": "special_tokens"}
        if len(ids) > self.max_prompt_tokens:
            return {"dropped": "overlong"}
        if self.max_images is not None and len(shapes) > self.max_images:
            return {"dropped": "image_count"}
        if any(rows_per_frame(vision, h // vision.patch_size, w // vision.patch_size) > self.max_rows_per_image
               for h, w in shapes):
            return {"dropped": "image_rows"}
        example = {"id": _text(record["id"]), "solution": _text(record["solution"]),
                   "completion": _text(record.get("completion", b"")), "input_ids": ids}
        if record["images"]:
            try:
                images = [to_rgb(decode_image(data)) for data in record["images"]]
            except BadImage:
                return {"dropped": "bad_image"}
            example["pixel_values"], example["image_grid_thw"] = preprocess_images(
                images, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels, patch_size=vision.patch_size,
                merge_size=vision.spatial_merge_size, temporal_patch_size=vision.temporal_patch_size,
                **image_settings(self.model_cfg.family))
        return example


def collate(examples: list[dict], model_cfg, buckets: Buckets, at_least=(0, 0, 0)) -> PromptBatch:
    """Right-padded token ids and concatenated pixel rows -> ``prepare_prompts`` (left-padded to the buckets picked
    for these examples, or for ``at_least`` when larger)."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = np.full((len(examples), width), model_cfg.tokens.pad_token_id, np.int32)
    mask = np.zeros((len(examples), width), bool)
    for row, e in enumerate(examples):
        ids[row, : len(e["input_ids"])] = e["input_ids"]
        mask[row, : len(e["input_ids"])] = True
    with_images = [e for e in examples if "pixel_values" in e]
    pixels = np.concatenate([e["pixel_values"] for e in with_images]) if with_images else None
    grids = np.concatenate([e["image_grid_thw"] for e in with_images]) if with_images else None
    inputs = prepare_prompts(model_cfg, ids, mask, pixels, grids, buckets, at_least)
    return PromptBatch(inputs, [e["id"] for e in examples], [e["solution"] for e in examples], examples)


def sizes(examples: list[dict], model_cfg) -> np.ndarray:
    """What ``examples`` need of the buckets (``data.buckets.prompt_sizes``, the maximum over them)."""
    return np.max([prompt_sizes(model_cfg.vision, len(e["input_ids"]), e.get("image_grid_thw"))
                   for e in examples], axis=0)


class BatchRows:
    """Random-access records of this process: ``rows`` (ascending) of every global batch of ``batch_size``
    consecutive records of ``parent`` (picklable, for grain's workers)."""

    def __init__(self, parent, batch_size: int, rows: np.ndarray):
        self.parent, self.batch_size, self.rows = parent, batch_size, rows

    def __len__(self) -> int:
        return len(self.parent) // self.batch_size * len(self.rows)

    def __getitem__(self, index: int):
        batch, row = divmod(index, len(self.rows))
        return self.parent[batch * self.batch_size + int(self.rows[row])]


class PromptBatches:
    """Iterator of ``PromptBatch`` over one split: this process's ``rows`` of every global batch (default: all of
    them; ``parallel.process_rows``); resumable with get/set_state. In a job of several processes every process
    must iterate in step (``__next__`` is a collective)."""

    def __init__(self, source, cfg: DataConfig, model_cfg, tokenizer, buckets: Buckets, seed: int,
                 rows=None):
        import grain

        rows = np.arange(cfg.batch_size) if rows is None else np.asarray(rows, np.int64)
        if not len(rows) or rows[0] < 0 or rows[-1] >= cfg.batch_size or np.any(np.diff(rows) <= 0):
            raise ValueError(f"rows {rows.tolist()} are not ascending rows of a batch of data.batch_size "
                             f"{cfg.batch_size}")
        if len(source) < cfg.batch_size:
            raise ValueError(f"{len(source)} records do not fill one batch of data.batch_size {cfg.batch_size}")
        self.cfg, self.model_cfg, self.buckets, self.rows = cfg, model_cfg, buckets, rows
        max_prompt = min(cfg.max_prompt_tokens, max(buckets.prompt_lengths))
        dataset = grain.MapDataset.source(source)
        if cfg.shuffle:
            dataset = dataset.shuffle(seed=seed)
        dataset = grain.MapDataset.source(BatchRows(dataset.repeat(cfg.epochs), cfg.batch_size, rows)).map(
            Preprocess(cfg, model_cfg, tokenizer, max_prompt, max(buckets.rows_per_image), max(buckets.images)))
        stream = dataset.to_iter_dataset()
        if cfg.num_workers:
            _absl_flags_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.num_workers))
        self._stream = iter(stream)
        self.dropped: Counter = Counter()

    def __iter__(self):
        return self

    def __next__(self) -> PromptBatch:
        examples: list[dict] = []
        try:
            while len(examples) < len(self.rows):
                example = next(self._stream)  # the end of a finite run; its incomplete batch is dropped
                if "dropped" in example:
                    self.dropped[example["dropped"]] += 1
                else:
                    examples.append(example)
        except StopIteration:
            examples = []
        # Every process pads to the same buckets, and all stop together when one has run out.
        need = parallel.host_max([not examples, *(sizes(examples, self.model_cfg) if examples else (0, 0, 0))])
        if need[0]:
            raise StopIteration
        return collate(examples, self.model_cfg, self.buckets, need[1:])

    def get_state(self) -> dict:
        return {"grain": self._stream.get_state(), "dropped": dict(self.dropped), "num_workers": self.cfg.num_workers}

    def set_state(self, state: dict) -> None:
        if state["num_workers"] != self.cfg.num_workers:
            raise ValueError(f"the data state was saved with data.num_workers={state['num_workers']}; resume with "
                             f"the same value (now {self.cfg.num_workers})")
        self._stream.set_state(state["grain"])
        self.dropped = Counter(state["dropped"])

    def close(self) -> None:
        close = getattr(self._stream, "close", None)
        if close:
            close()


def _absl_flags_parsed() -> None:
    """grain's worker processes read absl flags; outside ``absl.app.run`` they must be marked parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


class NotPrepared(FileNotFoundError):
    """A data directory that holds no prepared dataset."""


def check_prepared(data_dir: str | Path | None, name: str = "medix_rl", key: str = "data.data_dir") -> None:
    """``NotPrepared`` (one line: the path and the command that fixes it) unless ``data_dir`` holds a dataset
    written by ``python -m medix_jax.data.prepare`` (``NAME/VERSION/dataset_info.json``)."""
    prepare = "python -m medix_jax.data.prepare --src SOURCE_DIR --data-dir"
    if not data_dir:
        raise NotPrepared(f"{key} is not set: prepare a dataset with {prepare} DIR, then set {key}=DIR")
    path = Path(data_dir)
    if any(path.glob(f"{name}/*/dataset_info.json")):
        return
    if any(path.glob("**/*.parquet")) or any(path.glob("**/*.jsonl")):
        raise NotPrepared(f"{key} {path} holds source files, not a prepared dataset {name!r}: prepare them with "
                          f"python -m medix_jax.data.prepare --src {path} --data-dir DIR, then set {key}=DIR")
    found = sorted(p.parent.name for p in path.glob("*/*/dataset_info.json"))
    raise NotPrepared(f"{key} {path} is not a prepared dataset {name!r} (no {name}/VERSION/dataset_info.json"
                            + (f"; it holds {', '.join(found)}: set data.name" if found else "")
                            + f"): prepare one with {prepare} {path}")


def data_source(cfg: DataConfig):
    """The prepared split as a random-access source (``tfds.data_source``; no TensorFlow)."""
    import tensorflow_datasets as tfds

    check_prepared(cfg.data_dir, cfg.name)
    return tfds.data_source(cfg.name, data_dir=cfg.data_dir, split=cfg.split)
