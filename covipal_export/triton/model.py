"""The Triton Python-backend model (copied into the repository as `<model>/1/model.py`).

One `Pipeline` per model instance, opened in `initialize` from the export the repository references, after
checking the manifest's sha256 against the one recorded in config.pbtxt (and each file against the
manifest). `execute` answers a list of requests (Triton's dynamic batcher hands several over together);
the decoupled variant sends text pieces as they are decoded. Triton calls `execute` of one instance
serially, so a Pipeline is never shared between threads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

# The backend stub starts Python with the environment's PYTHONPATH ignored; honour it, as any Python program would.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import triton_python_backend_utils as pb_utils  # noqa: E402  (only inside Triton)

from covipal.errors import CovipalError  # noqa: E402
from covipal_export.triton import handler  # noqa: E402
from covipal_export.triton.repository import open_pipeline  # noqa: E402


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.decoupled = pb_utils.using_decoupled_model_transaction_policy(config)
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.pipe, self.limits = open_pipeline(Path(args["model_repository"]).parent, params)

    def execute(self, requests: list) -> list | None:
        if self.decoupled:
            for request in requests:
                self._stream(request)
            return None
        rows = []
        for request in requests:
            try:
                rows.append(handler.read_rows(_tensors(request), self.limits))
            except CovipalError as error:
                rows.append(error)
        responses = []
        for answers in handler.answer_requests(self.pipe, rows):
            if isinstance(answers, CovipalError):
                responses.append(pb_utils.InferenceResponse(error=_bad_request(answers)))
            else:
                responses.append(pb_utils.InferenceResponse(_outputs(handler.output_arrays(answers))))
        return responses

    def _stream(self, request) -> None:
        sender = request.get_response_sender()
        try:
            rows = handler.read_rows(_tensors(request), self.limits)
            if len(rows) != 1:
                raise CovipalError(f"the streaming model answers one question per request, got {len(rows)}")
            for arrays in handler.stream_pieces(self.pipe, rows[0]):
                sender.send(pb_utils.InferenceResponse(_outputs(arrays)))
        except CovipalError as error:
            sender.send(pb_utils.InferenceResponse(error=_bad_request(error)))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self) -> None:
        self.pipe = None


def _bad_request(error: CovipalError):
    """A per-request error that clients see as a bad request (HTTP 400, gRPC INVALID_ARGUMENT), not a crash."""
    return pb_utils.TritonError(str(error), pb_utils.TritonError.INVALID_ARG)


def _tensors(request) -> dict:
    found = {}
    for name in handler.INPUTS:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is not None:
            found[name] = tensor.as_numpy()
    return found


def _outputs(arrays: dict) -> list:
    return [pb_utils.Tensor(name, value) for name, value in arrays.items()]
