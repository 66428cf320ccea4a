"""How much of a cached prefix a PPM call could reuse: the kept visual tokens two questions about one frame share
from the start of the prompt (with positions kept, a causal decoder's KV is equal only up to the first difference).

Run: `.venv/bin/python docs/bench/selection_prefix.py engines/mini-llava-b64 [--frames 8] [--budget 64]`. For each
easy-VQA test frame with 8 questions, questions 2-8 each against the earlier question of that frame whose selection
shares the longest prefix with it. Prints the lengths, their mean and median.
"""

import argparse
from collections import defaultdict

import numpy as np

from covipal.training.data import easy_vqa
from covipal_export.runtime import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("directory")
parser.add_argument("--frames", type=int, default=8)
parser.add_argument("--budget", type=int, default=64)
args = parser.parse_args()

pipe = Pipeline.from_dir(args.directory, backend="ort")
by_image = defaultdict(list)
for example in easy_vqa.load_split("test"):
    by_image[example.image].append(example.question)
scenes = [(path, questions[:8]) for path, questions in by_image.items() if len(questions) >= 8][: args.frames]


def shared(a: list[int], b: list[int]) -> int:
    """Length of the common start of two kept-index lists."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


lengths = []
for path, questions in scenes:
    earlier = []
    for question in questions:
        batch = pipe.processor([str(path)], [question])
        visual = pipe.backend.encode_images(batch.pixel_values)  # [1, N, D]
        prompt = pipe.backend.prune(batch.input_ids, batch.attention_mask, visual, args.budget, "keep")
        kept = prompt.kept_index[0].tolist()  # ascending
        if earlier:
            lengths.append(max(shared(kept, other) for other in earlier))
        earlier.append(kept)
print(f"{len(lengths)} questions, kept tokens shared from the start with an earlier question's selection "
      f"(of {args.budget}): {lengths}")
print(f"mean {np.mean(lengths):.1f}, median {np.median(lengths):.0f}, whole selection shared: "
      f"{sum(n == args.budget for n in lengths)}")
