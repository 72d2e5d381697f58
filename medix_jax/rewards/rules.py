"""Rule-based parts of the MediX-R1 reward (docs/reference.md#rewards): answer extraction, format reward, modality
reward.

Expected completion: ``<CT_SCAN><thinking>...</thinking><answer>...</answer>``. Whitespace around ``<``, ``>``
and ``/`` inside tags is ignored (``< / answer >`` is ``</answer>``), as the reference strips it before scoring.

* ``format_reward`` (weight 0.1): from the first ``<thinking>`` on, the text must be exactly
  ``<thinking>T</thinking> <answer>A</answer>``: whitespace is allowed between the two blocks and after
  ``</answer>`` (the reference strips the completion before matching, and a completion often ends in a newline),
  anything else after ``</answer>`` fails. What comes before ``<thinking>`` (the modality tag, leading whitespace)
  is the modality reward's business. Stricter than the reference regex: T and A may not contain thinking/answer
  tags themselves, so repeated or nested blocks fail instead of being swallowed by a non-greedy ``.*?``.
* ``modality_reward`` (weight 0.9 * 0.05): the text before ``<thinking>`` equals the ground-truth tag,
  case-insensitive. With ``after_think`` (``rewards.modality_after_think``, our fix for thinking models, off in the
  reference), a thinking model's leading ``<think>...</think>`` block is skipped first: Qwen3-VL-Thinking writes it
  before the tag (its chat template opens ``<think>`` in the prompt, so the completion may hold only the
  ``</think>``), and the reference's rule then almost never pays it.
* ``extract_answer``: the text of the first complete ``<answer>...</answer>``, stripped; ``None`` when there is
  none. Unlike the reference, answers containing ``:``, ``?`` or ``__`` and one-character answers are kept as they
  are (the reference scores them 0).
* ``parse_solution``: ground truth ``"<TAG> answer"`` -> (tag, answer); malformed ground truth raises at
  data-preparation time instead of silently scoring 0 during training.
"""

from __future__ import annotations

import re

MEDIX_MODALITY_TAGS = (
    "<X_RAY>", "<MICROSCOPY>", "<CLINICAL_PHOTOGRAPHY>", "<CT_SCAN>", "<GRAPHICS>", "<ANGIOGRAPHY>", "<PET_SCAN>",
    "<ULTRASOUND>", "<MRI_SCAN>", "<FUNDUS_PHOTOGRAPHY>", "<OCT_SCAN>", "<ENDOSCOPY>", "<MAMMOGRAPHY>",
    "<FLUOROSCOPY>", "<OTHER>", "<SPECT>",
)

_TAG_SPACE = re.compile(r"<\s*(/?)\s*(thinking|answer)\s*>", re.IGNORECASE)
_NO_BLOCK_TAG = r"(?:(?!</?(?:thinking|answer)>).)*"  # any text that contains no thinking/answer tag
_FORMAT = re.compile(rf"<thinking>{_NO_BLOCK_TAG}</thinking>\s*<answer>{_NO_BLOCK_TAG}</answer>\s*", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_SOLUTION = re.compile(r"\s*(<[A-Za-z_]+>)\s*(.*)", re.DOTALL)


def normalise_tags(text: str) -> str:
    """``< / Answer >`` -> ``</answer>``: whitespace inside thinking/answer tags removed, tag names lower-cased."""
    return _TAG_SPACE.sub(lambda m: f"<{m.group(1)}{m.group(2).lower()}>", text)


def extract_answer(text: str) -> str | None:
    match = _ANSWER.search(normalise_tags(text))
    return match.group(1).strip() if match else None


def format_reward(text: str) -> float:
    text = normalise_tags(text)
    start = text.find("<thinking>")
    if start < 0:
        return 0.0
    return 1.0 if _FORMAT.fullmatch(text, start) else 0.0


def predicted_modality(text: str, after_think: bool = False) -> str | None:
    """The text before the first ``<thinking>`` (whitespace removed), or None when there is no ``<thinking>``;
    ``after_think``: only what follows the last ``</think>`` before it."""
    text = normalise_tags(text)
    start = text.find("<thinking>")
    if start < 0:
        return None
    before = text[:start]
    if after_think:
        before = before.rpartition("</think>")[2]
    return re.sub(r"\s+", "", before)


def modality_reward(text: str, solution: str, tags: tuple[str, ...] = MEDIX_MODALITY_TAGS,
                    after_think: bool = False) -> float:
    truth, _ = parse_solution(solution, tags)
    predicted = predicted_modality(text, after_think)
    return 1.0 if predicted is not None and predicted.upper() == truth.upper() else 0.0


class BadSolution(ValueError):
    """A malformed ground truth; ``reason`` (missing_tag, unknown_tag, empty_answer) is counted by data preparation."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def parse_solution(solution: str, tags: tuple[str, ...] = MEDIX_MODALITY_TAGS) -> tuple[str, str]:
    """``"<CT_SCAN> left lower lobe"`` -> ``("<CT_SCAN>", "left lower lobe")``; ``BadSolution`` when malformed."""
    match = _SOLUTION.fullmatch(solution or "")
    if not match:
        raise BadSolution("missing_tag", f"ground truth {solution[:80]!r} does not start with a modality tag like "
                                         "<CT_SCAN>")
    tag, answer = match.group(1), match.group(2).strip()
    known = {t.upper() for t in tags}
    if tag.upper() not in known:
        raise BadSolution("unknown_tag", f"ground truth modality tag {tag} is not one of the configured tags")
    if not answer:
        raise BadSolution("empty_answer", f"ground truth {solution[:80]!r} has an empty answer")
    return tag.upper(), answer
