"""Rule rewards: format, modality, answer extraction, ground-truth parsing (fast and exact)."""

import pytest

from medix_jax.rewards.rules import extract_answer, format_reward, modality_reward, parse_solution, predicted_modality

GOOD = "<CT_SCAN><thinking>The lesion is hypodense.</thinking><answer>Hepatic cyst</answer>"


@pytest.mark.parametrize(
    "text,expected",
    [
        (GOOD, 1.0),
        ("<CT_SCAN>\n<thinking>a</thinking>\n\n<answer>b</answer>", 1.0),  # whitespace between blocks
        ("<CT_SCAN>< thinking >a</ thinking ><answer >b< / answer>", 1.0),  # whitespace inside tags
        ("<thinking>a</thinking><answer>b</answer>", 1.0),  # modality missing is the modality reward's business
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer> trailing", 0.0),  # text after </answer>
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer>\n", 1.0),  # trailing whitespace: the reference strips
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer> \t\r\n\n", 1.0),
        ("\n  <CT_SCAN>\n<thinking>a</thinking><answer>b</answer>\n", 1.0),  # leading whitespace too
        ("  <thinking>a</thinking><answer>b</answer>", 1.0),
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer>\n.", 0.0),  # anything but whitespace after </answer>
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer>\n<|im_end|>", 0.0),
        ("<CT_SCAN><thinking>a</thinking>", 0.0),  # no answer
        ("<CT_SCAN><answer>b</answer>", 0.0),  # no thinking
        ("<CT_SCAN><thinking>a<answer>b</answer>", 0.0),  # thinking never closed
        ("<CT_SCAN><thinking>a</thinking><answer>b</answer><answer>c</answer>", 0.0),  # repeated answer
        ("<CT_SCAN><thinking>a<thinking>x</thinking></thinking><answer>b</answer>", 0.0),  # nested thinking
        ("<CT_SCAN><thinking>a</thinking>x<answer>b</answer>", 0.0),  # text between blocks
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
        ("<answer>  A  </answer>", "A"),  # one character kept
        ("<answer>Is it: malignant?</answer>", "Is it: malignant?"),  # ':' and '?' kept
        ("<answer>first</answer><answer>second</answer>", "first"),
        ("< answer >x</ answer>", "x"),
        ("<answer>multi\nline</answer>", "multi\nline"),
        ("<answer>never closed", None),
        ("no tags", None),
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
        ("<MRI_SCAN><thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 0.0),
        ("<CT_SCAN> because<thinking>a</thinking><answer>b</answer>", "<CT_SCAN> x", 0.0),  # extra text
        ("<CT_SCAN><answer>b</answer>", "<CT_SCAN> x", 0.0),  # no <thinking>: no modality position
    ],
)
def test_modality_reward(text, solution, expected):
    assert modality_reward(text, solution) == expected


def test_parse_solution():
    assert parse_solution("<X_RAY> pneumothorax, left") == ("<X_RAY>", "pneumothorax, left")
    assert parse_solution("  <x_ray>\nA") == ("<X_RAY>", "A")
    for bad, message in [("pneumothorax", "does not start with a modality tag"), ("<XRAY> a", "not one of"),
                         ("<X_RAY>   ", "empty answer"), ("", "does not start")]:
        with pytest.raises(ValueError, match=message):
            parse_solution(bad)
    assert parse_solution("<CUSTOM> a", tags=("<CUSTOM>",)) == ("<CUSTOM>", "a")


@pytest.mark.timeout(120)  # a regex with catastrophic backtracking would hang here
def test_one_megabyte_completions():
    big = "<CT_SCAN><thinking>" + "reasoning " * 100_000 + "</thinking><answer>" + "a" * 10_000 + "</answer>"
    bad = big + " trailing"
    assert format_reward(big) == 1.0 and format_reward(bad) == 0.0
    assert format_reward(big + " " * 100_000) == 1.0 and format_reward(big + " " * 100_000 + "x") == 0.0
    assert extract_answer(big) == "a" * 10_000 and predicted_modality(big) == "<CT_SCAN>"


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
