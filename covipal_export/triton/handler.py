"""What the Triton model does with its requests, apart from Triton: numpy tensors in, numpy tensors out.

A request carries rows (its batch dimension): `IMAGE` encoded bytes, `QUESTION` text, and optional
`BUDGET`, `MAX_NEW_TOKENS`, `TEMPERATURE`, `SEED`. Every row is checked (`covipal_export.serve.request`);
a request with a bad row gets one error, and the others are still answered. Rows of all the requests that
Triton's dynamic batcher handed over together, with the same options, go through one batched
`Pipeline.generate` (at most the export's max batch at a time).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from itertools import groupby
from typing import Iterator

import numpy as np

from covipal.errors import CovipalError
from covipal_export.runtime.pipeline import GenerationResult, Pipeline
from covipal_export.serve.request import Limits, Question, decode_image, make_question

INPUTS = {"IMAGE": "TYPE_STRING", "QUESTION": "TYPE_STRING", "BUDGET": "TYPE_INT32", "MAX_NEW_TOKENS": "TYPE_INT32",
          "TEMPERATURE": "TYPE_FP32", "SEED": "TYPE_INT64"}  # name: Triton type; each [batch, 1]
OPTIONAL = ("BUDGET", "MAX_NEW_TOKENS", "TEMPERATURE", "SEED")
OUTPUTS = {"ANSWER": "TYPE_STRING", "TOKENS_KEPT": "TYPE_INT32", "TOKENS_TOTAL": "TYPE_INT32",
           "TIMINGS": "TYPE_STRING"}  # TIMINGS: JSON, the Pipeline's timings_ms of the batch the row ran in
STREAM_OUTPUTS = {"TEXT": "TYPE_STRING", **OUTPUTS}  # TEXT: the pieces; the rest come in the last response


@dataclass
class Answer:
    answer: str
    tokens_kept: int
    tokens_total: int
    timings: dict


def read_rows(tensors: dict[str, np.ndarray], limits: Limits) -> list[Question]:
    """The checked rows of one request (tensors [rows, 1] or [1]); a CovipalError for the first bad one."""
    images, questions = tensors["IMAGE"].reshape(-1), tensors["QUESTION"].reshape(-1)
    if len(images) != len(questions):
        raise CovipalError(f"IMAGE has {len(images)} rows and QUESTION {len(questions)}")
    options = {name: tensors[name].reshape(-1) for name in OPTIONAL if name in tensors}
    for name, values in options.items():
        if len(values) != len(images):
            raise CovipalError(f"{name} has {len(values)} rows, IMAGE {len(images)}")
    rows = []
    for i, (image, question) in enumerate(zip(images, questions)):
        try:
            text = question.decode("utf-8") if isinstance(question, bytes) else str(question)
        except UnicodeDecodeError:
            raise CovipalError(f"row {i}: QUESTION is not UTF-8 text") from None
        picked = {name: values[i].item() for name, values in options.items()}
        rows.append(make_question(decode_image(bytes(image), limits), text, limits,
                                  budget=picked.get("BUDGET"), max_new_tokens=picked.get("MAX_NEW_TOKENS", 32),
                                  temperature=picked.get("TEMPERATURE", 0.0), seed=picked.get("SEED", 0)))
    return rows


def answer_requests(pipe: Pipeline, requests: list[list[Question] | CovipalError]) -> list[list[Answer] | CovipalError]:
    """Answers per request, rows in order; rows with equal options run as one batch. An error in one batch
    (a budget above N, a prompt over the context) fails the requests with rows in it, not the others."""
    flat = [(r, i, q) for r, rows in enumerate(requests) if not isinstance(rows, CovipalError)
            for i, q in enumerate(rows)]
    answers: dict[tuple[int, int], Answer] = {}
    failed: dict[int, CovipalError] = {}
    flat.sort(key=lambda item: _key(item[2]))
    for _, group in groupby(flat, key=lambda item: _key(item[2])):
        for batch in _chunks(list(group), pipe.manifest.shapes.max_batch):
            try:
                result = pipe.generate([q.image for _, _, q in batch], [q.question for _, _, q in batch],
                                       **batch[0][2].options())
            except CovipalError as error:
                if len(batch) == 1:
                    failed.setdefault(batch[0][0], error)
                else:  # one row's prompt is over the context: answer the rows alone, so only its request fails
                    for item in batch:
                        _one(pipe, item, answers, failed)
                continue
            for row, (r, i, _) in enumerate(batch):
                answers[r, i] = to_answer(result, row)
    out: list[list[Answer] | CovipalError] = []
    for r, rows in enumerate(requests):
        if isinstance(rows, CovipalError):
            out.append(rows)
        elif r in failed:
            out.append(failed[r])
        else:
            out.append([answers[r, i] for i in range(len(rows))])
    return out


def _one(pipe: Pipeline, item: tuple[int, int, Question], answers: dict, failed: dict) -> None:
    r, i, q = item
    try:
        answers[r, i] = to_answer(pipe.generate(q.image, q.question, **q.options()), 0)
    except CovipalError as error:
        failed.setdefault(r, error)


def to_answer(result: GenerationResult, row: int) -> Answer:
    return Answer(result.answers[row], result.tokens_kept, result.tokens_total,
                  {k: round(v, 3) for k, v in asdict(result.timings_ms).items()})


def output_arrays(answers: list[Answer]) -> dict[str, np.ndarray]:
    """The OUTPUTS of one request's rows, each [rows, 1]."""
    return {"ANSWER": np.array([[a.answer.encode()] for a in answers], dtype=np.object_),
            "TOKENS_KEPT": np.array([[a.tokens_kept] for a in answers], dtype=np.int32),
            "TOKENS_TOTAL": np.array([[a.tokens_total] for a in answers], dtype=np.int32),
            "TIMINGS": np.array([[json.dumps(a.timings).encode()] for a in answers], dtype=np.object_)}


def stream_pieces(pipe: Pipeline, question: Question) -> Iterator[dict[str, np.ndarray]]:
    """The streaming model's responses for one row: {"TEXT": piece} per piece, then the full OUTPUTS with an
    empty TEXT (the Pipeline's input checks fail before the first piece)."""
    stream = pipe.generate(question.image, question.question, stream=True, **question.options())
    for piece in stream:
        yield {"TEXT": np.array([piece.encode()], dtype=np.object_)}
    final = {name: value.reshape(-1) for name, value in output_arrays([to_answer(stream.result, 0)]).items()}
    yield {"TEXT": np.array([b""], dtype=np.object_), **final}


def _key(question: Question) -> tuple:
    return (str(question.budget), question.max_new_tokens, question.temperature, question.seed)


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start:start + size]
