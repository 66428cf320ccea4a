"""Token-id batches for the PPM trainer and the guide-layer sweep: answers, left padding, the PPM's text.

    answer_ids      an answer's ids as it continues the assistant prompt, then the end-of-answer token
    pad_left        rows of ids -> input_ids, attention_mask [B, L], left-padded like the prompt processor
    pad_answered    prompt + answer rows, left-padded, and each row's answer length
    prompt_text     what the PPM reads of the prompts: text_embeds [B, T, D], text_mask [B, T]
"""

from __future__ import annotations

import torch

from covipal.generation import eos_token_ids, pad_token_id
from covipal.models.base import VisionLanguageModel
from covipal.pruning import text_for_scoring


def answer_ids(model: VisionLanguageModel, answer: str) -> list[int]:
    """The answer's tokens as they continue the assistant prompt, then the end-of-answer token."""
    processor = model.require_processor()
    prompt = processor.render("?")
    separator = "" if prompt[-1].isspace() else " "
    prompt_ids = processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = processor.tokenizer(prompt + separator + answer, add_special_tokens=False)["input_ids"]
    return ids[len(prompt_ids):] + eos_token_ids(model)[:1]


def pad_left(model: VisionLanguageModel, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask `[B, L]`, left-padded with the model's pad token like the prompt processor."""
    pad = pad_token_id(model)
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return input_ids, attention_mask


def pad_answered(model: VisionLanguageModel, prompts: list[list[int]],
                 answers: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Prompt + answer rows left-padded: input_ids and attention_mask `[B, L]`, and each row's answer length."""
    input_ids, attention_mask = pad_left(model, [p + a for p, a in zip(prompts, answers)])
    return input_ids, attention_mask, [len(a) for a in answers]


def prompt_text(model: VisionLanguageModel, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the PPM reads of the prompts: text_embeds [B, T, D] and text_mask [B, T]."""
    input_ids, attention_mask = pad_left(model, prompts)
    return text_for_scoring(model.embed_prompt(input_ids), input_ids, attention_mask, model.image_token_id)
