"""Stage-by-stage parity of an export directory against the PyTorch model it was made from.

    files       every file's sha256 matches the manifest
    tokenizer   the directory's tokenizer + chat template + preprocessing give the model's prompt tensors
    vision      visual_tokens                  ONNX Runtime vs PyTorch, same pixel values
    embed       text_embeds                    same input ids
    prune       scores, kept_index, kept_tokens at several budgets, same visual and text inputs
    decoder     logits and present KV for a prefill (past 0) and one decode step, same pruned prompt
    chain       greedy tokens of the shipped `Pipeline` on ONNX Runtime (vision -> ppm -> decoder with KV) vs
                covipal.generation.generate_from_batch, for both position policies: one decode loop on both sides
    forms       a quantized decoder: decoder.onnx (MatMulNBits) and decoder.qdq.onnx (for TensorRT) hold the same
                integers and scales, and give the same logits in ONNX Runtime
    polygraphy  `polygraphy run <graph> --onnxrt` on the same inputs (when polygraphy is installed)

fp32 must match (kept indices and tokens exactly, values within 1e-4 of the reference's scale);
fp16 differences are reported, not failed on. A quantized decoder is compared with the PyTorch model in
the export dtype: its logit and token differences are reported, not failed on; NaNs, wrong shapes and
tokens that do not decode still fail. `python -m covipal_export.export.verify DIR` (`covipal-verify DIR`)
runs it alone.

Memory: PyTorch's outputs are computed first (references.py) and the model is released before any graph runs;
each graph then runs in its own ONNX Runtime session, closed before the next opens. A decoder that ONNX Runtime
cannot hold whole in the memory available here (an fp16 7B decoder takes 26 GB on a CPU) is checked by groups
of layers (decoder_groups.py), and the checks that need it whole (chain, the forms' logits, polygraphy) are
reported as skipped, with the memory they would take.
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
from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.kv_compression import KVConfig
from covipal.models import VisionLanguageModel
from covipal.pruning import POSITION_POLICIES
from covipal.strategies import Strategy
from covipal_export import names
from covipal_export.export.decoder_groups import layer_groups, open_group, ort_bytes
from covipal_export.export.qdq import dq_weight, nbits_weight, offsets_name
from covipal_export.export.references import (
    KV_BUDGET,
    DecoderStep,
    References,
    compute_references,
    tokenizer_inputs,
)
from covipal_export.manifest import Manifest, file_problems, load_manifest
from covipal_export.memory import GIB, available_bytes, gib, release_memory
from covipal_export.runtime.export_dir import prompt_processor
from covipal_export.runtime.ort_backend import OrtBackend, new_session
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.reference import reference_from_manifest

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2}  # max |diff| <= tolerance * max(1, max |reference|)
HEADROOM = 0.8  # the share of the available memory one check's ONNX Runtime sessions may take
GROUP_SHARE = 0.25  # ... and one group of layers, when the decoder does not fit whole


@dataclass
class Check:
    stage: str
    what: str
    result: str
    ok: bool | None  # None: skipped (the result says why)
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
            status = ("skipped" if check.ok is None else "ok" if check.ok else
                      "FAIL" if check.required else "differs")
            lines.append(f"  {check.stage:<10} {check.what:<{width}}  {check.result:<{result_width}}  {status}")
        lines.append("  PASSED" if self.passed else "  FAILED")
        return "\n".join(lines)


class Verifier:
    """Runs the checks of one export directory against `references`; `feeds` keeps each graph's inputs."""

    def __init__(self, directory: Path, references: References):
        self.directory, self.refs = Path(directory), references
        self.manifest: Manifest = load_manifest(directory)
        quantization = self.manifest.quantization
        self.report = Report(self.directory, self.manifest.model.dtype, quantization and quantization.summary())
        self.tolerance = TOLERANCE[self.manifest.model.dtype]
        self.exact = self.manifest.model.dtype == "fp32"  # fp16: differences are reported, not failed on
        self.decoder_exact = self.exact and quantization is None  # quantized weights: reported, not failed on
        self.feeds: dict[str, dict[str, np.ndarray]] = {}
        self.decoder_logits: np.ndarray | None = None  # decoder.onnx's prefill logits, for the forms check

    def add(self, stage: str, what: str, result: str, ok: bool | None, required: bool = True) -> None:
        self.report.checks.append(Check(stage, what, result, ok, required))

    def compare(self, stage: str, what: str, actual: np.ndarray, expected: torch.Tensor | np.ndarray,
                valid: np.ndarray | None = None, exact: bool | None = None) -> None:
        """max |diff| of one output (over `valid` entries); non-finite values and wrong shapes always fail."""
        expected = np.asarray(expected.detach().float() if isinstance(expected, torch.Tensor) else expected,
                              dtype=np.float32)
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

    def fits(self, *graph_files: str) -> tuple[bool, str]:
        """Whether ONNX Runtime can hold these graphs at once here, and the figures (for a skipped check)."""
        need = sum(ort_bytes(onnx.load(self.directory / file, load_external_data=False)) for file in graph_files)
        available = available_bytes()
        return need <= HEADROOM * available, f"skipped: needs ~{_size(need)} in ONNX Runtime, {_size(available)} free"

    def run_graph(self, stage: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph in its own session (closed on return), its feeds cast to the manifest's dtypes."""
        graph = self.manifest.graphs[stage]
        feeds = {spec.name: np.ascontiguousarray(feeds[spec.name], dtype=spec.dtype) for spec in graph.inputs}
        self.feeds.setdefault(stage, feeds)
        outputs = new_session(self.manifest.graph_path(self.directory, stage)).run(None, feeds)
        release_memory()
        return {spec.name: value for spec, value in zip(graph.outputs, outputs)}

    def check_stages(self) -> None:
        refs, budget = self.refs, self.manifest.pruning.default_budget
        out = self.run_graph(names.VISION, {names.PIXEL_VALUES: refs.batch.pixel_values.numpy()})
        self.compare(names.VISION, names.VISUAL_TOKENS, out[names.VISUAL_TOKENS], refs.visual)
        out = self.run_graph(names.EMBED, {names.INPUT_IDS: refs.input_ids.numpy()})
        self.compare(names.EMBED, names.TEXT_EMBEDS, out[names.TEXT_EMBEDS], refs.embeds)
        for k, (scores, kept_index) in refs.prune.items():
            feeds = {names.VISUAL_TOKENS: refs.visual.numpy(), names.TEXT_EMBEDS: refs.text_embeds.numpy(),
                     names.TEXT_MASK: refs.text_mask.numpy(), names.BUDGET: np.array(k)}
            out = self.run_graph(names.PRUNE, feeds)
            self.equal(names.PRUNE, f"kept_index, budget {k}", out[names.KEPT_INDEX], kept_index.numpy())
            if k == budget:
                self.compare(names.PRUNE, names.SCORES, out[names.SCORES], scores)
                self.compare(names.PRUNE, names.KEPT_TOKENS, out[names.KEPT_TOKENS], torch.gather(
                    refs.visual, 1, kept_index[..., None].expand(-1, -1, refs.visual.shape[-1])))

    def check_decoder(self) -> None:
        """Prefill and one decode step, whole or by groups of layers: logits and present KV against PyTorch."""
        decoder, graph = self.manifest.decoder, self.manifest.graphs[names.DECODER]
        steps = self.refs.decoder
        empty = self.past(steps[0], {})
        self.feeds[names.DECODER] = self.decoder_feeds(graph.inputs, {**steps[0].feeds, **empty})
        available = available_bytes()
        groups = layer_groups(self.directory / graph.file, decoder.num_layers, int(HEADROOM * available),
                              int(GROUP_SHARE * available))
        if groups is None:
            self.add(names.DECODER, "prefill and decode step", "skipped: too big for memory here, and its layers' "
                     "outputs are not named (exported before groups of layers): export again", None, required=False)
            return
        hidden = {step.name: step.feeds[names.INPUTS_EMBEDS] for step in steps}  # [B, S, D], then logits [B, 1|S, V]
        present: dict[str, dict[str, np.ndarray]] = {step.name: {} for step in steps}
        for group in groups:
            session = open_group(group, self.directory)
            for step, before in zip(steps, [None, *steps]):  # the decode step's past: the prefill's present
                past = self.past(step, present[before.name] if before else {})
                feeds = {**step.feeds, **past, group.hidden_input: hidden[step.name]}
                out = dict(zip([value.name for value in session.get_outputs()],
                               session.run(None, self.decoder_feeds(session.get_inputs(), feeds))))
                hidden[step.name] = out.pop(group.hidden_output)
                present[step.name].update(out)
            del session
            release_memory()
        self.decoder_logits = hidden["prefill"]
        if len(groups) > 1:
            self.add(names.DECODER, "checked by groups of layers", _spans(groups), True)
        for step in steps:
            mask = step.feeds[names.ATTENTION_MASK].astype(bool)
            valid = mask[:, -step.logits.shape[1]:, None]  # left padding's logits are never used
            self.compare(names.DECODER, f"{step.name} {names.LOGITS}", hidden[step.name], step.logits, valid=valid,
                         exact=self.decoder_exact)
            ours = np.stack([present[step.name][name] for name in names.present_names(decoder.num_layers)])
            # [2L, B, Hkv, P+S, Dh]; left-padding positions hold values nothing attends to: not compared
            self.compare(names.DECODER, f"{step.name} present", ours, step.present,
                         valid=mask[None, :, None, :, None], exact=self.decoder_exact)

    def past(self, step: DecoderStep, present: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The step's past KV inputs: ONNX Runtime's `present` of the previous step where given, else zeros of the
        step's past length (what a group reads of the layers outside it: their shape)."""
        decoder = self.manifest.decoder
        length = step.feeds[names.ATTENTION_MASK].shape[1] - step.feeds[names.INPUTS_EMBEDS].shape[1]
        batch = step.feeds[names.INPUTS_EMBEDS].shape[0]
        zeros = np.zeros((batch, decoder.num_kv_heads, length, decoder.head_dim), np.float32)
        return {past % i: present.get(made % i, zeros) for i in range(decoder.num_layers)
                for past, made in ((names.PAST_KEY, names.PRESENT_KEY), (names.PAST_VALUE, names.PRESENT_VALUE))}

    def decoder_feeds(self, inputs, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`feeds` for these inputs (the decoder's TensorSpecs or a session's NodeArgs), in the export dtype; a hidden
        state between layers has the dtype of inputs_embeds."""
        dtypes = {spec.name: spec.dtype for spec in self.manifest.graphs[names.DECODER].inputs}
        return {value.name: np.ascontiguousarray(feeds[value.name], dtype=dtypes.get(
            value.name, dtypes[names.INPUTS_EMBEDS])) for value in inputs}

    def ort_pipeline(self) -> Pipeline:
        """The shipped `Pipeline` on the runtime's own ONNX Runtime backend, on the CPU."""
        return Pipeline(self.directory, self.manifest, prompt_processor(self.directory, self.manifest),
                        OrtBackend(self.directory, self.manifest), "export verification: ONNX Runtime on the CPU")

    def check_chain(self) -> None:
        fits, why = self.fits(*(graph.file for graph in self.manifest.graphs.values()))
        batch_size = self.refs.batch.input_ids.shape[0]
        if not fits:
            for policy in POSITION_POLICIES:
                self.add("chain", f"greedy tokens, batch {batch_size}, {policy}", why, None, required=False)
            return
        budget, new_tokens = self.manifest.pruning.default_budget, self.refs.new_tokens
        pipe = self.ort_pipeline()
        for policy in POSITION_POLICIES:
            kept_index, want = self.refs.chain[policy]
            out = pipe.generate_from_batch(self.refs.batch, budget=budget, position_policy=policy,
                                           max_new_tokens=new_tokens)
            self.equal("chain", f"kept_index, {policy}", out.kept_index, kept_index)
            got = out.sequences
            same, result = _same_tokens(got, want)
            self.add("chain", f"greedy tokens, batch {want.shape[0]}, {policy}", result, same,
                     required=self.decoder_exact)
            if not self.decoder_exact:  # the tokens may differ; they must still be tokens
                vocab = self.manifest.model.vocab_size
                decodes = bool(((got >= 0) & (got < vocab)).all()) and len(out.answers) in (0, len(got))
                self.add("chain", f"tokens decode, {policy}", f"ids in [0, {vocab})" if decodes else "ids out of range",
                         decodes)
        del pipe
        release_memory()

    def check_kv_variant(self) -> None:
        """decoder_kv.onnx through the runtime: greedy tokens and KV bytes held equal PyTorch's, per method."""
        kv_variant = self.manifest.kv_variant
        if kv_variant is None:
            return
        fits, why = self.fits(*(graph.file for graph in self.manifest.graphs.values()), kv_variant.graph.file)
        if not fits:
            for method in kv_variant.methods:
                self.add("kv", f"greedy tokens, {method} {KV_BUDGET}", why, None, required=False)
            return
        budget, new_tokens = self.manifest.pruning.default_budget, self.refs.new_tokens
        pipe = self.ort_pipeline()
        for method in kv_variant.methods:
            want, want_bytes = self.refs.kv[method]
            out = pipe.generate_from_batch(self.refs.batch, budget=budget, max_new_tokens=new_tokens,
                                           kv=KVConfig(method, KV_BUDGET))
            same, result = _same_tokens(out.sequences, want)
            self.add("kv", f"greedy tokens, {method} {KV_BUDGET}", result, same, required=self.exact)
            self.add("kv", f"KV bytes held, {method} {KV_BUDGET}", f"{out.kv_bytes} vs {want_bytes}",
                     out.kv_bytes == want_bytes)
        del pipe
        release_memory()

    def check_forms(self) -> None:
        """A quantized decoder's two forms: the same integers and scales, and the same logits in ONNX Runtime."""
        quantization = self.manifest.quantization
        if quantization is None:
            return
        count, same = same_quantized_weights(self.manifest.graph_path(self.directory, names.DECODER),
                                             self.directory / quantization.trt_file)
        same = same and count == len(quantization.quantized_matmuls)
        self.add("forms", f"{quantization.trt_file}: the weights and scales of {graph_name(self.manifest)}",
                 f"{count} weights identical" if same else "differ", same)
        what = f"{quantization.trt_file} prefill logits vs {graph_name(self.manifest)}"
        fits, why = self.fits(quantization.trt_file)
        if not fits or self.decoder_logits is None:
            self.add("forms", what, why, None, required=False)
            return
        feeds = self.feeds[names.DECODER]
        logits = new_session(self.directory / quantization.trt_file).run([names.LOGITS], feeds)[0]
        release_memory()
        # fp32: the same weights give the same logits; fp16: MatMulNBits (int8 activations at accuracy level 4)
        # and DequantizeLinear -> MatMul (fp16 weights, computed in fp32 on a CPU) round differently
        self.compare("forms", what, logits, self.decoder_logits, exact=self.exact)

    def check_tokenizer(self) -> None:
        """The directory alone (tokenizer files, chat template, preprocessing) rebuilds the prompt tensors."""
        if self.manifest.tokenizer is None or self.refs.prompts is None or self.manifest.preprocessing is None:
            self.add("tokenizer", "tokenizer and preprocessing", "none in the manifest", True)
            return
        processor = prompt_processor(self.directory, self.manifest)
        mine, theirs = processor(*tokenizer_inputs(self.refs.prompts.input_ids.shape[0])), self.refs.prompts
        fields = ("input_ids", "attention_mask", "pixel_values")
        same = all(torch.equal(getattr(mine, f), getattr(theirs, f)) for f in fields)
        self.add("tokenizer", "prompt ids and pixel values from the directory", "equal" if same else "differ", same)

    def check_files(self) -> None:
        problems = file_problems(self.directory, self.manifest)
        self.add("files", f"sha256 of {len(self.manifest.files)} files",
                 "match" if not problems else "; ".join(problems)[:60], not problems)

    def check_polygraphy(self) -> None:
        executable = _polygraphy()
        if executable is None:
            self.add("polygraphy", "run --onnxrt", "not installed", True, required=False)
            return
        from polygraphy.json import save_json  # polygraphy is optional (the `tools` extra)

        with tempfile.TemporaryDirectory() as scratch:
            for stage in names.STAGES:
                graph = self.manifest.graphs[stage]
                fits, why = self.fits(graph.file)
                if not fits:
                    self.add("polygraphy", f"run {graph.file} --onnxrt", why, None, required=False)
                    continue
                inputs = Path(scratch) / f"{stage}.json"
                save_json([self.feeds[stage]], str(inputs))
                result = subprocess.run([executable, "run", str(self.manifest.graph_path(self.directory, stage)),
                                         "--onnxrt", "--load-inputs", str(inputs)],
                                        capture_output=True, text=True, cwd=scratch)
                ok = result.returncode == 0 and "PASSED" in result.stdout + result.stderr
                detail = "PASSED" if ok else (result.stdout + result.stderr).strip().splitlines()[-1][:60]
                self.add("polygraphy", f"run {graph.file} --onnxrt", detail, ok)


def same_quantized_weights(ort_path: Path, trt_path: Path) -> tuple[int, bool]:
    """(how many MatMulNBits weights, whether each has a DequantizeLinear twin with the same integers, scales and
    offsets), reading one weight of each form at a time."""
    ort_form, trt_form = (onnx.load(path, load_external_data=False) for path in (ort_path, trt_path))
    twins = {node.name.removesuffix("_dq"): node for node in trt_form.graph.node if node.op_type == "DequantizeLinear"}
    count, same = 0, len(twins) == sum(node.op_type == "MatMulNBits" for node in ort_form.graph.node)
    for node in ort_form.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        twin = twins.get(node.name)
        if twin is None:
            return count, False
        offsets = offsets_name(node.name)  # q4_1's block offsets, where there are
        mine = nbits_weight(node, _tensors(ort_form, [*node.input[1:3], offsets], ort_path.parent))
        theirs = dq_weight(twin, _tensors(trt_form, [*twin.input[:2], offsets], trt_path.parent))
        count += 1
        same = same and mine.same_as(theirs)
    return count, same


def _tensors(model: onnx.ModelProto, wanted: list[str], base_dir: Path) -> dict[str, onnx.TensorProto]:
    """Copies of the named initializers with their data read in (the model's own stay unread)."""
    found = {}
    for tensor in model.graph.initializer:
        if tensor.name in wanted:
            found[tensor.name] = copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            if uses_external_data(copy):
                load_external_data_for_tensor(copy, str(base_dir))
                copy.data_location = onnx.TensorProto.DEFAULT
                del copy.external_data[:]
    return found


def verify_export(directory: str | Path, model: VisionLanguageModel | None = None, strategy: Strategy | None = None,
                  *, batch_size: int = 2, new_tokens: int = 16, polygraphy: bool = True,
                  references: References | None = None) -> Report:
    """All checks. `references` default to those of `model` and `strategy`, which default to the ones rebuilt from
    the manifest (released before any graph runs)."""
    directory = Path(directory)
    if references is None:
        manifest = load_manifest(directory)
        if model is None or strategy is None:
            model, strategy = reference_from_manifest(manifest)
        references = compute_references(model, strategy, manifest.pruning.default_budget,
                                        manifest.pruning.position_policy, manifest.decoder.logits == "last",
                                        batch_size=batch_size, new_tokens=new_tokens,
                                        kv_methods=tuple(manifest.kv_variant.methods) if manifest.kv_variant else ())
        del model, strategy
    verifier = Verifier(directory, references)
    verifier.check_files()
    verifier.check_tokenizer()
    verifier.check_stages()
    verifier.check_decoder()
    verifier.check_chain()
    verifier.check_kv_variant()
    verifier.check_forms()
    if polygraphy:
        verifier.check_polygraphy()
    return verifier.report


def graph_name(manifest: Manifest) -> str:
    return manifest.graphs[names.DECODER].file


def _spans(groups) -> str:
    """"layers 0-7, 8-15, 16-23, 24-31" (a group of one layer: its number)."""
    spans = [f"{g.layers.start}" if len(g.layers) == 1 else f"{g.layers.start}-{g.layers.stop - 1}" for g in groups]
    return f"{len(groups)} groups: layers {', '.join(spans)}"


def _size(count: int) -> str:
    return gib(count) if count >= GIB // 10 else f"{count / 2**20:.1f} MiB"


def _same_tokens(actual: np.ndarray, expected: np.ndarray) -> tuple[bool, str]:
    """Whether greedy sequences [B, new] are equal, and the result in words (where they first differ)."""
    if actual.shape != expected.shape:
        return False, f"shape {list(actual.shape)} != {list(expected.shape)}"
    differs = (actual != expected).any(0)
    if not differs.any():
        return True, f"{expected.shape[1]} tokens x {expected.shape[0]} rows equal"
    return False, f"differ from token {int(np.argwhere(differs)[0, 0])} of {expected.shape[1]}"


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
