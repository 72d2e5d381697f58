"""Policy prompts: the MediX format prompt rendered through the tokenizer's chat template, image tokens expanded.

The template (config ``data.prompt``, default ``MEDIX_PROMPT``, docs/reference.md#policy-prompt) is the whole **user**
turn; no system message is passed (a chat template may still add its own default, as Qwen2.5-VL's does). ``{question}``
is replaced by the record's problem (trimmed), and ``<image>`` marks where the images go: the turn becomes the chat
content list ``[text, image, ..., image, text]``, so the template writes its own vision markers there
(``<|vision_start|><|image_pad|><|vision_end|>``). Each image's single ``<|image_pad|>`` is then expanded to
``t * h * w / merge**2`` copies for its ``grid_thw``, as transformers' Qwen2.5-VL processor does.
"""

from __future__ import annotations

import numpy as np

from medix_jax.models.qwen_vl.config import TokenIds, end_tokens

MEDIX_PROMPT = (
    "You are a Medical AI Assistant with advanced reasoning capabilities\n"
    "Your task:\n"
    "1. First output the image modality tag from this set:\n"
    "   <X_RAY>, <MICROSCOPY>, <CLINICAL_PHOTOGRAPHY>, <CT_SCAN>, <GRAPHICS>, \n"
    "   <ANGIOGRAPHY>, <PET_SCAN>, <ULTRASOUND>, <MRI_SCAN>, <FUNDUS_PHOTOGRAPHY>, \n"
    "   <OCT_SCAN>, <ENDOSCOPY>, <MAMMOGRAPHY>, <FLUOROSCOPY>, <OTHER>, <SPECT>\n"
    "   (Only output the tag, nothing else.)\n"
    "2. Then output the thinking and medical reasoning process in <thinking>...</thinking>tags.\n"
    "3. Finally, provide the correct answer inside <answer>...</answer> tags.\n"
    "4. Do not include any extra information or text outside of these tags.\n"
    "Question: \n"
    "<image>{question}"
)  # three lines end in a space, as the reference's template's do (docs/reference.md#policy-prompt)
IMAGE_MARKER = "<image>"
QUESTION_FIELD = "{question}"


def check_template(template: str) -> None:
    if QUESTION_FIELD not in template:
        raise ValueError(f"the prompt template has no {QUESTION_FIELD} field")
    if template.count(IMAGE_MARKER) > 1:
        raise ValueError(f"the prompt template has more than one {IMAGE_MARKER} marker")


def user_content(template: str, question: str, num_images: int) -> list[dict]:
    """The user turn as chat content: the template's text with ``num_images`` image items at ``<image>``. The
    question goes in trimmed of surrounding whitespace, as the reference's template inserts it (``| trim``)."""
    question = question.strip()
    before, marker, after = template.partition(IMAGE_MARKER)
    if not marker:  # no marker: images first, as Qwen2.5-VL's examples put them
        before, after = "", template
    parts = [{"type": "text", "text": before.replace(QUESTION_FIELD, question)}]
    parts += [{"type": "image"}] * num_images
    parts += [{"type": "text", "text": after.replace(QUESTION_FIELD, question)}]
    return [p for p in parts if p["type"] == "image" or p["text"]]


def prompt_ids(tokenizer, template: str, question: str, image_tokens: list[int], image_token_id: int) -> np.ndarray:
    """Token ids of the rendered prompt (generation prompt included); ``image_tokens[i]`` placeholders for image i."""
    specials = [t for t in tokenizer.all_special_tokens + [str(t) for t in tokenizer.added_tokens_decoder.values()
                                                          if t.special] if t and t in question]
    if specials:  # they would be read back as control tokens: a question must not open a turn or an image
        raise ValueError(f"the question contains special token(s) {sorted(set(specials))}")
    messages = [{"role": "user", "content": user_content(template, question, len(image_tokens))}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pad = tokenizer.convert_ids_to_tokens(image_token_id)
    pieces = text.split(pad)
    if len(pieces) - 1 != len(image_tokens):
        raise ValueError(f"the chat template wrote {len(pieces) - 1} {pad} placeholders for {len(image_tokens)} "
                         "images")
    expanded = pieces[0] + "".join(pad * n + piece for n, piece in zip(image_tokens, pieces[1:], strict=True))
    return np.asarray(tokenizer(expanded, add_special_tokens=False)["input_ids"], np.int32)


def token_ids(tokenizer, checkpoint_dir=None) -> TokenIds:
    """The model's special token ids, read from its tokenizer (Qwen2.5-VL names); never hard-coded. Generation
    ends at ``<|im_end|>``, ``<|endoftext|>`` and whatever else ``checkpoint_dir``'s ``generation_config.json``
    declares."""
    def get(token: str) -> int:
        index = tokenizer.convert_tokens_to_ids(token)
        if index is None or index == tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer has no {token} token")
        return int(index)

    end_of_text = get("<|endoftext|>")
    declared = end_tokens(checkpoint_dir) if checkpoint_dir else []
    return TokenIds(
        image_token_id=get("<|image_pad|>"), video_token_id=get("<|video_pad|>"),
        vision_start_token_id=get("<|vision_start|>"), vision_end_token_id=get("<|vision_end|>"),
        bos_token_id=end_of_text if tokenizer.bos_token_id is None else int(tokenizer.bos_token_id),
        eos_token_id=get("<|im_end|>"),
        stop_token_ids=tuple(dict.fromkeys([end_of_text, *declared])),
        pad_token_id=end_of_text if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id),
    )
