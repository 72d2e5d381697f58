"""Rule rewards: format, modality, answer extraction, ground-truth parsing -- equal to the reference's rules, but for
our named fixes (rules.RuleOptions), shown case by case and on 20,000 fuzzed completions."""

import dataclasses
import random
import re

import pytest

from medix_jax.rewards.rules import (
    REFERENCE_RULES,
    RuleOptions,
    despace,
    extract_answer,
    format_reward,
    modality_reward,
    parse_solution,
    predicted_modality,
    score_rules,
)

GOOD = "<CT_SCAN><thinking>The lesion is hypodense.</thinking><answer>Hepatic cyst</answer>"


@pytest.mark.parametrize(
    "text,expected",
    [
        (GOOD, 1.0),
        ("<CT_SCAN>\n<thinking>a</thinking>\n\n<answer>b</answer>", 1.0),  # whitespace between blocks
        ("<CT_SCAN>< thinking >a</ thinking ><answer >b< / answer>", 1.0),  # whitespace inside tags
        ("<thinking>a</thinking><answer>b</answer>", 1.0),  # modality missing is the modality reward's business
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer> trailing", 0.0),  # text after </answer>
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer> \t\r\n\n", 1.0),  # trailing whitespace is stripped
        ("\n  <CT_SCAN>\n<thinking>a</thinking><answer>b</answer>\n", 1.0),  # leading whitespace too
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer>\n<|im_end|>", 0.0),
        ("<CT_SCAN><thinking>a</thinking>", 0.0),  # no answer
        ("<CT_SCAN><answer>b</answer>", 0.0),  # no thinking
        ("<CT_SCAN><THINKING>a</THINKING><Answer>b</Answer>", 0.0),  # tags are case-sensitive
        ("<CT_SCAN><thinking>a</thinking>x<answer>b</answer>", 0.0),  # text between blocks
        # The reference's non-greedy blocks swallow repeated and nested tags: these pass, as there.
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer><answer>c</answer>", 1.0),
        ("<CT_SCAN><thinking>a<thinking>x</thinking></thinking><answer>b</answer>", 1.0),
        ("plain text", 0.0),
        ("", 0.0),
        ("<CT_SCAN><thinking>出血 — ü</thinking><answer>Ödem: ja? __</answer>", 1.0),  # unicode, ':' '?' '__'
    ],
)
def test_format_reward(text, expected):
    assert format_reward(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        (GOOD, "Hepatic cyst"),
        ("<answer>  A.  </answer>", "A"),  # stripped, then full stops stripped
        ("<answer>...cyst...</answer>", "cyst"),
        ("<answer>first</answer><answer>second</answer>", "first"),
        ("< answer >x</ answer>", "x"),
        ("<answer>left / right</answer>", "left/right"),  # whitespace around '/' goes everywhere
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("<answer>never closed", "<answer>never closed"),  # no block: the whole completion
        ("  no tags. ", "no tags"),
        ("<Answer>x</Answer>", "<Answer>x</Answer>"),  # not a tag (case-sensitive)
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    "text,solution,expected",
    [
        (GOOD, "<CT_SCAN> Hepatic cyst", 1.0),
        ("<ct_scan><thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 1.0),  # case-insensitive
        (" <CT_SCAN> \n<thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 1.0),
        ("< CT_SCAN ><thinking>a</thinking>", "<CT_SCAN> x", 1.0),  # whitespace around '<' and '>' goes
        ("<CT _SCAN><thinking>a</thinking>", "<CT_SCAN> x", 0.0),  # ... and no other
        ("<MRI_SCAN><thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 0.0),
        ("<CT_SCAN> because<thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 0.0),  # extra text
        ("<CT_SCAN><answer>b</answer>", "<CT_SCAN> x", 0.0),  # no <thinking>: no modality position
        ("<CT_SCAN><Thinking>a</Thinking>", "<CT_SCAN> x", 0.0),
    ],
)
def test_modality_reward(text, solution, expected):
    assert modality_reward(text, solution) == expected


@pytest.mark.parametrize("answer,reference,ours", [
    ("cyst", None, None), ("Hepatic cyst", 1.0, 1.0), ("Hepatic cyst.", 1.0, 1.0), ("hepatic cyst", None, None),
    ("A", 0.0, None), ("Is it: a cyst?", 0.0, None), ("cyst__", 0.0, None), ("", 0.0, 0.0), ("...", 0.0, 0.0),
])
def test_the_accuracy_rewards_are_settled_by_the_rules_or_asked(answer, reference, ours):
    """0: not gradable; 1: exact; None: the judge and the embedding model score it. One-character and junk-symbol
    answers are the reference's 0 and our fix's question."""
    completion = f"<CT_SCAN><thinking>t</thinking><answer>{answer}</answer>"
    assert score_rules(completion, "<CT_SCAN> Hepatic cyst.", REFERENCE_RULES).accuracy == reference
    assert score_rules(completion, "<CT_SCAN> Hepatic cyst.").accuracy == ours


def test_parse_solution():
    assert parse_solution("<X_RAY> pneumothorax, left") == ("<X_RAY>", "pneumothorax, left")
    assert parse_solution("  <x_ray>\nA") == ("<X_RAY>", "A")
    for bad, message in [("pneumothorax", "does not start with a modality tag"), ("<XRAY> a", "not one of"),
                         ("<X_RAY>   ", "empty answer"), ("", "does not start")]:
        with pytest.raises(ValueError, match=message):
            parse_solution(bad)
    assert parse_solution("<CUSTOM> a", tags=("<CUSTOM>",)) == ("<CUSTOM>", "a")


@pytest.mark.timeout(120)  # a regex with quadratic or catastrophic backtracking would hang here
def test_one_megabyte_completions():
    big = "<CT_SCAN><thinking>" + "reasoning " * 100_000 + "</thinking><answer>" + "a" * 10_000 + "</answer>"
    bad = big + " trailing"
    assert format_reward(big) == 1.0 and format_reward(bad) == 0.0
    # The reference's whitespace pattern takes quadratic time on a long run of spaces (seconds at 20k); ours not.
    assert format_reward(big + " " * 100_000) == 1.0 and format_reward(big + " " * 100_000 + "x") == 0.0
    assert extract_answer(big) == "a" * 10_000 and predicted_modality(big) == "<CT_SCAN>"
    assert despace("x" + " " * 1_000_000 + "y") == "x" + " " * 1_000_000 + "y"


@pytest.mark.parametrize("completion", [
    "<think>Looks like a chest film.</think>\n<X_RAY><thinking>opacity</thinking><answer>pneumonia</answer>",
    "Looks like a chest film.\n</think>\n\n<X_RAY><thinking>opacity</thinking><answer>pneumonia</answer>",
], ids=["whole-think-block", "think-opened-by-the-prompt"])
def test_a_thinking_models_tag_after_its_think_block_pays_only_with_our_fix(completion):
    """Qwen3-VL-Thinking writes <think>...</think> before the tag (or only </think>, its chat template opening
    <think> in the prompt). The reference's rule reads everything before <thinking> and pays 0;
    ``after_think`` reads after the last </think>."""
    assert modality_reward(completion, "<X_RAY> pneumonia") == 0.0  # the reference's setting
    assert modality_reward(completion, "<X_RAY> pneumonia", after_think=True) == 1.0
    assert modality_reward(completion, "<CT_SCAN> pneumonia", after_think=True) == 0.0
    plain = "<X_RAY><thinking>opacity</thinking><answer>pneumonia</answer>"
    assert modality_reward(plain, "<X_RAY> a") == modality_reward(plain, "<X_RAY> a", after_think=True) == 1.0


# ---- The fuzz: our rules against a re-implementation of the reference's, written from its description in
# docs/reference.md#rewards (MediX-R1 training/examples/reward_function/medical.py).

def reference_rules(response: str, ground_truth: str):
    """(format, modality, accuracy) as the reference scores them; accuracy is 0, 1 or ("ask", answer, truth) --
    what it would hand the judge and the embedding model."""
    text = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    start = text.find("<thinking>")
    fmt = modality = 0.0
    if start != -1:
        whole = re.fullmatch(r"<thinking>.*?</thinking>\s*<answer>.*?</answer>", text[start:].strip(), re.DOTALL)
        fmt = 1.0 if whole else 0.0
        modality = 1.0 if text[:start].strip().upper() == (ground_truth.split(">", 1)[0] + ">").upper() else 0.0
    block = re.search(r"<answer>(.*?)</answer>", text, re.DOTALL)
    answer = (block.group(1).strip() if block else text.strip()).strip(".")
    truth = ground_truth.split(">", 1)[1].strip().strip(".")
    if len(answer) < 2 or "__" in answer or ":" in answer or "?" in answer:
        return fmt, modality, 0.0
    return fmt, modality, 1.0 if answer == truth else ("ask", answer, truth)


def ours(response: str, ground_truth: str, options: RuleOptions):
    r = score_rules(response, ground_truth, options)
    return r.format, r.modality, ("ask", r.answer, r.truth) if r.accuracy is None else r.accuracy


TAGS = ["<CT_SCAN>", "<X_RAY>", "<MRI_SCAN>"]
ANSWERS = ["hepatic cyst", "left / right lobe", "a > b", "pneumonia.", "B", "4", "T2: high", "why?", "x__y", "...",
           "", " ", "Ödem", "1.5 cm", "<b>cyst</b>"]
WORDS = ["the", "lesion", "is", ".", "/", " / ", "<", ">", " < ", ":", "?", "__", "\n", "  ", "\t", "ü", "cm",
         "<br>", "</", "a/b", "YES"]


def piece(rng: random.Random, name: str) -> str:
    """One tag, cased and spaced at random (``<thinking>``, ``< / Answer >``, ``<THINKING >``, ...)."""
    closing = rng.random() < 0.5
    case = rng.choice([str.lower, str.lower, str.lower, str.upper, str.capitalize])
    sp = lambda: rng.choice(["", "", "", " ", "\n", "  "])  # noqa: E731
    return f"<{sp()}{'/' + sp() if closing else ''}{case(name)}{sp()}>"


def fuzz_case(rng: random.Random) -> tuple[str, str]:
    truth_tag, truth = rng.choice(TAGS), rng.choice([a for a in ANSWERS if a.strip(" .")])
    solution = f"{truth_tag} {truth}"
    words = lambda k: "".join(rng.choice(WORDS + [" "] * 6) for _ in range(rng.randint(0, k)))  # noqa: E731
    sp = lambda: rng.choice(["", "", " ", "\n", " \n "])  # noqa: E731
    answer = rng.choice(ANSWERS + [truth, truth, truth + ".", f" {truth} ", truth.upper(), words(4)])

    def tag(name, closing):
        if rng.random() < 0.8:
            return f"</{name}>" if closing else f"<{name}>"
        t = piece(rng, name)
        return t.replace("/", "") if not closing and "/" in t and rng.random() < 0.5 else t

    parts = [rng.choice(["", "", "<think>hm</think>", "</think>", words(3)]),
             rng.choice([truth_tag, rng.choice(TAGS), truth_tag.lower(), f"< {truth_tag[1:-1]} >", "", words(2)]),
             sp(), tag("thinking", False), words(12), tag("thinking", True), sp(), rng.choice(["", "", words(2)]),
             tag("answer", False), answer, tag("answer", True), sp(),
             rng.choice(["", "", "", "\n", " x", "<answer>again</answer>", "<|im_end|>", "."])]
    for _ in range(rng.choice([0, 0, 0, 1, 2])):  # drop or repeat a part now and then
        i = rng.randrange(len(parts))
        parts[i] = "" if rng.random() < 0.6 else parts[i] * 2
    return "".join(parts), solution


@pytest.fixture(scope="module")
def fuzzed():
    rng = random.Random(31)
    return [fuzz_case(rng) for _ in range(20_000)]


def test_the_reference_setting_agrees_with_the_reference_on_20000_fuzzed_completions(fuzzed):
    disagree = [(c, s) for c, s in fuzzed if ours(c, s, REFERENCE_RULES) != reference_rules(c, s)]
    assert disagree == []
    # The fuzz reaches every branch: each score, an answer judged on the whole completion, one-character and
    # junk-symbol answers.
    scored = [reference_rules(c, s) for c, s in fuzzed]
    assert {f for f, _, _ in scored} == {0.0, 1.0} and {m for _, m, _ in scored} == {0.0, 1.0}
    accuracy = [a for _, _, a in scored]
    assert accuracy.count(0.0) > 1000 and accuracy.count(1.0) > 1000 and len(accuracy) - accuracy.count(0.0) - \
        accuracy.count(1.0) > 1000
    assert sum("<answer>" not in despace(c) for c, _ in fuzzed) > 1000


def test_at_the_defaults_only_the_named_fixes_differ_from_the_reference(fuzzed):
    """Each completion whose scores differ at the defaults has an answer that a named fix keeps, and agrees again
    with that fix at the reference's setting."""
    defaults, counts = RuleOptions(), {"keep_short_answers": 0, "keep_symbol_answers": 0}
    for c, s in fuzzed:
        if ours(c, s, defaults) == reference_rules(c, s):
            continue
        answer = score_rules(c, s).answer
        fix = "keep_short_answers" if len(answer) == 1 else "keep_symbol_answers"
        assert fix != "keep_symbol_answers" or any(x in answer for x in ("__", ":", "?")), (c, s)
        counts[fix] += 1
        assert ours(c, s, dataclasses.replace(defaults, **{fix: False})) == reference_rules(c, s), (c, s)
    assert counts["keep_short_answers"] > 100 and counts["keep_symbol_answers"] > 100


def test_modality_after_think_differs_only_where_a_think_block_comes_first(fuzzed):
    fixed = RuleOptions(modality_after_think=True)
    differ = [(c, s) for c, s in fuzzed if ours(c, s, fixed)[1] != ours(c, s, RuleOptions())[1]]
    assert len(differ) > 100 and all("</think>" in despace(c).split("<thinking>")[0] for c, _ in differ)
