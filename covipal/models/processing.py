"""Turning (image, question) pairs into model inputs: chat prompt, expanded image tokens, pixel values.

One implementation for every model, driven by plain data (`ImagePreprocessing`, the chat template,
special token ids) so that the export manifest can describe it and a runtime can repeat it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from covipal.errors import CovipalError

ImageInput = Union[Image.Image, np.ndarray, str, Path]

_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


@dataclass
class ImagePreprocessing:
    """How an RGB image becomes `pixel_values [3, crop_size, crop_size]`."""

    size: int  # "shortest_edge": the short side is resized to this; "squash": both sides are
    crop_size: int  # centre crop after the resize
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: Literal["shortest_edge", "squash"] = "shortest_edge"
    resample: Literal["bicubic", "bilinear"] = "bicubic"

    def __call__(self, image: Image.Image) -> np.ndarray:
        width, height = image.size
        if self.resize_mode == "shortest_edge":
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.size, int(self.size * long / short)
            new_size = (new_short, new_long) if width <= height else (new_long, new_short)
        else:
            new_size = (self.size, self.size)
        image = image.resize(new_size, resample=_RESAMPLE[self.resample])
        pixels = np.asarray(image, dtype=np.float32)  # [H, W, 3]
        top = int((pixels.shape[0] - self.crop_size) / 2)
        left = int((pixels.shape[1] - self.crop_size) / 2)
        pixels = pixels[top : top + self.crop_size, left : left + self.crop_size]
        pixels = (pixels / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return pixels.transpose(2, 0, 1)  # [3, S, S]


def load_image(image: ImageInput) -> Image.Image:
    """A PIL RGB image from a path, a PIL image, or an `[H, W, 3]` uint8 array; one-line errors otherwise."""
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise CovipalError(f"image not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return opened.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError) as exc:
            raise CovipalError(f"cannot read image {path}: {exc}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
            raise CovipalError(f"an image array must have shape [H, W, 3], got {list(image.shape)}")
        if image.dtype != np.uint8:
            raise CovipalError(f"an image array must be uint8 (0..255), got {image.dtype}")
        return Image.fromarray(image, mode="RGB")
    raise CovipalError(f"unsupported image type {type(image).__name__}: pass a path, a PIL image or an [H, W, 3] array")


@dataclass
class PromptBatch:
    """Model inputs for a batch: prompts left-padded, the image placeholder expanded to N tokens."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, 0 on left padding
    pixel_values: torch.Tensor  # [B, 3, S, S] float32


@dataclass
class PromptProcessor:
    """Chat template + tokenizer + image preprocessing for one model."""

    tokenizer: object  # a transformers tokenizer (fast); its chat template may be overridden below
    chat_template: str  # Jinja; rendered with messages=[{"role": "user", "content": [image, text]}]
    image_token: str  # the placeholder the template emits, a special token of the tokenizer
    num_image_tokens: int  # N: the placeholder is expanded to this many image tokens
    image_preprocessing: ImagePreprocessing
    add_special_tokens: bool = True  # let the tokenizer add BOS (LLaVA); False when the template writes it
    # one caller at a time in the (Rust) tokenizer: a Pipeline shared by threads shares its processor
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @property
    def image_token_id(self) -> int:
        return self.tokenizer.convert_tokens_to_ids(self.image_token)

    def render(self, question: str) -> str:
        """The chat prompt for one question about one image, ending with the assistant's turn."""
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=True
        )

    def tokenize(self, question: str) -> list[int]:
        """Prompt ids with the single image placeholder expanded to `num_image_tokens` copies."""
        if not isinstance(question, str) or not question.strip():
            raise CovipalError("the question is empty")
        with self._lock:
            ids = self.tokenizer(self.render(question), add_special_tokens=self.add_special_tokens)["input_ids"]
        image_id = self.image_token_id
        slots = [i for i, token in enumerate(ids) if token == image_id]
        if len(slots) != 1:
            raise CovipalError(f"the question must not contain {self.image_token!r}; the prompt has one image slot")
        i = slots[0]
        return ids[:i] + [image_id] * self.num_image_tokens + ids[i + 1 :]

    def __call__(self, images: Sequence[ImageInput], questions: Sequence[str]) -> PromptBatch:
        if len(images) != len(questions) or not images:
            raise CovipalError(f"need one question per image, got {len(images)} images and {len(questions)} questions")
        rows = [self.tokenize(q) for q in questions]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pixels = np.stack([self.image_preprocessing(load_image(image)) for image in images])
        return PromptBatch(input_ids, attention_mask, torch.from_numpy(pixels))

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
