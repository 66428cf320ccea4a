"""One question about one image, as a server receives it: checked before it reaches the `Pipeline`.

Shared by the OpenAI-compatible server and the Triton model, so both refuse the same requests with the
same messages (a `CovipalError` each). The budget and the context length are the `Pipeline`'s to check.
"""

from __future__ import annotations

from dataclasses import dataclass

from PIL import Image

from covipal.budget import Budget, check_budget
from covipal.errors import CovipalError
from covipal.models.processing import load_image

MB = 1 << 20


@dataclass
class Limits:
    """What one request may carry."""

    max_image_bytes: int = 16 * MB  # encoded image
    max_new_tokens: int = 256


@dataclass
class Question:
    """A checked request: a decoded RGB image, a non-empty question and the generation options."""

    image: Image.Image
    question: str
    budget: Budget | None = None  # None: the export's default
    max_new_tokens: int = 32
    temperature: float = 0.0
    seed: int = 0

    def options(self) -> dict:
        """Keyword arguments of `Pipeline.generate` (everything but the image and the question)."""
        return dict(budget=self.budget, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                    seed=self.seed)


def decode_image(data: bytes, limits: Limits) -> Image.Image:
    """An encoded image (PNG, JPEG, ...) as RGB; corrupt, empty or oversize bytes are a CovipalError."""
    if not data:
        raise CovipalError("the image is empty")
    if len(data) > limits.max_image_bytes:
        raise CovipalError(f"the image is {len(data) / MB:.1f} MB, more than the {limits.max_image_bytes / MB:.0f} MB "
                           f"this server takes")
    try:
        return load_image(data)
    except CovipalError as exc:  # covipal's decoding, the one the Pipeline runs on bytes
        raise CovipalError(f"the image cannot be decoded: {exc}") from None


def make_question(image: Image.Image, question: str, limits: Limits, budget: Budget | None = None,
                  max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0) -> Question:
    """Check the text and the options of a request (the budget against N is the Pipeline's check)."""
    if not question.strip():
        raise CovipalError("the question is empty")
    if not 1 <= max_new_tokens <= limits.max_new_tokens:
        raise CovipalError(f"max_new_tokens must be in 1..{limits.max_new_tokens}, got {max_new_tokens}")
    if not 0.0 <= temperature <= 100.0:
        raise CovipalError(f"temperature must be in [0, 100], got {temperature}")
    if seed < 0:
        raise CovipalError(f"seed must be >= 0, got {seed}")
    return Question(image, question, None if budget is None else check_budget(budget), max_new_tokens, temperature,
                    seed)
