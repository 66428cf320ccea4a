"""SpindleKV vs eviction alone vs the full cache on mini-llava's language model (SmolLM2-135M), text only.

    PYTHONPATH=$PWD python docs/bench/kv_compression.py --out docs/bench/kv-compression.json

Two measurements, each method and budget on the same inputs, side by side in one run:
- passkey retrieval: a five-digit key hidden at several depths of a haystack of 1k-4k tokens, greedy
  answer checked for the key;
- teacher-forced agreement: the context is prefilled and compressed, the next 128 tokens of the text are
  fed one by one, and each step's argmax is compared with the full cache's; decode ms/token and the KV
  bytes held at the end (the most during decode) come from these runs.
The text is onnxruntime's ThirdPartyNotices.txt (licence prose the installed package ships), not ours.

    PYTHONPATH=$PWD python docs/bench/kv_compression.py --engine-dir DIR --samples 1 --out docs/bench/kv-ort.json

With `--engine-dir` (a mini-llava export made with `--kv-variant`) it runs the teacher-forced part only, on ONNX
Runtime (CPU, `--threads` threads) and in PyTorch, one after the other on the same stretches: KV bytes held,
decode ms/token, and how many of ONNX Runtime's picks equal PyTorch's for the same method and budget.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import time
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from covipal.generation import SamplingConfig, decode_loop, start_decode
from covipal.kv_compression import KVConfig
from covipal.models import load_model
from covipal.pruning import PrunedPrompt

NEEDLE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
QUESTION = "\nWhat is the pass key?"


def haystack_text() -> str:
    spec = importlib.util.find_spec("onnxruntime")
    path = Path(list(spec.submodule_search_locations)[0]) / "ThirdPartyNotices.txt"
    return path.read_text(encoding="utf-8", errors="replace")


def configs(budgets: list[float]) -> list[KVConfig]:
    return [KVConfig()] + [KVConfig(method, budget) for budget in budgets for method in ("eviction", "spindlekv")]


def label(kv: KVConfig) -> str:
    return "full" if kv.method == "none" else f"{kv.method}@{kv.budget:g}"


def prefill(model, ids: list[int], kv: KVConfig):
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    positions = torch.arange(len(ids))[None]
    logits, step, kv_bytes = start_decode(model, model.embed_tokens(input_ids), mask, positions, kv)
    return logits, step, kv_bytes, mask, positions


def ort_prefill(backend, ids: list[int], kv: KVConfig):
    """`prefill` through a runtime backend (decoder.onnx for the full cache, decoder_kv.onnx otherwise)."""
    input_ids = torch.tensor([ids])
    mask = torch.ones_like(input_ids)
    positions = torch.arange(len(ids))[None]
    prompt = PrunedPrompt(backend.embed_prompt(input_ids), mask, positions, torch.zeros(1, 0, dtype=torch.long), None)
    logits, cache = backend.prefill(prompt) if kv.method == "none" else backend.prefill_compressed(prompt, kv)

    def step(token: torch.Tensor, step_mask: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        return backend.step(cache, token, step_mask, position)

    return logits, step, lambda: backend.kv_bytes(cache), mask, positions


def passkey_prompt(tok, hay: list[int], length: int, depth: float, key: int) -> list[int]:
    head = tok("<|im_start|>user\n" + INTRO).input_ids
    needle = tok(NEEDLE.format(key=key)).input_ids
    tail = tok(QUESTION + "<|im_end|>\n<|im_start|>assistant\nThe pass key is").input_ids
    room = length - len(head) - len(needle) - len(tail)
    cut = int(room * depth)
    return head + hay[:cut] + needle + hay[cut:room] + tail


def passkey(model, tok, hay, lengths, depths, kvs, seed) -> dict:
    rng = random.Random(seed)
    cases = [(n, d, rng.randrange(10000, 100000)) for n in lengths for d in depths]
    found = {label(kv): {n: 0 for n in lengths} for kv in kvs}
    sampling = SamplingConfig(max_new_tokens=8)
    for n, depth, key in tqdm(cases, desc="passkey"):
        ids = passkey_prompt(tok, hay[n:], n, depth, key)  # a different stretch of text per length
        for kv in kvs:
            logits, step, _, mask, positions = prefill(model, ids, kv)
            tokens = torch.stack(list(decode_loop(logits, mask, positions, step, sampling, [], 0)), 1)
            found[label(kv)][n] += str(key) in tok.decode(tokens[0])
    return {name: {n: f"{hits}/{len(depths)}" for n, hits in per.items()} for name, per in found.items()}


def agreement(prefill, ids: list[int], context: int, new: int, kvs) -> dict:
    """Teacher-forced: argmax agreement with the full cache over `new` tokens after `context` (`prefill(ids, kv)`)."""
    result, reference = {}, None
    for kv in kvs:
        logits, step, kv_bytes, mask, position = prefill(ids[:context], kv)
        picks, elapsed = [logits.argmax(-1)], 0.0
        position = position[:, -1:]
        for token in ids[context:context + new - 1]:
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            position = position + 1
            start = time.perf_counter()
            logits = step(torch.tensor([token]), mask, position)
            elapsed += time.perf_counter() - start
            picks.append(logits.argmax(-1))
        picks = torch.cat(picks)
        reference = picks if reference is None else reference
        result[label(kv)] = dict(agree=float((picks == reference).float().mean()), kv_bytes=kv_bytes(),
                                 decode_ms=1e3 * elapsed / (new - 1), picks=picks.tolist())
    return result


def ort_side_by_side(model, text: list[int], kvs, args) -> None:
    """Teacher-forced runs on ONNX Runtime, then in PyTorch, on the same stretches; one table."""
    from covipal_export.runtime.export_dir import open_export
    from covipal_export.runtime.ort_backend import OrtBackend

    backend = OrtBackend(args.engine_dir, open_export(args.engine_dir), threads=args.threads)
    stretch = args.context + args.new
    stretches = [text[-(i + 1) * stretch:][:stretch] for i in range(args.samples)]
    runs = {name: [agreement(run, ids, args.context, args.new, kvs) for ids in tqdm(stretches, desc=name)]
            for name, run in (("ort", partial(ort_prefill, backend)), ("torch", partial(prefill, model)))}
    record = {"configs": [label(kv) for kv in kvs], "threads": args.threads}
    for name in record["configs"]:
        ort, torch_ = ([run[name] for run in runs[key]] for key in ("ort", "torch"))
        record[name] = dict(kv_bytes=[r["kv_bytes"] for r in ort], torch_kv_bytes=[r["kv_bytes"] for r in torch_],
                            ort_decode_ms=sum(r["decode_ms"] for r in ort) / len(ort),
                            torch_decode_ms=sum(r["decode_ms"] for r in torch_) / len(torch_),
                            picks_equal=sum(sum(a == b for a, b in zip(o["picks"], t["picks"]))
                                            for o, t in zip(ort, torch_)),
                            picks=sum(len(o["picks"]) for o in ort))
    full = record["full"]
    print("| method | KV bytes held (x full) | ONNX Runtime decode ms/token (x full) | PyTorch ms/token "
          "| ORT picks = PyTorch's |")
    print("|---|---|---|---|---|")
    for name in record["configs"]:
        r = record[name]
        print(f"| {name} | {r['kv_bytes'][0] / 1e6:.2f} MB ({r['kv_bytes'][0] / full['kv_bytes'][0]:.3f}x) "
              f"| {r['ort_decode_ms']:.1f} ({r['ort_decode_ms'] / full['ort_decode_ms']:.2f}x) "
              f"| {r['torch_decode_ms']:.1f} | {r['picks_equal']}/{r['picks']} |")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="1024,2048,4096", help="passkey prompt lengths in tokens")
    parser.add_argument("--depths", default="0.25,0.75", help="where the key sits in the haystack")
    parser.add_argument("--budgets", default="0.4,0.15", help="KV fractions kept")
    parser.add_argument("--context", type=int, default=2048, help="agreement: tokens prefilled before the 128")
    parser.add_argument("--new", type=int, default=128, help="agreement: teacher-forced tokens")
    parser.add_argument("--samples", type=int, default=2, help="agreement: stretches of text")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: on a loaded shared CPU, 2 threads "
                        "spin-wait on each other at every small decode op, ~10x slower)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--engine-dir", type=Path, default=None,
                        help="a mini-llava export with decoder_kv.onnx: ONNX Runtime next to PyTorch, teacher-forced")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model("mini-llava")
    tok = model.processor.tokenizer
    text = tok(haystack_text()).input_ids
    kvs = configs([float(b) for b in args.budgets.split(",")])
    if args.engine_dir:
        with torch.no_grad():
            return ort_side_by_side(model, text, kvs, args)
    record: dict = {"text_tokens": len(text), "configs": [label(kv) for kv in kvs]}
    with torch.no_grad():
        stretch = args.context + args.new
        runs = [agreement(partial(prefill, model), text[-(i + 1) * stretch:][:stretch], args.context, args.new, kvs)
                for i in tqdm(range(args.samples), desc="agreement")]
        record["agreement"] = {name: {key: sum(run[name][key] for run in runs) / len(runs)
                                      for key in ("agree", "kv_bytes", "decode_ms")} for name in record["configs"]}
        record["passkey"] = passkey(model, tok, text, [int(n) for n in args.lengths.split(",")],
                                    [float(d) for d in args.depths.split(",")], kvs, args.seed)
    full = record["agreement"]["full"]["kv_bytes"]
    lengths = ", ".join(args.lengths.split(","))
    print(f"| method | passkey ({lengths}) | agreement | KV bytes (x full) | decode ms/token |")
    print("|---|---|---|---|---|")
    for name in record["configs"]:
        agree = record["agreement"][name]
        keys = ", ".join(record["passkey"][name].values())
        print(f"| {name} | {keys} | {agree['agree']:.3f} | {agree['kv_bytes'] / 1e6:.2f} MB "
              f"({agree['kv_bytes'] / full:.3f}x) | {agree['decode_ms']:.1f} |")
    if args.out:
        args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
