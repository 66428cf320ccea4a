"""Frames answered per second, and what the vision and prefix caches save, on exports (mini-llava, ONNX Runtime CPU).

Run: `.venv/bin/python docs/bench/frames.py engines/mini-llava-b64 [--uniform engines/mini-llava-b64-uniform]
[--frames 8] [--threads 2]`. Distinct easy-VQA test images are the frames. Prints one JSON object:
    cache       per configuration (the export's strategy at budget "all" and at its default budget; the uniform
                export at its default budget): the same frame asked 8 of its questions by three Pipelines on one
                backend, called in turn for every question: no cache, the vision cache alone, both caches (the
                default). Mean TTFT of calls 2-8 of each frame, its ratio to no cache, the prefix hits among them,
                and whether every answer equals the uncached one
    frame_rate  per budget and questions per frame: frames / wall seconds (both caches on, as in an app; the
                configurations interleaved frame by frame), each frame asked 1 or 4 of its own questions
"""

import argparse
import json
import time
from collections import defaultdict

import numpy as np
from PIL import Image

from covipal.training.data import easy_vqa
from covipal_export.runtime import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("directory")
parser.add_argument("--uniform", help="an export of the same model with --strategy uniform")
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

by_image = defaultdict(list)
for example in easy_vqa.load_split("test"):
    by_image[example.image].append(example.question)
scenes = [(np.asarray(Image.open(path).convert("RGB")), qs[:8]) for path, qs in by_image.items() if len(qs) >= 8]
CACHES = {"none": (0, 0), "vision": (256, 0), "both": (256, 256)}  # vision_cache_mb, prefix_cache_mb


def variants(directory: str) -> dict[str, Pipeline]:
    """One backend (one set of sessions) behind three Pipelines that differ in their caches only."""
    base = Pipeline.from_dir(directory, backend="ort", threads=args.threads)
    return {name: Pipeline(base.directory, base.manifest, base.processor, base.backend, base.reason, *mb)
            for name, mb in CACHES.items()}


exports = [variants(directory) for directory in [args.directory] + ([args.uniform] if args.uniform else [])]
setups = [("all", exports[0])] + [(pipes["none"].manifest.pruning.default_budget, pipes) for pipes in exports]
every_pipe = [pipe for pipes in exports for pipe in pipes.values()]
for pipe in every_pipe:  # warm-up
    pipe.generate(scenes[-1][0], scenes[-1][1][0], max_new_tokens=8)

ttft = [{name: [] for name in CACHES} for _ in setups]
prefix_hits, same = [0] * len(setups), [True] * len(setups)
for frame, questions in scenes[: args.frames // 2]:
    for pipe in every_pipe:  # every frame new to the caches
        pipe.vision_cache.clear()
        pipe.prefix_cache.clear()
    for i, question in enumerate(questions):
        for c, (budget, pipes) in enumerate(setups):  # interleaved: side by side under the same load
            results = {name: pipe.generate(frame, question, budget=budget, max_new_tokens=8)
                       for name, pipe in pipes.items()}
            want = results["none"].sequences.tolist()
            same[c] &= all(result.sequences.tolist() == want for result in results.values())
            if i > 0:
                assert results["vision"].timings_ms.vision_cache_hits == 1
                prefix_hits[c] += results["both"].timings_ms.prefix_cache_hits
                for name, result in results.items():
                    ttft[c][name].append(result.timings_ms.ttft)
report = {"cache": []}
for c, (budget, pipes) in enumerate(setups):
    mean = {name: float(np.mean(values)) for name, values in ttft[c].items()}
    pruning = pipes["none"].manifest.pruning
    report["cache"].append({
        "export": str(pipes["none"].directory), "strategy": pruning.strategy, "budget": budget,
        "calls": len(ttft[c]["none"]), "prefix_hits": prefix_hits[c], "answers_identical": same[c],
        **{f"mean_ttft_ms_{name}": round(value, 1) for name, value in mean.items()},
        "ratio_vision": round(mean["vision"] / mean["none"], 3), "ratio_both": round(mean["both"] / mean["none"], 3)})

cached = exports[0]["both"]
frames = scenes[args.frames // 2 : args.frames // 2 + args.frames]  # not seen by the cache yet
configs = [(budget, per_frame) for budget in ("all", 64, 32) for per_frame in (1, 4)]
seconds = dict.fromkeys(configs, 0.0)
for frame, questions in frames:  # configurations interleaved frame by frame: side by side under the same load
    for budget, per_frame in configs:
        cached.vision_cache.clear()  # each configuration meets the frame for the first time
        cached.prefix_cache.clear()
        start = time.perf_counter()
        for question in questions[:per_frame]:
            cached.generate(frame, question, budget=budget, max_new_tokens=8)
        seconds[budget, per_frame] += time.perf_counter() - start
rates = [{"budget": budget, "questions_per_frame": per_frame, "frames": len(frames),
          "frames_per_second": round(len(frames) / seconds[budget, per_frame], 3),
          "answers_per_second": round(len(frames) * per_frame / seconds[budget, per_frame], 3)}
         for budget, per_frame in configs]
report["frame_rate"] = rates
print(json.dumps(report, indent=1))
