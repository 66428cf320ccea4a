"""Turning (image, question) pairs into model inputs: chat prompt, expanded image tokens, pixel values.

One implementation for every model, driven by plain data (`ImagePreprocessing`, the chat template,
special token ids) so that the export manifest can describe it and a runtime can repeat it.
"""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence, Union

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from covipal.errors import CovipalError

# a file path, encoded bytes (JPEG, PNG, ...), a PIL image, an [H, W, 3] uint8 array or tensor (CPU or CUDA), or
# any object with __dlpack__ holding such pixels (taken by torch.from_dlpack, without a copy)
ImageInput = Union[Image.Image, np.ndarray, torch.Tensor, bytes, bytearray, memoryview, str, Path]
COLORS = ("rgb", "bgr")  # the channel order of raw pixels (arrays, tensors); OpenCV frames are BGR

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


def load_image(image: ImageInput, color: str = "rgb") -> Image.Image:
    """A PIL RGB image from any `ImageInput`; one-line `CovipalError`s for what is not an image.

    color: the channel order of raw pixels ("rgb" or "bgr"); files, bytes and PIL images carry their own.
    A BGR frame passed as "rgb" is not detectable: it is answered with red and blue swapped.
    """
    if color not in COLORS:
        raise CovipalError(f"color must be one of {', '.join(COLORS)}, got {color!r}")
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise CovipalError(f"image not found: {path}")
        return _decode(path, str(path))
    if isinstance(image, (bytes, bytearray, memoryview)):
        if not len(image):
            raise CovipalError("cannot decode image bytes: there are none")
        return _decode(io.BytesIO(bytes(image)), f"{len(image)} image bytes")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if not isinstance(image, (np.ndarray, torch.Tensor)) and hasattr(image, "__dlpack__"):
        image = torch.from_dlpack(image)  # CuPy, JAX, ... arrays: a view, no copy
    if isinstance(image, torch.Tensor):
        _check_pixels(list(image.shape), str(image.dtype).removeprefix("torch."), "tensor")
        image = image.detach().cpu().numpy()  # preprocessing (PIL resize) runs on the host: CUDA frames come over
    if isinstance(image, np.ndarray):
        _check_pixels(list(image.shape), str(image.dtype), "array")
        pixels = image[..., ::-1] if color == "bgr" else image  # [H, W, 3] RGB
        return Image.fromarray(np.ascontiguousarray(pixels))
    raise CovipalError(f"unsupported image type {type(image).__name__}: pass a path, encoded bytes, a PIL image, "
                       f"or an [H, W, 3] uint8 array or tensor")


def _decode(source: Path | io.BytesIO, what: str) -> Image.Image:
    """An encoded image, fully decoded (a truncated file fails here, not later)."""
    try:
        with Image.open(source) as opened:
            opened.load()
            return opened.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise CovipalError(f"cannot read image {what}: {exc}") from None


def _check_pixels(shape: list[int], dtype: str, kind: str) -> None:
    """Raw pixels are [H, W, 3] uint8 with H, W > 0."""
    if len(shape) != 3 or shape[2] != 3:
        channels = f"{shape[2]} channels" if len(shape) == 3 else f"{len(shape)} dimensions"
        raise CovipalError(f"an image {kind} must have shape [H, W, 3], got {shape} ({channels}; "
                           f"3 are RGB or BGR)")
    if shape[0] == 0 or shape[1] == 0:
        raise CovipalError(f"an image {kind} must have shape [H, W, 3], got {shape} (empty)")
    if dtype != "uint8":
        raise CovipalError(f"an image {kind} must be uint8 (0..255), got {dtype}; convert float pixels in 0..1 "
                           f"with (x * 255).round() to uint8")


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

    def follow_up(self, question: str) -> list[int]:
        """Ids that close the assistant's answer and ask `question` next in the same chat (no new image), ending
        with the assistant's turn: the chat template's text after an assistant message, tokenized on its own."""
        if not isinstance(question, str) or not question.strip():
            raise CovipalError("the question is empty")
        marker = "\x00answer\x00"
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": marker}]},
                    {"role": "user", "content": [{"type": "text", "text": question}]}]
        with self._lock:
            text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                      add_generation_prompt=True)
            ids = self.tokenizer(text[text.index(marker) + len(marker):], add_special_tokens=False)["input_ids"]
        if self.image_token_id in ids:
            raise CovipalError(f"the question must not contain {self.image_token!r}; the chat has one image")
        return ids

    def __call__(self, images: Sequence[ImageInput], questions: Sequence[str], color: str = "rgb") -> PromptBatch:
        """color: the channel order of raw pixel arrays and tensors (see `load_image`)."""
        if len(images) != len(questions) or not images:
            raise CovipalError(f"need one question per image, got {len(images)} images and {len(questions)} questions")
        rows = [self.tokenize(q) for q in questions]
        length = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (length - len(r)) + r for r in rows], dtype=torch.long)
        attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        pixels = np.stack([self.image_preprocessing(load_image(image, color)) for image in images])
        return PromptBatch(input_ids, attention_mask, torch.from_numpy(pixels))

    def decode(self, token_ids: Sequence[int]) -> str:
        with self._lock:
            return self.tokenizer.decode(list(token_ids), skip_special_tokens=True).strip()
