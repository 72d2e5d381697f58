"""python -m medix_jax.export: a trained tiny checkpoint -> an HF directory that transformers loads, logits equal."""

import numpy as np
import torch
from safetensors.numpy import load_file
from safetensors.torch import load_file as torch_load_file
from transformers import AutoTokenizer

from medix_jax.export import export, main, resolve


def test_export_loads_in_transformers_and_verifies(trained_run, tmp_path):
    out, delta = export(trained_run, tmp_path / "hf", check=True)
    assert delta is not None and delta <= 1e-4
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
        p.name for p in out.iterdir()}
    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "<CT_SCAN><thinking>round</thinking><answer>circle</answer>"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_steps_and_cli_errors(trained_run, tmp_path, capsys):
    assert resolve(trained_run) == (trained_run, 2)
    assert resolve(trained_run / "1") == (trained_run, 1)
    assert resolve(trained_run / "checkpoints" / "1") == (trained_run, 1)
    numbered = tmp_path / "42"
    (numbered / "checkpoints" / "7").mkdir(parents=True)
    assert resolve(numbered) == (numbered, 7)  # a run directory named by a number is still a run directory
    one, _ = export(trained_run / "1", tmp_path / "one")
    two, _ = export(trained_run, tmp_path / "two")
    half, _ = export(trained_run, tmp_path / "half", dtype="bfloat16")
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)  # step 1 != step 2
    c = torch_load_file(half / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in c.values())
    assert main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoints" in capsys.readouterr().err
