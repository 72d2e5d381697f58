"""Rule-based parts of the MediX-R1 reward (docs/reference.md#rewards): the reference's steps, in its order, with
our fixes of its defects as named options (``RuleOptions``; ``REFERENCE_RULES`` reproduces it exactly).

Expected completion: ``<CT_SCAN><thinking>...</thinking><answer>...</answer>``; ground truth ``"<CT_SCAN> answer"``.

1. ``despace``: whitespace around every ``<``, ``>`` and ``/`` is removed in the whole completion (``< / answer >``
   is ``</answer>``, ``left / right`` is ``left/right``). Tags are case-sensitive: ``<Answer>`` is not a tag.
2. ``format_reward`` (weight 0.1): from the first ``<thinking>`` on, stripped, the text must fully match
   ``<thinking>.*?</thinking>\\s*<answer>.*?</answer>`` (``.`` matching newlines). Anything after ``</answer>``
   fails; what precedes ``<thinking>`` is the modality reward's business; no ``<thinking>`` scores 0.
3. ``modality_reward`` (weight 0.9 * 0.05): the text before the first ``<thinking>``, stripped, equals the ground
   truth's tag, case-insensitive. ``modality_after_think`` (our fix for thinking models, off in the reference)
   first drops what precedes the last ``</think>``: Qwen3-VL-Thinking writes ``<think>...</think>`` before the tag
   (its chat template opens ``<think>`` in the prompt, so the completion may hold only ``</think>``).
4. ``extract_answer``: the first ``<answer>...</answer>``'s text, stripped, or the **whole completion**, stripped,
   when there is none; then full stops are stripped from both ends. The ground truth's answer (``truth_answer``)
   is what follows its tag, stripped, then stripped of full stops.
5. ``gradable``: an empty answer scores 0 on both accuracy rewards. The reference also scores 0 an answer of one
   character and one containing ``__``, ``:`` or ``?``; ours keeps them (``keep_short_answers``,
   ``keep_symbol_answers``).
6. An answer equal to the ground truth's (exactly, after the steps above) scores 1 on both accuracy rewards without
   asking the judge or the embedding model; any other gradable answer is theirs to score (``RuleScores.accuracy``
   None).

``parse_solution`` checks a ground truth at data-preparation time (``"<TAG> answer"``, a known tag, an answer), so a
malformed one is refused there instead of silently scoring 0 during training.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

MEDIX_MODALITY_TAGS = (
    "<X_RAY>", "<MICROSCOPY>", "<CLINICAL_PHOTOGRAPHY>", "<CT_SCAN>", "<GRAPHICS>", "<ANGIOGRAPHY>", "<PET_SCAN>",
    "<ULTRASOUND>", "<MRI_SCAN>", "<FUNDUS_PHOTOGRAPHY>", "<OCT_SCAN>", "<ENDOSCOPY>", "<MAMMOGRAPHY>",
    "<FLUOROSCOPY>", "<OTHER>", "<SPECT>",
)
JUNK_SYMBOLS = ("__", ":", "?")  # an answer containing one is "garbage" to the reference

# The reference's ``\s*([</>])\s*`` -> ``\1``, written so that a long run of whitespace costs linear time, not
# quadratic: a run is only tried from its first character.
_AROUND_MARKS = re.compile(r"(?<!\s)\s+(?=[</>])|(?<=[</>])\s+")
_FORMAT = re.compile(r"<thinking>.*?</thinking>\s*<answer>.*?</answer>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_TAG_SPACE = re.compile(r"<\s*(/?)\s*(thinking|answer)\s*>", re.IGNORECASE)
_SOLUTION = re.compile(r"\s*(<[A-Za-z_]+>)\s*(.*)", re.DOTALL)


@dataclasses.dataclass(frozen=True)
class RuleOptions:
    """Our departures from the reference's rules (docs/reference.md#reference-defects-we-do-not-copy); the
    ``REFERENCE_RULES`` setting of each reproduces it."""

    keep_short_answers: bool = True  # reference: a one-character answer ("A", "5") scores 0 on both accuracy rewards
    keep_symbol_answers: bool = True  # reference: an answer containing "__", ":" or "?" scores 0 on both
    modality_after_think: bool = False  # ours: the tag is read after a leading <think>...</think> (step 3)


REFERENCE_RULES = RuleOptions(keep_short_answers=False, keep_symbol_answers=False, modality_after_think=False)


class RuleScores(NamedTuple):
    format: float
    modality: float
    answer: str  # the predicted answer (step 4)
    truth: str  # the ground truth's answer (step 4)
    accuracy: float | None  # 0 (not gradable) or 1 (exact match) for both accuracy rewards; None: judge and embed it


def despace(text: str) -> str:
    """Step 1: whitespace around every ``<``, ``>`` and ``/`` removed, in the whole text."""
    return _AROUND_MARKS.sub("", text)


def format_reward(completion: str) -> float:
    text = despace(completion)
    start = text.find("<thinking>")
    return 1.0 if start >= 0 and _FORMAT.fullmatch(text[start:].strip()) else 0.0


def predicted_modality(completion: str, after_think: bool = False) -> str | None:
    """The text before the first ``<thinking>``, stripped (``after_think``: only what follows the last ``</think>``
    before it); None when there is no ``<thinking>``."""
    text = despace(completion)
    start = text.find("<thinking>")
    if start < 0:
        return None
    before = text[:start]
    return (before.rpartition("</think>")[2] if after_think else before).strip()


def modality_reward(completion: str, solution: str, tags: tuple[str, ...] = MEDIX_MODALITY_TAGS,
                    after_think: bool = False) -> float:
    truth, _ = parse_solution(solution, tags)
    predicted = predicted_modality(completion, after_think)
    return 1.0 if predicted is not None and predicted.upper() == truth.upper() else 0.0


def answer_block(completion: str) -> str | None:
    """The first ``<answer>...</answer>``'s text, stripped, or None (step 4 before its fallback)."""
    match = _ANSWER.search(despace(completion))
    return match.group(1).strip() if match else None


def extract_answer(completion: str) -> str:
    """Step 4: the answer block's text, or the whole completion, stripped; then full stops stripped."""
    block = answer_block(completion)
    return (despace(completion).strip() if block is None else block).strip(".")


def truth_answer(solution: str, tags: tuple[str, ...] = MEDIX_MODALITY_TAGS) -> str:
    """Step 4 for the ground truth: what follows its tag, stripped, then stripped of full stops."""
    return parse_solution(solution, tags)[1].strip(".")


def gradable(answer: str, options: RuleOptions = RuleOptions()) -> bool:
    """Step 5: whether the accuracy rewards score ``answer`` at all (else it scores 0)."""
    if not answer or (len(answer) == 1 and not options.keep_short_answers):
        return False
    return options.keep_symbol_answers or not any(symbol in answer for symbol in JUNK_SYMBOLS)


def score_rules(completion: str, solution: str, options: RuleOptions = RuleOptions(),
                tags: tuple[str, ...] = MEDIX_MODALITY_TAGS) -> RuleScores:
    """Steps 1-6 for one completion."""
    answer, truth = extract_answer(completion), truth_answer(solution, tags)
    accuracy = None if gradable(answer, options) else 0.0
    if accuracy is None and answer == truth:
        accuracy = 1.0
    return RuleScores(format_reward(completion), modality_reward(completion, solution, tags,
                                                                 options.modality_after_think),
                      answer, truth, accuracy)


def normalise_tags(text: str) -> str:
    """``< / Answer >`` -> ``</answer>``: whitespace inside thinking/answer tags removed, tag names lower-cased. The
    evaluation's lenient reading of a generation (evaluate/scoring.py); the rewards follow the reference (step 1)."""
    return _TAG_SPACE.sub(lambda m: f"<{m.group(1)}{m.group(2).lower()}>", text)


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
