"""Peak RSS per call of a process that runs one budget only, through the benchmark's own worker (`bench.worker`).

Run: `/usr/bin/time -v .venv/bin/python docs/bench/one_budget_memory.py DIR [--budget 128] [--calls 4]`. The bench
runs every budget in one process, N first, so memory its unpruned calls took stays with the process and shows in the
pruned calls' peaks too; an app that always prunes to k never holds it. Prints the worker's open info, then one line
per call: prefill, TTFT and decode timings and the per-call peak (MiB, as the bench's "peak RSS MB").
"""

import argparse

from covipal_export.bench.worker import Worker, WorkerSpec

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("directory")
parser.add_argument("--budget", type=int, default=128)
parser.add_argument("--calls", type=int, default=4)
args = parser.parse_args()

spec = WorkerSpec(directory=args.directory, backend="ort", threads=2, image="covipal/assets/shapes.png",
                  question="What is in the image?", text_tokens=40, new_tokens=32, position_policy=None)
worker = Worker(spec)
print("open:", worker.info, flush=True)
for _ in range(args.calls):
    call = worker.measure(args.budget)
    print({key: round(call[key], 1) for key in ("prefill_ms", "ttft_ms", "decode_ms_per_token", "peak_mem_mb")}
          | {"tokens_kept": call["tokens_kept"]}, flush=True)
