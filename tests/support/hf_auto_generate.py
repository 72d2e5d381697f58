"""Greedy generation from an export through transformers' Auto classes, as a user of the HF ecosystem loads it:
``AutoProcessor`` (image processor, tokenizer, chat template) and ``AutoModelForImageTextToText``.

Run with the set-up's vLLM environment (``.venv-vllm``): transformers' Qwen2.5-VL processor needs torchvision,
which the main environment cannot carry (PyPI's torchvision is built against a CUDA torch,
docs/reference.md#vllm-on-cpu).
``python tests/support/hf_auto_generate.py HF_DIR OUT.npz NEW_TOKENS``: writes the processor's inputs and the new
tokens.
"""

import sys

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor


def main(hf_dir: str, out: str, new_tokens: int) -> None:
    processor = AutoProcessor.from_pretrained(hf_dir)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 84, 3), np.uint8))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What does it show?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    model = AutoModelForImageTextToText.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    np.savez(out, input_ids=inputs["input_ids"].numpy(), pixel_values=inputs["pixel_values"].numpy(),
             image_grid_thw=inputs["image_grid_thw"].numpy(), tokens=tokens.numpy(),
             processor=type(processor).__name__, image_processor=type(processor.image_processor).__name__)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
