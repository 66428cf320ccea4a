"""The OpenAI-compatible server: a FastAPI app around one `Pipeline`.

    POST /v1/chat/completions   one image + one question -> the answer (stream: true -> server-sent events)
    GET  /v1/models             the one model this server holds (the export directory's name)
    GET  /health                ready, with the backend

Bad requests get HTTP 400 with an OpenAI-style JSON error (413 for a body over the limit, 404 for another
model's name). FastAPI runs the endpoints in its thread pool, so requests share the one `Pipeline`
concurrently (it keeps each call's state apart; TensorRT engines take turns).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from covipal.errors import CovipalError
from covipal_export.runtime.pipeline import GenerationResult, Pipeline
from covipal_export.serve import openai_api as api
from covipal_export.serve.request import MB, Limits, Question, decode_image, make_question


@dataclass
class ServerConfig:
    image_root: Path | None = None  # where image file paths may point (None: data URIs only)
    max_body_bytes: int = 20 * MB  # a larger body gets 413
    default_max_tokens: int = 32  # when the request gives no max_tokens
    limits: Limits = field(default_factory=Limits)


class BodyLimit:
    """ASGI middleware: a request body over `max_bytes` gets 413 before it is read whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._refuse(send, int(length))
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise _TooLarge(seen)
            return message

        try:
            await self.app(scope, counted, send)
        except _TooLarge as exc:
            await self._refuse(send, exc.args[0])

    async def _refuse(self, send, size: int):
        response = JSONResponse(api.error_body(f"the request body ({size / MB:.1f} MB) is over the "
                                               f"{self.max_bytes / MB:.0f} MB this server takes", code="too_large"),
                                status_code=413)
        await response({"type": "http"}, None, send)


class _TooLarge(Exception):
    pass


def create_app(pipe: Pipeline, config: ServerConfig | None = None, model_name: str | None = None) -> FastAPI:
    """The app serving `pipe` (its directory's name is the model's id unless `model_name` is given)."""
    config = config or ServerConfig()
    name = model_name or pipe.directory.name
    eos = list(pipe.manifest.special_tokens.eos)
    app = FastAPI(title="covipal-export", description="OpenAI-compatible chat completions with an image")
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes)

    @app.exception_handler(CovipalError)
    async def bad_request(_: Request, exc: CovipalError):
        return JSONResponse(api.error_body(str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JSONResponse(api.error_body(f"invalid request: {where}: {first.get('msg', exc)}"), status_code=400)

    @app.get("/health")
    def health():
        return {"status": "ok", "model": name, "backend": pipe.backend.name, "reason": pipe.reason}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "covipal-export"}]}

    @app.post("/v1/chat/completions")
    def chat(body: api.ChatRequest):
        if body.model not in (None, name):
            return JSONResponse(api.error_body(f"the model {body.model!r} does not exist; this server has {name!r}",
                                               code="model_not_found"), status_code=404)
        question = read_question(body, config)
        cid = api.completion_id()
        if body.stream:
            pieces = _stream(pipe, question)
            next(pieces)  # bad input (budget, context) fails here, as a 400, before any event
            return StreamingResponse(_events(cid, name, eos, pieces), media_type="text/event-stream")
        result = pipe.generate(question.image, question.question, **question.options())
        return api.completion(cid, name, result.answer, _finish(result, eos), _usage(result), _extra(result))

    return app


def read_question(body: api.ChatRequest, config: ServerConfig) -> Question:
    """The checked question of a chat request (a CovipalError, so HTTP 400, for anything wrong)."""
    url, text = body.image_and_text()
    image = decode_image(api.image_bytes(url, config.image_root, config.limits), config.limits)
    return make_question(image, text, config.limits, budget=body.budget,
                         max_new_tokens=body.new_tokens(config.default_max_tokens), temperature=body.temperature,
                         seed=body.seed)


def _stream(pipe: Pipeline, question: Question) -> Iterator:
    """Yields None once the input checked out, then the text pieces, then the GenerationResult."""
    stream = pipe.generate(question.image, question.question, stream=True, **question.options())
    yield None
    yield from stream
    yield stream.result


def _events(cid: str, name: str, eos: list[int], pieces: Iterator) -> Iterator[str]:
    """Server-sent events: a role chunk, one chunk per text piece, a final chunk with usage and timings, [DONE]."""
    yield _sse(api.chunk(cid, name, {"role": "assistant", "content": ""}))
    for piece in pieces:
        if isinstance(piece, GenerationResult):
            yield _sse(api.chunk(cid, name, {}, _finish(piece, eos), {"usage": _usage(piece), **_extra(piece)}))
        elif piece:
            yield _sse(api.chunk(cid, name, {"content": piece}))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


def _finish(result: GenerationResult, eos: list[int]) -> str:
    """OpenAI's finish_reason: "stop" at an end-of-sequence token, else "length" (max_tokens reached)."""
    return "stop" if any(token in eos for token in result.sequences[0].tolist()) else "length"


def _usage(result: GenerationResult) -> dict:
    new = int(result.sequences.shape[1])
    return {"prompt_tokens": result.prefill_length, "completion_tokens": new,
            "total_tokens": result.prefill_length + new}


def _extra(result: GenerationResult) -> dict:
    """Our fields beside OpenAI's: per-request timings (ms) and what pruning kept."""
    return {"timings_ms": {k: round(v, 3) for k, v in asdict(result.timings_ms).items()},
            "covipal": {"tokens_kept": result.tokens_kept, "tokens_total": result.tokens_total,
                        "backend": result.backend}}
