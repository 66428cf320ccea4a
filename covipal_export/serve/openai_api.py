"""The OpenAI chat-completions request and response shapes this server takes and gives (pydantic models).

One user message with one image (`image_url`: a data URI, or a file path under the server's image root)
and its text; `budget` is our extra field. Unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from pathlib import Path
from typing import Literal, Union

from pydantic import BaseModel, Field

from covipal.errors import CovipalError
from covipal_export.serve.request import MB, Limits


class ImageURL(BaseModel):
    url: str


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: Union[str, list[Union[TextPart, ImagePart]]]


class ChatRequest(BaseModel):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float = 0.0
    seed: int = 0
    stream: bool = False
    budget: Union[int, Literal["all"], None] = None  # visual tokens to keep (None: the export's default)

    def new_tokens(self, default: int) -> int:
        chosen = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return default if chosen is None else chosen

    def image_and_text(self) -> tuple[str, str]:
        """The one image reference and the question of the request's single user message."""
        if len(self.messages) != 1 or self.messages[0].role != "user":
            roles = [m.role for m in self.messages]
            raise CovipalError(f"send exactly one user message with one image and its question, got roles {roles}")
        content = self.messages[0].content
        parts = [TextPart(type="text", text=content)] if isinstance(content, str) else content
        images = [p.image_url.url for p in parts if isinstance(p, ImagePart)]
        if len(images) != 1:
            raise CovipalError(f"the message must hold exactly one image_url part, got {len(images)}")
        return images[0], "\n".join(p.text for p in parts if isinstance(p, TextPart))


def image_bytes(url: str, image_root: Path | None, limits: Limits) -> bytes:
    """The encoded image behind an `image_url`: a base64 data URI, or a file (plain path or file://) under
    `image_root`; anything else is a CovipalError."""
    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or not header.endswith(";base64"):
            raise CovipalError("an image data URI must look like data:image/png;base64,<data>")
        if len(payload) * 3 // 4 > limits.max_image_bytes:
            raise CovipalError(f"the image is more than the {limits.max_image_bytes / MB:.0f} MB this server takes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise CovipalError(f"the image data URI is not valid base64: {exc}") from None
    if "://" in url and not url.startswith("file://"):
        raise CovipalError("image_url must be a data URI or a file path (this server fetches nothing from the network)")
    if image_root is None:
        raise CovipalError("this server takes no image file paths (start it with --image-root DIR), send a data URI")
    path = Path(url.removeprefix("file://")).expanduser()
    resolved = (image_root / path if not path.is_absolute() else path).resolve()
    if not resolved.is_relative_to(image_root.resolve()):
        raise CovipalError(f"image path {url} is outside the server's image root")
    if not resolved.is_file():
        raise CovipalError(f"image not found: {url}")
    if resolved.stat().st_size > limits.max_image_bytes:
        raise CovipalError(f"the image is more than the {limits.max_image_bytes / MB:.0f} MB this server takes")
    return resolved.read_bytes()


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def completion(cid: str, model: str, answer: str, finish: str, usage: dict, extra: dict) -> dict:
    """A `chat.completion` object, with our `timings_ms` and `covipal` fields beside OpenAI's."""
    return {"id": cid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": finish}],
            "usage": usage, **extra}


def chunk(cid: str, model: str, delta: dict, finish: str | None = None, extra: dict | None = None) -> dict:
    """One `chat.completion.chunk` of a streamed answer."""
    return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}


def error_body(message: str, kind: str = "invalid_request_error", code: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}

