"""Stage-by-stage parity of an export directory against the PyTorch model it was made from.

    files       every file's sha256 matches the manifest
    tokenizer   the directory's tokenizer + chat template + preprocessing give the model's prompt tensors
    vision      visual_tokens                  ONNX Runtime vs PyTorch, same pixel values
    embed       text_embeds                    same input ids
    prune       scores, kept_index, kept_tokens at several budgets, same visual and text inputs
    decoder     logits and present KV for a prefill (past 0) and one decode step, same pruned prompt
    chain       greedy tokens of the shipped `Pipeline` on ONNX Runtime (vision -> ppm -> decoder with KV) vs
                covipal.generation.generate_from_batch, for both position policies: one decode loop on both sides
    kv          with decoder_kv.onnx (--kv-variant): greedy tokens and KV bytes of each compressed KV method (budget
                0.4) through the `Pipeline` vs covipal's generate, the same batch
    forms       a quantized decoder: decoder.onnx (MatMulNBits) and decoder.qdq.onnx (for TensorRT) hold the same
                integers and scales, and give the same logits in ONNX Runtime
    polygraphy  `polygraphy run <graph> --onnxrt` on the same inputs (when polygraphy is installed)

fp32 must match (kept indices and tokens exactly, values within 1e-4 of the reference's scale);
fp16 differences are reported, not failed on. A quantized decoder is compared with the PyTorch model in
the export dtype: its logit and token differences are reported, not failed on; NaNs, wrong shapes and
tokens that do not decode still fail. `python -m covipal_export.export.verify DIR` (`covipal-verify DIR`)
runs it alone.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

import numpy as np
import onnx
import torch

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.generation import SamplingConfig, generate_from_batch, pad_token_id
from covipal.kv_compression import KVConfig
from covipal.models import PromptBatch, VisionLanguageModel
from covipal.pruning import POSITION_POLICIES, prune_prompt, text_for_scoring
from covipal.selection import keep_topk_in_order
from covipal.strategies import Strategy
from covipal_export import names
from covipal_export.export.qdq import quantized_weights
from covipal_export.manifest import Manifest, file_problems, load_manifest
from covipal_export.runtime.export_dir import prompt_processor
from covipal_export.runtime.ort_backend import OrtBackend, new_session
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.reference import reference_from_manifest

KV_BUDGET = 0.4  # the KV budget the kv check runs each method at
TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max |diff| <= tolerance * max(1, max |reference|)
SAMPLE_QUESTIONS = ["What is on the table?", "How many people are in the picture? Answer with one word.",
                    "Describe the image in detail.", "What color is the car?"]


@dataclass
class Check:
    stage: str
    what: str
    result: str
    ok: bool
    required: bool = True  # False: a difference is reported, not failed on (fp16)


@dataclass
class Report:
    directory: Path
    dtype: str
    quantization: str | None = None  # "int4 rtn, block 32"; None: the decoder is in the export dtype
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.ok or not check.required for check in self.checks)

    def table(self) -> str:
        width = max(len(check.what) for check in self.checks)
        result_width = max(len(check.result) for check in self.checks)
        rule = (f"values within {TOLERANCE['fp32']:g} x scale, indices and tokens exact" if self.dtype == "fp32" else
                f"differences beyond {TOLERANCE[self.dtype]:g} x scale are reported as 'differs', not failed on")
        if self.quantization:
            rule += f"; decoder {self.quantization}: its differences are reported, only broken outputs fail"
        lines = [f"verification of {self.directory} ({self.dtype}; {rule}):"]
        for check in self.checks:
            status = "ok" if check.ok else ("FAIL" if check.required else "differs")
            lines.append(f"  {check.stage:<10} {check.what:<{width}}  {check.result:<{result_width}}  {status}")
        lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)


def sample_batch(model: VisionLanguageModel, batch_size: int, seed: int = 0) -> PromptBatch:
    """Prompts of different lengths (so left padding is exercised) with seeded images."""
    rng = np.random.default_rng(seed)
    if model.processor is not None:
        images = [(rng.random((48 + 24 * i, 64 - 8 * i, 3)) * 255).astype(np.uint8) for i in range(batch_size)]
        questions = [SAMPLE_QUESTIONS[i % len(SAMPLE_QUESTIONS)] for i in range(batch_size)]
        return model.processor(images, questions)
    config, n = model.text_config, model.num_visual_tokens  # no tokenizer: random text ids around the image
    pad = pad_token_id(model)
    rows = [rng.integers(0, config.vocab_size, 4 + 3 * i).tolist() for i in range(batch_size)]
    rows = [[t if t != model.image_token_id else pad for t in row] for row in rows]
    rows = [row[:2] + [model.image_token_id] * n + row[2:] for row in rows]
    length = max(len(row) for row in rows)
    input_ids = torch.tensor([[pad] * (length - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (length - len(row)) + [1] * len(row) for row in rows])
    size = model.image_size
    pixel_values = torch.from_numpy(rng.standard_normal((batch_size, 3, size, size), dtype=np.float32))
    return PromptBatch(input_ids, attention_mask, pixel_values)


class Verifier:
    """Runs the checks for one export directory; `feeds` keeps each graph's inputs for polygraphy."""

    def __init__(self, directory: Path, model: VisionLanguageModel, strategy: Strategy):
        self.manifest: Manifest = load_manifest(directory)
        self.backend = OrtBackend(directory, self.manifest)  # the runtime's own backend, on the CPU
        self.model, self.strategy = model, strategy
        quantization = self.manifest.quantization
        self.report = Report(Path(directory), self.manifest.model.dtype, quantization and quantization.summary())
        self.tolerance = TOLERANCE[self.manifest.model.dtype]
        self.exact = self.manifest.model.dtype == "fp32"  # fp16: differences are reported, not failed on
        self.decoder_exact = self.exact and quantization is None  # quantized weights: reported, not failed on
        self.feeds: dict[str, dict[str, np.ndarray]] = {}

    def add(self, stage: str, what: str, result: str, ok: bool, required: bool = True) -> None:
        self.report.checks.append(Check(stage, what, result, ok, required))

    def compare(self, stage: str, what: str, actual: np.ndarray, expected: torch.Tensor,
                valid: np.ndarray | None = None, exact: bool | None = None) -> None:
        """max |diff| of one output (over `valid` entries); non-finite values and wrong shapes always fail."""
        expected = expected.detach().float().numpy()
        actual = np.asarray(actual, dtype=np.float32)
        if actual.shape != expected.shape:
            self.add(stage, what, f"shape {list(actual.shape)} != {list(expected.shape)}", False)
            return
        if valid is not None:
            valid = np.broadcast_to(valid, actual.shape)
            actual, expected = actual[valid], expected[valid]
        if not np.isfinite(actual).all():
            self.add(stage, what, "non-finite values", False)
            return
        diff = float(np.abs(actual - expected).max()) if actual.size else 0.0
        ok = diff <= self.tolerance * max(1.0, float(np.abs(expected).max()) if expected.size else 1.0)
        self.add(stage, f"{what} max |diff|", f"{diff:.2e}", ok, required=self.exact if exact is None else exact)

    def equal(self, stage: str, what: str, actual: np.ndarray, expected: np.ndarray) -> None:
        actual, expected = np.asarray(actual), np.asarray(expected)
        same = actual.shape == expected.shape and bool((actual == expected).all())
        if same:
            result = "equal"
        elif actual.shape != expected.shape:
            result = f"shape {list(actual.shape)} != {list(expected.shape)}"
        else:
            result = f"{int((actual != expected).sum())}/{actual.size} differ"
        self.add(stage, what, result, same, required=self.exact or actual.shape != expected.shape)

    def run_graph(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.feeds.setdefault(stage, feeds)
        return {name: value.numpy() for name, value in self.backend.run(stage, feeds).items()}

    @torch.no_grad()
    def check_stages(self, batch: PromptBatch) -> None:
        model, budget = self.model, self.manifest.pruning.default_budget
        input_ids = batch.input_ids.masked_fill(batch.input_ids == model.image_token_id, 0)
        visual = model.encode_images(batch.pixel_values)  # [B, N, D]
        out = self.run_graph(names.VISION, {names.PIXEL_VALUES: batch.pixel_values.numpy()})
        self.compare(names.VISION, names.VISUAL_TOKENS, out[names.VISUAL_TOKENS], visual)

        embeds = model.embed_tokens(input_ids)  # [B, L, D]
        out = self.run_graph(names.EMBED, {names.INPUT_IDS: input_ids.numpy()})
        self.compare(names.EMBED, names.TEXT_EMBEDS, out[names.TEXT_EMBEDS], embeds)

        text_embeds, text_mask = text_for_scoring(embeds, batch.input_ids, batch.attention_mask, model.image_token_id)
        for k in sorted({1, budget, model.num_visual_tokens}):
            scores = self.strategy.scores(visual, text_embeds, text_mask, k)  # [B, N]
            kept_index = keep_topk_in_order(scores, k)  # [B, k]
            feeds = {names.VISUAL_TOKENS: visual.numpy(), names.TEXT_EMBEDS: text_embeds.numpy(),
                     names.TEXT_MASK: text_mask.numpy(), names.BUDGET: np.array(k)}
            out = self.run_graph(names.PRUNE, feeds)
            self.equal(names.PRUNE, f"kept_index, budget {k}", out[names.KEPT_INDEX], kept_index.numpy())
            if k == budget:
                self.compare(names.PRUNE, names.SCORES, out[names.SCORES], scores)
                self.compare(names.PRUNE, names.KEPT_TOKENS, out[names.KEPT_TOKENS],
                             torch.gather(visual, 1, kept_index[..., None].expand(-1, -1, visual.shape[-1])))
        self.check_decoder(batch, visual, embeds)

    def check_decoder(self, batch: PromptBatch, visual: torch.Tensor, embeds: torch.Tensor) -> None:
        model, manifest = self.model, self.manifest
        num_layers = manifest.decoder.num_layers
        prompt = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id,
                              self.strategy, manifest.pruning.default_budget, manifest.pruning.position_policy)
        last_only = manifest.decoder.logits == "last"
        cache = model.new_cache()
        mask, position = prompt.attention_mask, prompt.position_ids
        inputs = prompt.inputs_embeds
        past = self.backend.empty_cache(inputs.shape[0])
        for step in ("prefill", "decode step"):
            logits = model.decode(inputs, mask, position, cache, last_only=last_only)
            feeds = {names.INPUTS_EMBEDS: inputs.numpy(), names.ATTENTION_MASK: mask.numpy(),
                     names.POSITION_IDS: position.numpy(), **dict(zip(names.past_names(num_layers), past))}
            out = self.run_graph(names.DECODER, feeds)
            valid = mask.bool().numpy()[:, -logits.shape[1]:, None]  # left padding's logits are never used
            self.compare(names.DECODER, f"{step} {names.LOGITS}", out[names.LOGITS], logits, valid=valid,
                         exact=self.decoder_exact)
            present = [out[name] for name in names.present_names(num_layers)]
            reference = torch.cat([torch.stack([layer.keys, layer.values]) for layer in cache.layers])
            # [2L, B, Hkv, P+S, Dh]; left-padding positions hold values nothing attends to: not compared
            self.compare(names.DECODER, f"{step} present", np.stack(present), reference,
                         valid=mask.bool().numpy()[None, :, None, :, None], exact=self.decoder_exact)
            token = logits[:, -1].argmax(-1, keepdim=True)  # [B, 1]
            inputs, past = model.embed_tokens(token), present
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
            position = position[:, -1:] + 1

    def pipeline(self) -> Pipeline:
        directory = self.report.directory
        return Pipeline(directory, self.manifest, prompt_processor(directory, self.manifest), self.backend,
                        "export verification: ONNX Runtime on the CPU")

    def check_chain(self, batch: PromptBatch, new_tokens: int) -> None:
        sampling = SamplingConfig(new_tokens)
        budget = self.manifest.pruning.default_budget
        pipe = self.pipeline()
        for policy in POSITION_POLICIES:
            expected = generate_from_batch(self.model, batch, strategy=self.strategy, budget=budget,
                                           position_policy=policy, sampling=sampling)
            out = pipe.generate_from_batch(batch, budget=budget, position_policy=policy, max_new_tokens=new_tokens)
            self.equal("chain", f"kept_index, {policy}", out.kept_index, expected.kept_index.numpy())
            want, got = expected.sequences.numpy(), out.sequences
            same = want.shape == got.shape and bool((want == got).all())
            result = f"{want.shape[1]} tokens x {want.shape[0]} rows equal" if same else _first_difference(got, want)
            self.add("chain", f"greedy tokens, batch {want.shape[0]}, {policy}", result, same,
                     required=self.decoder_exact)
            if not self.decoder_exact:  # the tokens may differ; they must still be tokens
                vocab = self.manifest.model.vocab_size
                decodes = bool(((got >= 0) & (got < vocab)).all()) and len(out.answers) in (0, len(got))
                self.add("chain", f"tokens decode, {policy}", f"ids in [0, {vocab})" if decodes else "ids out of range",
                         decodes)

    def check_kv_variant(self, batch: PromptBatch, new_tokens: int) -> None:
        budget, pipe = self.manifest.pruning.default_budget, self.pipeline()
        for method in self.manifest.kv_variant.methods:
            kv = KVConfig(method, KV_BUDGET)
            expected = generate_from_batch(self.model, batch, strategy=self.strategy, budget=budget,
                                           sampling=SamplingConfig(new_tokens), kv=kv)
            out = pipe.generate_from_batch(batch, budget=budget, max_new_tokens=new_tokens, kv=kv)
            want, got = expected.sequences.numpy(), out.sequences
            same = want.shape == got.shape and bool((want == got).all())
            result = f"{want.shape[1]} tokens x {want.shape[0]} rows equal" if same else _first_difference(got, want)
            self.add("kv", f"greedy tokens, {method} {KV_BUDGET}", result, same, required=self.exact)
            self.add("kv", f"KV bytes held, {method} {KV_BUDGET}", f"{out.kv_bytes} vs {expected.kv_bytes}",
                     out.kv_bytes == expected.kv_bytes)

    def check_forms(self) -> None:
        """A quantized decoder's two forms: the same integers and scales, and the same logits in ONNX Runtime."""
        quantization, directory = self.manifest.quantization, self.report.directory
        if quantization is None:
            return
        ort_form = onnx.load(self.manifest.graph_path(directory, names.DECODER))
        trt_form = onnx.load(directory / quantization.trt_file)
        mine, theirs = quantized_weights(ort_form), quantized_weights(trt_form)
        same = mine.keys() == theirs.keys() and len(mine) == len(quantization.quantized_matmuls) and all(
            mine[k].same_as(theirs[k]) for k in mine)
        self.add("forms", f"{quantization.trt_file}: the weights and scales of {graph_name(self.manifest)}",
                 f"{len(mine)} weights identical" if same else "differ", same)
        feeds = self.feeds[names.DECODER]
        session = new_session(directory / quantization.trt_file)
        logits = session.run([names.LOGITS], {spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype)
                                              for spec in self.manifest.graphs[names.DECODER].inputs})[0]
        reference = torch.from_numpy(self.run_graph(names.DECODER, feeds)[names.LOGITS])
        self.compare("forms", f"{quantization.trt_file} prefill logits vs {graph_name(self.manifest)}", logits,
                     reference, exact=True)

    def check_tokenizer(self, batch_size: int) -> None:
        """The directory alone (tokenizer files, chat template, preprocessing) rebuilds the prompt tensors."""
        spec = self.manifest.tokenizer
        if spec is None or self.model.processor is None or self.manifest.preprocessing is None:
            self.add("tokenizer", "tokenizer and preprocessing", "none in the manifest", True)
            return
        processor = prompt_processor(self.report.directory, self.manifest)
        rng = np.random.default_rng(1)
        images = [(rng.random((40, 60, 3)) * 255).astype(np.uint8) for _ in range(batch_size)]
        questions = SAMPLE_QUESTIONS[:batch_size]
        mine, theirs = processor(images, questions), self.model.processor(images, questions)
        fields = ("input_ids", "attention_mask", "pixel_values")
        same = all(torch.equal(getattr(mine, f), getattr(theirs, f)) for f in fields)
        self.add("tokenizer", "prompt ids and pixel values from the directory", "equal" if same else "differ", same)

    def check_polygraphy(self) -> None:
        executable = _polygraphy()
        if executable is None:
            self.add("polygraphy", "run --onnxrt", "not installed", True, required=False)
            return
        from polygraphy.json import save_json  # polygraphy is optional (the `tools` extra)

        with tempfile.TemporaryDirectory() as scratch:
            for stage in names.STAGES:
                inputs = Path(scratch) / f"{stage}.json"
                graph = self.manifest.graphs[stage]
                feeds = {spec.name: np.ascontiguousarray(self.feeds[stage][spec.name], dtype=spec.dtype)
                         for spec in graph.inputs}
                save_json([feeds], str(inputs))
                result = subprocess.run([executable, "run", str(self.manifest.graph_path(self.report.directory, stage)),
                                         "--onnxrt", "--load-inputs", str(inputs)],
                                        capture_output=True, text=True, cwd=scratch)
                ok = result.returncode == 0 and "PASSED" in result.stdout + result.stderr
                detail = "PASSED" if ok else (result.stdout + result.stderr).strip().splitlines()[-1][:60]
                self.add("polygraphy", f"run {graph.file} --onnxrt", detail, ok)


def verify_export(directory: str | Path, model: VisionLanguageModel | None = None, strategy: Strategy | None = None,
                  *, batch_size: int = 2, new_tokens: int = 16, polygraphy: bool = True) -> Report:
    """All checks; `model` and `strategy` default to the ones rebuilt from the manifest."""
    directory = Path(directory)
    if model is None or strategy is None:
        model, strategy = reference_from_manifest(load_manifest(directory))
    verifier = Verifier(directory, model, strategy)
    problems = file_problems(directory, verifier.manifest)
    verifier.add("files", f"sha256 of {len(verifier.manifest.files)} files",
                 "match" if not problems else "; ".join(problems)[:60], not problems)
    verifier.check_tokenizer(batch_size)
    batch = sample_batch(model, batch_size)
    verifier.check_stages(batch)
    verifier.check_chain(batch, new_tokens)
    if verifier.manifest.kv_variant is not None:
        verifier.check_kv_variant(batch, new_tokens)
    verifier.check_forms()
    if polygraphy:
        verifier.check_polygraphy()
    return verifier.report


def graph_name(manifest: Manifest) -> str:
    return manifest.graphs[names.DECODER].file


def _first_difference(actual: np.ndarray, expected: np.ndarray) -> str:
    if actual.shape != expected.shape:
        return f"shape {list(actual.shape)} != {list(expected.shape)}"
    step = int(np.argwhere((actual != expected).any(0))[0, 0])
    return f"differ from token {step} of {expected.shape[1]}"


def _polygraphy() -> str | None:
    beside = Path(sys.executable).parent / "polygraphy"  # the venv's script, even when PATH lacks the venv
    return str(beside) if beside.is_file() else shutil.which("polygraphy")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.export.verify", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="an export directory (with manifest.json)")
    parser.add_argument("--batch-size", type=positive_int, default=2,
                        help="prompts per sample batch (default: %(default)s)")
    parser.add_argument("--new-tokens", type=positive_int, default=16,
                        help="greedy tokens compared (default: %(default)s)")
    parser.add_argument("--no-polygraphy", action="store_true", help="skip `polygraphy run --onnxrt`")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    report = verify_export(args.directory, batch_size=args.batch_size, new_tokens=args.new_tokens,
                           polygraphy=not args.no_polygraphy)
    print(report.table())
    return 0 if report.passed else 1


def console() -> NoReturn:
    """The `covipal-verify` command."""
    run(main)


if __name__ == "__main__":
    console()
