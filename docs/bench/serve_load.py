"""Load on the servers, side by side in one run: Triton with dynamic batching on and off, and the OpenAI server.

Run: `.venv/bin/python docs/bench/serve_load.py engines/mini-llava-b64 --out docs/bench/serve-load.json`.
A bounded client loop: per server and concurrency (1, 2, 4), `--requests` easy-VQA questions (greedy, default
max tokens), spread over that many client threads; requests/s over the wall time, p50/p95 of each request's
latency; and the same questions through `Pipeline.generate` in the client's process, one at a time, for what
a server adds. Then `--rss-requests` requests one after another on the batched Triton model and on the OpenAI
server, with the server processes' RSS before and after (Triton: the server plus its model stubs).
"""

from __future__ import annotations

import argparse
import base64
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from tempfile import TemporaryDirectory

import httpx
import numpy as np
import tritonclient.http as http

from covipal.training.data import easy_vqa
from covipal_export.serve.request import Limits, decode_image
from covipal_export.triton.local import LocalServer, free_port
from covipal_export.triton.repository import RepositoryOptions, write_repository

LEVELS = (1, 2, 4)


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total / 1024


def children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def load(ask, rows: list, concurrency: int, count: int) -> dict:
    """`count` requests over `concurrency` threads; each thread asks its share in turn."""
    latencies: list[float] = []

    def client(start: int) -> None:
        for n in range(start, count, concurrency):
            mark = time.perf_counter()
            ask(rows[n % len(rows)])
            latencies.append((time.perf_counter() - mark) * 1000)

    mark = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client, range(concurrency)))
    wall = time.perf_counter() - mark
    return {"concurrency": concurrency, "requests": count, "requests_per_s": round(count / wall, 3),
            "p50_ms": round(float(np.percentile(latencies, 50)), 1),
            "p95_ms": round(float(np.percentile(latencies, 95)), 1)}


def triton_ask(url: str):
    def ask(row):
        image, question, answer = row
        client = http.InferenceServerClient(url, network_timeout=300)
        inputs = []
        for name, value in (("IMAGE", image), ("QUESTION", question.encode())):
            tensor = http.InferInput(name, [1, 1], "BYTES")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            inputs.append(tensor)
        got = client.infer("covipal", inputs).as_numpy("ANSWER").item().decode()
        assert got == answer, (got, answer)
    return ask


def openai_ask(url: str):
    def ask(row):
        image, question, answer = row
        uri = "data:image/png;base64," + base64.b64encode(image).decode()
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": question},
                                                          {"type": "image_url", "image_url": {"url": uri}}]}]}
        got = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300).json()
        assert got["choices"][0]["message"]["content"] == answer, (got, answer)
    return ask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("engine_dir", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=16, help="per server and concurrency (default: 16)")
    parser.add_argument("--rss-requests", type=int, default=200, help="default: 200")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads per Pipeline (default: 2)")
    args = parser.parse_args()
    from covipal_export.runtime import Pipeline

    examples = easy_vqa.sample(easy_vqa.load_split("test"), 16, seed=0)
    pipe = Pipeline.from_dir(args.engine_dir, backend="ort", threads=args.threads)  # the reference answers
    rows = [(e.image.read_bytes(), e.question, pipe.generate(e.image, e.question).answer) for e in examples]
    report = {"threads": args.threads, "rows": [], "rss": []}

    def direct(row):
        image, question, answer = row
        assert pipe.generate(decode_image(image, Limits()), question).answer == answer

    report["rows"].append({"server": "no server: Pipeline.generate in this process", **load(direct, rows, 1,
                                                                                             args.requests)})
    print(report["rows"][-1], flush=True)

    with TemporaryDirectory() as tmp:
        for label, max_batch in (("triton, dynamic batching (max batch 4)", 4), ("triton, no batching", 1)):
            repo = write_repository(RepositoryOptions(args.engine_dir, Path(tmp) / f"repo{max_batch}",
                                                      max_batch=max_batch, threads=args.threads))
            server = LocalServer(repo, log=Path(tmp) / f"log{max_batch}").start()
            try:
                ask = triton_ask(server.http_url)
                ask(rows[0])  # warm-up
                for level in LEVELS:
                    report["rows"].append({"server": label, **load(ask, rows, level, args.requests)})
                    print(report["rows"][-1], flush=True)
                if max_batch > 1:
                    pids = [server.process.pid, *children(server.process.pid)]
                    before = rss_mb(pids)
                    load(ask, rows, 1, args.rss_requests)
                    report["rss"].append({"server": "triton (server + 2 model stubs)", "requests": args.rss_requests,
                                          "before_mb": round(before, 1), "after_mb": round(rss_mb(pids), 1)})
                    print(report["rss"][-1], flush=True)
            finally:
                server.stop()
        port = free_port()
        process = subprocess.Popen([sys.executable, "-m", "covipal_export.serve", str(args.engine_dir), "--port",
                                    str(port), "--backend", "ort", "--threads", str(args.threads)])
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline and process.poll() is None, "the OpenAI server did not start"
                time.sleep(0.5)
            ask = openai_ask(url)
            ask(rows[0])
            for level in LEVELS:
                report["rows"].append({"server": "openai server (one Pipeline, calls serialized)",
                                       **load(ask, rows, level, args.requests)})
                print(report["rows"][-1], flush=True)
            before = rss_mb([process.pid])
            load(ask, rows, 1, args.rss_requests)
            report["rss"].append({"server": "openai server", "requests": args.rss_requests,
                                  "before_mb": round(before, 1), "after_mb": round(rss_mb([process.pid]), 1)})
            print(report["rss"][-1], flush=True)
        finally:
            process.terminate()
            process.wait(timeout=30)
    args.out.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
