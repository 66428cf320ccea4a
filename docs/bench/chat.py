"""Follow-up questions in a chat (`Pipeline.chat`) against fresh calls, on easy-VQA pairs of questions about one image.

Run: `.venv/bin/python docs/bench/chat.py engines/mini-llava-b64 [--pairs 40] [--budgets 64,32] [--threads 2]`.
Per pair (the first two test questions of an image): `chat.ask(q1)` then `chat.ask(q2)` (the follow-up keeps q1's
visual tokens and prefills only the new text after the cache), the same with `reselect=True` (pruned again, the
whole chat prefilled), and a fresh `generate(image, q2)` (its own selection, no history; the vision cache hits).
Accuracy: the generated answer equals the label. Prints JSON.
"""

import argparse
import json
from collections import defaultdict

import numpy as np

from covipal.training.data import easy_vqa
from covipal_export.runtime import Pipeline

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("directory")
parser.add_argument("--pairs", type=int, default=40)
parser.add_argument("--budgets", default="64,32")
parser.add_argument("--threads", type=int, default=2)
args = parser.parse_args()

by_image = defaultdict(list)
for example in easy_vqa.load_split("test"):
    by_image[example.image].append(example)
pairs = [examples[:2] for examples in by_image.values() if len(examples) >= 2][: args.pairs]
# the prefix cache off: a fresh call prefills its whole prompt (at "all" it would reuse the chat's first prefix)
pipe = Pipeline.from_dir(args.directory, backend="ort", threads=args.threads, prefix_cache_mb=0)
pipe.generate(pairs[-1][0].image, pairs[-1][0].question, max_new_tokens=6)  # warm-up
report = []
for budget in [b if b == "all" else int(b) for b in args.budgets.split(",")]:
    first = follow = fresh = 0
    reselected = 0
    ttft = {"follow_up": [], "reselect": [], "fresh": [], "first": []}
    for q1, q2 in pairs:
        chat, again = pipe.chat(q1.image, budget=budget), pipe.chat(q1.image, budget=budget, reselect=True)
        a1 = chat.ask(q1.question, max_new_tokens=6)
        a2 = chat.ask(q2.question, max_new_tokens=6)
        again.ask(q1.question, max_new_tokens=6)
        b2 = again.ask(q2.question, max_new_tokens=6)
        alone = pipe.generate(q2.image, q2.question, budget=budget, max_new_tokens=6)
        first += a1.answer.lower() == q1.answer
        follow += a2.answer.lower() == q2.answer
        reselected += b2.answer.lower() == q2.answer
        fresh += alone.answer.lower() == q2.answer
        for key, result in (("first", a1), ("follow_up", a2), ("reselect", b2), ("fresh", alone)):
            ttft[key].append(result.timings_ms.ttft)
    n = len(pairs)
    report.append({"budget": budget, "pairs": n, "accuracy_first": round(first / n, 3),
                   "accuracy_follow_up": round(follow / n, 3), "accuracy_reselect": round(reselected / n, 3),
                   "accuracy_fresh_second": round(fresh / n, 3),
                   **{f"mean_ttft_ms_{k}": round(float(np.mean(v)), 1) for k, v in ttft.items()},
                   "ttft_follow_up_vs_fresh": round(float(np.mean(ttft["follow_up"]) / np.mean(ttft["fresh"])), 3)})
print(json.dumps(report, indent=1))
