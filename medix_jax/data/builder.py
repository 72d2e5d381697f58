"""The tensorflow-datasets builder for MediX-style RL data, written as ArrayRecord (random access, no TensorFlow).

One record per example: the raw fields of ``MBZUAI/medix-rl-data`` (docs/reference.md#training-data) -- ``id``,
``images`` (the encoded image files, byte for byte as in the source), ``source``, ``problem``, ``solution`` -- plus the
parsed ``modality`` tag and ``answer``, and ``completion``: a target completion for supervised fine-tuning taken from
the source (e.g. a reasoning trace ``<TAG><thinking>...</thinking><answer>...</answer>``), "" where it has none. The
builder only writes what it is given: reading and validating the source is ``prepare.py``'s job. tfds writes each split
into a temporary directory and renames it when the whole dataset is done, so a failed preparation leaves nothing that
looks finished. Read back with ``tfds.data_source(name, data_dir=..., split=...)`` (text fields come back as UTF-8
``bytes``).

Versions: 1.0.0 had no ``completion``; 1.1.0 added it. A reader takes the features stored with the dataset
(``dataset_info.json``), so a 1.0.0 copy still reads -- its records just lack the key (the pipeline reads it as "").
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterable

import numpy as np
import tensorflow_datasets as tfds

VERSION = "1.1.0"  # 1.1.0: + completion
TEXT_FIELDS = ("id", "source", "problem", "solution", "modality", "answer", "completion")


# tfds ships no type information: mypy checks the keyword against object.__init_subclass__, not tfds's own.
class MedixRL(tfds.core.GeneratorBasedBuilder, skip_registration=True):  # type: ignore[call-arg]
    """``splits`` maps a split name to a function returning that split's validated records (called once)."""

    name = "medix_rl"
    VERSION = tfds.core.Version(VERSION)
    text_fields = TEXT_FIELDS  # a subclass may store fewer (tests write a 1.0.0-layout copy this way)

    def __init__(self, *, splits: dict[str, Callable[[], Iterable[dict]]] | None = None, **kwargs):
        self._splits = splits or {}
        super().__init__(file_format="array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MediX-style medical RL data: image(s), question, '<TAG> answer' ground truth, optional "
                        "target completion.",
            features=tfds.features.FeaturesDict({
                "images": tfds.features.Sequence(tfds.features.Scalar(dtype=np.object_)),  # encoded, unchanged
                **{name: tfds.features.Text() for name in self.text_fields},
            }),
            disable_shuffling=True,  # records keep the source order; grain shuffles at read time
        )

    def _log_download_bytes(self) -> None:  # in place of tfds' "Downloading and preparing dataset..." banner
        print(f"prepare: writing {self.name} {self.version} to {self.data_dir}", flush=True)

    def _log_download_done(self) -> None:  # the caller reports what was written
        pass

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(records) for split, records in self._splits.items()}

    def _generate_examples(self, records: Callable[[], Iterable[dict]]):
        for record in records():
            yield record["id"], record


def builder(name: str, data_dir: str, splits=None) -> MedixRL:
    """A ``MedixRL`` writing under ``data_dir/name/VERSION`` (``name`` other than medix_rl: a renamed subclass)."""
    cls = MedixRL if name == MedixRL.name else types.new_class(
        "MedixRLNamed", (MedixRL,), {"skip_registration": True}, lambda ns: ns.update(name=name))
    return cls(splits=splits, data_dir=data_dir)
