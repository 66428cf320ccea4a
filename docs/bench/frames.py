"""Frames answered per second, and what the vision cache saves, on an export (mini-llava on ONNX Runtime CPU).

Run: `.venv/bin/python docs/bench/frames.py engines/mini-llava-b64 [--frames 8] [--threads 2]`. Distinct easy-VQA
test images are the frames, each with 4 of its own questions. Prints one JSON object:
    cache       the same frame asked 8 questions, cached and uncached calls interleaved: mean TTFT of calls 2-8
    frame_rate  per budget and questions per frame: frames / wall seconds (the cache on, as in an app; the
                configurations interleaved frame by frame)
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
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

by_image = defaultdict(list)
for example in easy_vqa.load_split("test"):
    by_image[example.image].append(example.question)
scenes = [(np.asarray(Image.open(path).convert("RGB")), qs[:8]) for path, qs in by_image.items() if len(qs) >= 8]
cached = Pipeline.from_dir(args.directory, backend="ort", threads=args.threads)
uncached = Pipeline.from_dir(args.directory, backend="ort", threads=args.threads, vision_cache_mb=0)
for pipe in (cached, uncached):  # warm-up
    pipe.generate(scenes[-1][0], scenes[-1][1][0], max_new_tokens=8)

ttft = {"cached": [], "uncached": []}
same = True
for frame, questions in scenes[: args.frames // 2]:
    for i, question in enumerate(questions):
        a = cached.generate(frame, question, max_new_tokens=8)
        b = uncached.generate(frame, question, max_new_tokens=8)
        same &= a.answer == b.answer
        if i > 0:
            assert a.timings_ms.vision_cache_hits == 1
            ttft["cached"].append(a.timings_ms.ttft)
            ttft["uncached"].append(b.timings_ms.ttft)
report = {"cache": {"calls": len(ttft["cached"]), "answers_identical": same,
                    **{f"mean_ttft_ms_{k}": round(float(np.mean(v)), 1) for k, v in ttft.items()},
                    "ratio": round(float(np.mean(ttft["cached"]) / np.mean(ttft["uncached"])), 3)}}

frames = scenes[args.frames // 2 : args.frames // 2 + args.frames]  # not seen by the cache yet
configs = [(budget, per_frame) for budget in ("all", 64, 32) for per_frame in (1, 4)]
seconds = dict.fromkeys(configs, 0.0)
for frame, questions in frames:  # configurations interleaved frame by frame: side by side under the same load
    for budget, per_frame in configs:
        cached.vision_cache.clear()  # each configuration meets the frame for the first time
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
