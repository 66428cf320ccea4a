"""Serving on real servers: the OpenAI-compatible server (uvicorn) and Triton (the tritonserver bundled with
nvidia-pytriton), both on loopback ports, both answering easy-VQA questions exactly as the Pipeline does."""

from __future__ import annotations

import base64
import json
import queue
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import requires_mini

from covipal.cli import run as run_cli
from covipal.errors import CovipalError
from covipal_export.runtime import Pipeline

MB = 1 << 20
QUESTIONS = 16


def _has(*modules: str) -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in modules)


requires_openai_server = pytest.mark.skipif(not _has("fastapi", "uvicorn", "httpx"),
                                            reason="needs fastapi, uvicorn and httpx (`make setup`, extra serve)")
requires_triton = pytest.mark.skipif(not _has("pytriton", "tritonclient"),
                                     reason="needs nvidia-pytriton and tritonclient (`make setup`, extra serve)")


@pytest.fixture(scope="module")
def pipe(mini_demo_export) -> Pipeline:
    return Pipeline.from_dir(mini_demo_export, backend="ort", threads=2)


@pytest.fixture(scope="module")
def vqa(pipe) -> list[tuple[Path, str, str]]:
    """16 easy-VQA test questions (covipal.eval --limit 16's) with the Pipeline's greedy answers, one call each."""
    from covipal.training.data import easy_vqa

    examples = easy_vqa.sample(easy_vqa.load_split("test"), QUESTIONS, seed=0)
    return [(e.image, e.question, pipe.generate(e.image, e.question).answer) for e in examples]


# --- the OpenAI-compatible server -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openai_url(pipe, vqa, tmp_path_factory):
    """uvicorn serving the app on a free loopback port, in a thread; image paths allowed under one directory."""
    import uvicorn

    from covipal_export.serve.app import ServerConfig, create_app
    from covipal_export.triton.local import free_port

    root = tmp_path_factory.mktemp("image-root")
    shutil.copy(vqa[0][0], root / "first.png")
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(pipe, ServerConfig(image_root=root)), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=30)


def _longest(vqa: list) -> list:
    """The questions with the longest answers first (those decode in more than one piece)."""
    return sorted(vqa, key=lambda item: -len(item[2]))


def _chat(question: str, url: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                      {"type": "image_url", "image_url": {"url": url}}]}], **extra}


def _data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@requires_mini
@requires_openai_server
def test_openai_server_answers_as_the_pipeline(openai_url, vqa, pipe):
    import httpx

    with httpx.Client(base_url=openai_url, timeout=120) as client:
        assert client.get("/health").json()["backend"] == pipe.backend.name
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [pipe.directory.name]
        for image, question, answer in vqa[:4]:
            body = client.post("/v1/chat/completions", json=_chat(question, _data_uri(image.read_bytes()))).json()
            assert body["choices"][0]["message"]["content"] == answer
            assert body["choices"][0]["finish_reason"] == "stop"
            assert body["covipal"] == {"tokens_kept": 64, "tokens_total": 196, "backend": pipe.backend.name}
            assert body["timings_ms"]["ttft"] > 0 and body["timings_ms"]["prefill"] > 0
        image, question, _ = vqa[1]
        body = client.post("/v1/chat/completions", json=_chat(question, _data_uri(image.read_bytes()), budget=16,
                                                              max_tokens=2)).json()
        assert body["covipal"]["tokens_kept"] == 16 and body["usage"]["completion_tokens"] <= 2
        assert body["choices"][0]["message"]["content"] == pipe.generate(image, question, budget=16,
                                                                         max_new_tokens=2).answer


@requires_mini
@requires_openai_server
def test_openai_server_streams_server_sent_events(openai_url, vqa):
    import httpx

    image, question, answer = _longest(vqa)[0]
    pieces, final = [], None
    with httpx.Client(base_url=openai_url, timeout=120) as client:
        with client.stream("POST", "/v1/chat/completions",
                           json=_chat(question, _data_uri(image.read_bytes()), stream=True)) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        event = json.loads(line.removeprefix("data: "))
        assert event["object"] == "chat.completion.chunk"
        pieces.append(event["choices"][0]["delta"].get("content", ""))
        final = event
    assert "".join(pieces) == answer and len([p for p in pieces if p]) >= 2
    assert final["choices"][0]["finish_reason"] == "stop" and final["timings_ms"]["ttft"] > 0


@requires_mini
@requires_openai_server
def test_openai_server_refuses_bad_requests_and_goes_on(openai_url, vqa, tmp_path):
    import httpx

    image, question, answer = vqa[0]
    good = _data_uri(image.read_bytes())
    outside = tmp_path / "outside.png"
    shutil.copy(image, outside)
    cases = [
        (_chat(question, _data_uri(b"\x89PNG not really an image")), 400, "the image cannot be decoded"),
        (_chat("   ", good), 400, "the question is empty"),
        (_chat(question, good, budget=0), 400, "budget must be a positive integer, got 0"),
        (_chat(question, good, budget=197), 400, "budget 197 is larger than the 196 visual tokens of this export"),
        (_chat("why? " * 5000, good), 400, "the question is too long"),
        (_chat(question, good, budget="many"), 400, "invalid request: budget"),
        (_chat(question, good, max_tokens="x"), 400, "invalid request: max_tokens"),
        (_chat(question, str(outside)), 400, "is outside the server's image root"),
        (_chat(question, "file://../" + outside.name), 400, "is outside the server's image root"),
        (_chat(question, "http://example.com/a.png"), 400, "fetches nothing from the network"),
        (_chat(question, good, model="gpt-4o"), 404, "does not exist"),
    ]
    with httpx.Client(base_url=openai_url, timeout=120) as client:
        for body, status, message in cases:
            response = client.post("/v1/chat/completions", json=body)
            assert (response.status_code, message in response.json()["error"]["message"]) == (status, True), body
        big = client.post("/v1/chat/completions", content=b"{" + b" " * (50 * MB) + b"}",
                          headers={"content-type": "application/json"})
        assert big.status_code == 413 and "over the 20 MB" in big.json()["error"]["message"]
        by_path = client.post("/v1/chat/completions", json=_chat(question, "first.png")).json()  # under the root
        assert by_path["choices"][0]["message"]["content"] == answer
        again = client.post("/v1/chat/completions", json=_chat(question, good)).json()
        assert again["choices"][0]["message"]["content"] == answer


# --- Triton -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(mini_demo_export, tmp_path_factory):
    """tritonserver on a repository for the mini-llava export (max batch 4), on free loopback ports."""
    from covipal_export.triton.local import LocalServer
    from covipal_export.triton.repository import RepositoryOptions, write_repository

    root = tmp_path_factory.mktemp("triton")
    repo = write_repository(RepositoryOptions(mini_demo_export, root / "repo", max_batch=4, threads=1,
                                              max_queue_delay_us=20000))
    server = LocalServer(repo, log=root / "tritonserver.log").start(timeout_s=240)
    yield server
    server.stop()


def _inputs(module, rows: list[tuple[bytes, str]], batched: bool = True, types: dict | None = None,
            **options) -> list:
    """tritonclient InferInputs for rows of (image bytes, question) and options (BUDGET=...), [rows, 1] each
    (batched) or [rows]; `types` overrides an option's (numpy dtype, Triton type)."""
    types = {"BUDGET": (np.int32, "INT32"), "MAX_NEW_TOKENS": (np.int32, "INT32"), **(types or {})}
    arrays = {"IMAGE": (np.array([r[0] for r in rows], dtype=np.object_), "BYTES"),
              "QUESTION": (np.array([r[1].encode() for r in rows], dtype=np.object_), "BYTES")}
    for name, value in options.items():
        dtype, triton_type = types[name]
        arrays[name] = (np.array([value] * len(rows), dtype=dtype), triton_type)
    made = []
    for name, (array, triton_type) in arrays.items():
        array = array.reshape(-1, 1) if batched else array
        tensor = module.InferInput(name, list(array.shape), triton_type)
        tensor.set_data_from_numpy(array)
        made.append(tensor)
    return made


def _answers(result) -> list[str]:
    return [a.decode() for a in result.as_numpy("ANSWER").reshape(-1)]


@requires_mini
@requires_triton
def test_triton_answers_as_the_pipeline_over_http_and_grpc(triton, vqa):
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    client = http.InferenceServerClient(triton.http_url, network_timeout=120)
    for image, question, answer in vqa:
        result = client.infer("covipal", _inputs(http, [(image.read_bytes(), question)]))
        assert _answers(result) == [answer]
        assert (result.as_numpy("TOKENS_KEPT").item(), result.as_numpy("TOKENS_TOTAL").item()) == (64, 196)
        assert json.loads(result.as_numpy("TIMINGS").item())["ttft"] > 0
    rows = [(image.read_bytes(), question) for image, question, _ in vqa[:4]]  # one request, 4 rows
    result = grpc.InferenceServerClient(triton.grpc_url).infer("covipal", _inputs(grpc, rows), client_timeout=120)
    assert _answers(result) == [answer for _, _, answer in vqa[:4]]


@requires_mini
@requires_triton
def test_triton_dynamic_batching_with_4_concurrent_clients(triton, vqa):
    import tritonclient.http as http

    def client_loop(start: int) -> list[tuple[str, str]]:
        client = http.InferenceServerClient(triton.http_url, network_timeout=120)
        got = []
        for n in range(10):
            image, question, answer = vqa[(start + n) % QUESTIONS]
            got.append((_answers(client.infer("covipal", _inputs(http, [(image.read_bytes(), question)])))[0], answer))
        return got

    stats = http.InferenceServerClient(triton.http_url)
    before = _batched_executions(stats)
    with ThreadPoolExecutor(4) as pool:
        results = [pair for got in pool.map(client_loop, [0, 4, 8, 12]) for pair in got]
    assert len(results) == 40 and all(got == answer for got, answer in results)
    assert _batched_executions(stats) > before  # some executions held more than one request


def _batched_executions(client) -> int:
    """How many times the model ran a batch of more than one row (Triton's statistics)."""
    stats = client.get_inference_statistics("covipal")["model_stats"][0]["batch_stats"]
    return sum(int(s["compute_infer"]["count"]) for s in stats if int(s["batch_size"]) > 1)


@requires_mini
@requires_triton
def test_triton_streaming_pieces_concatenate_to_the_answer(triton, vqa):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(triton.grpc_url)
    counts = []
    for image, question, answer in _longest(vqa)[:2]:
        responses: queue.Queue = queue.Queue()
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("covipal_stream", _inputs(grpc, [(image.read_bytes(), question)], batched=False),
                                  enable_empty_final_response=True)
        pieces, final = [], None
        while True:
            result, error = responses.get(timeout=120)
            assert error is None
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
            pieces.append(result.as_numpy("TEXT").item().decode())
            if result.as_numpy("ANSWER") is not None:
                final = result
        client.stop_stream()
        assert "".join(pieces) == answer
        counts.append(len([p for p in pieces if p]))
        assert final.as_numpy("ANSWER").item().decode() == answer and final.as_numpy("TOKENS_KEPT").item() == 64
    assert counts[0] >= 2  # the longest answer came in more than one piece


@requires_mini
@requires_triton
def test_triton_refuses_bad_requests_and_goes_on(triton, vqa):
    import tritonclient.grpc as grpc
    import tritonclient.http as http
    from tritonclient.utils import InferenceServerException

    image, question, answer = vqa[0]
    good = image.read_bytes()
    cases = [
        (_inputs(http, [(b"\x89PNG not really an image", question)]), "the image cannot be decoded"),
        (_inputs(http, [(good, "  ")]), "the question is empty"),
        (_inputs(http, [(good, question)], BUDGET=0), "budget must be a positive integer, got 0"),
        (_inputs(http, [(good, question)], BUDGET=197), "budget 197 is larger than the 196 visual tokens"),
        (_inputs(http, [(good, "why? " * 5000)]), "the question is too long"),
        (_inputs(http, [(np.random.default_rng(0).bytes(50 * MB), question)]), "the image is 50.0 MB, more than"),
        (_inputs(http, [(good, question)], types={"BUDGET": (np.float32, "FP32")}, BUDGET=3.0),
         "data-type is 'FP32', but model 'covipal' expects 'INT32'"),
    ]
    client = http.InferenceServerClient(triton.http_url, network_timeout=120)
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as error:
            client.infer("covipal", inputs)
        assert message in error.value.message() and error.value.status() == "400", error.value
        assert _answers(client.infer("covipal", _inputs(http, [(good, question)]))) == [answer]
    with pytest.raises(InferenceServerException) as error:  # the same over gRPC
        grpc.InferenceServerClient(triton.grpc_url).infer("covipal", _inputs(grpc, [(good, "")]))
    assert "the question is empty" in error.value.message() and error.value.status() == "StatusCode.INVALID_ARGUMENT"


@requires_triton
def test_triton_model_refuses_an_export_that_changed(tiny_export, tmp_path):
    from covipal_export.triton.local import LocalServer
    from covipal_export.triton.repository import RepositoryOptions, open_pipeline, write_repository

    repo = write_repository(RepositoryOptions(tiny_export, tmp_path / "repo", max_batch=2, copy=True))
    copied = repo / "covipal" / "export"
    assert (copied / "manifest.json").read_bytes() == (tiny_export / "manifest.json").read_bytes()
    params = dict(re.findall(r'key: "(\w+)" value: \{ string_value: "([^"]*)" \}',
                             (repo / "covipal" / "config.pbtxt").read_text()))
    assert params["export_dir"] == "covipal/export" and params["backend"] == "auto"
    pipe, _ = open_pipeline(repo, {**params, "threads": "1"})
    assert pipe.manifest.model.name == "tiny-random-llava"
    manifest = json.loads((copied / "manifest.json").read_text())
    manifest["pruning"]["default_budget"] = 4
    (copied / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CovipalError, match="is not the manifest this repository was written for"):
        open_pipeline(repo, params)
    shutil.copy(tiny_export / "manifest.json", copied / "manifest.json")
    (copied / "embed.onnx").write_bytes(b"changed")
    server = LocalServer(repo, log=tmp_path / "log")
    with pytest.raises(CovipalError, match="does not match its manifest: sha256 differs: embed.onnx"):
        server.start(timeout_s=120)  # the model fails to load, so the server exits
    server.stop()


def test_triton_cli_errors_are_one_line(tiny_export, tmp_path, capsys):
    from covipal_export.triton import cli

    for argv, message in [([str(tmp_path / "nowhere"), "--out", str(tmp_path / "r")],
                           f"error: engine directory not found: {tmp_path / 'nowhere'}"),
                          ([str(tiny_export), "--out", str(tmp_path / "r"), "--max-batch", "99"],
                           "error: --max-batch must be in 1..")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: cli.main(argv))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines


@requires_mini
def test_one_batch_of_requests_fails_only_the_bad_one(pipe, vqa):
    """Rows of several requests with equal options go through one batched generate; a prompt over the context
    fails its own request, and the rows around it still get the Pipeline's answers."""
    from covipal_export.serve.request import Limits
    from covipal_export.triton import handler

    def request(items):
        return {"IMAGE": np.array([[image.read_bytes()] for image, _, _ in items], dtype=np.object_),
                "QUESTION": np.array([[question.encode()] for _, question, _ in items], dtype=np.object_)}

    limits = Limits()
    long = [(vqa[3][0], "why? " * 5000, None)]
    requests = [handler.read_rows(request(items), limits) for items in (vqa[:2], long, vqa[2:3])]
    requests.append(CovipalError("a request that failed its checks stays failed"))
    answers = handler.answer_requests(pipe, requests)
    assert [a.answer for a in answers[0]] == [vqa[0][2], vqa[1][2]] and [a.answer for a in answers[2]] == [vqa[2][2]]
    assert isinstance(answers[1], CovipalError) and "the question is too long" in str(answers[1])
    assert answers[3] is requests[3]


def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    from covipal_export.serve import cli

    for argv, message in [([str(tmp_path / "nowhere")], f"error: engine directory not found: {tmp_path / 'nowhere'}"),
                          ([str(tmp_path), "--image-root", str(tmp_path / "no")],
                           f"error: --image-root is not a directory: {tmp_path / 'no'}"),
                          ([str(tmp_path), "--port", "0"], "error: argument --port: expected a positive integer")]:
        with pytest.raises(SystemExit) as exit_:
            run_cli(lambda: cli.main(argv))
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith(message), lines
