"""A small Qwen2.5-VL-style tokenizer trained locally, for tiny models (tests, the embedded default run).

Byte-level BPE (``tokenizers``) trained on the given texts, with Qwen2.5-VL's special tokens (``<|im_start|>``,
``<|image_pad|>``, ...) and a ChatML chat template that renders image content items as
``<|vision_start|><|image_pad|><|vision_end|>`` like Qwen2.5-VL's own (without its default system turn, to keep
tiny prompts short). The MediX tags (``<thinking>``, ``<answer>``, the modality tags) are single ordinary tokens,
so they decode as text. Real runs use the checkpoint's own tokenizer instead.
"""

from __future__ import annotations

from pathlib import Path

from medix_jax.rewards.rules import MEDIX_MODALITY_TAGS

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>")
WORD_TOKENS = ("<thinking>", "</thinking>", "<answer>", "</answer>", *MEDIX_MODALITY_TAGS)
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(texts, out_dir: str | Path, vocab_size: int = 512):
    """Train, save to ``out_dir`` (``tokenizer.json`` + config + chat template) and return the tokenizer.

    ``len(tokenizer) <= vocab_size``; fewer when the texts do not support that many merges.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(WORD_TOKENS), special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.add_tokens([AddedToken(w, special=False, normalized=False) for w in WORD_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast
