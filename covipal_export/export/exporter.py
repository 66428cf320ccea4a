"""Export a registered model to a directory: four ONNX graphs, tokenizer files and `manifest.json`.

    check options and output -> load model + strategy -> check the budget -> PyTorch's outputs for verification
      -> (--quant-method awq) AWQ's scales searched on --calib pruned prompts, folded into the decoder's weights
      -> temp dir beside the output -> vision.onnx (then the vision tower is released), embed.onnx, ppm.onnx,
         decoder.onnx (+ decoder_kv.onnx with --kv-variant) -> tokenizer/ -> manifest.json -> the PyTorch model
         is released
      -> quantize the decoder (--quant: decoder.onnx in place + decoder.qdq.onnx, manifest rewritten; gptq first
         runs its --calib pairs through the new graphs)
      -> verify (optional; against the outputs kept from PyTorch) -> record time and peak memory in the manifest
      -> rename the temp dir to the output (replacing an old export with --force)

Peak memory is about one copy of the weights in the export dtype: the model is built or loaded in that dtype,
graphs are written tensor by tensor, and no ONNX Runtime session opens while the PyTorch model is held (awq holds a
second language model while it searches).
Any failure removes the temp dir, so a failed export leaves nothing half-made behind.
"""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import onnx
import onnxscript
import torch
import transformers
from tqdm import tqdm

import covipal_export
from covipal.budget import ALL, Budget, check_budget, resolve_budget
from covipal.errors import CovipalError
from covipal.generation import eos_token_ids, pad_token_id
from covipal.models import VisionLanguageModel
from covipal.pruning import POSITION_POLICIES
from covipal_export import names
from covipal_export.export.awq import apply_awq_scales, calibration_prompts, check_awq_model
from covipal_export.export.awq import library as awq_library
from covipal_export.export.graphs import (
    graph_specs,
    kv_cache_shape,
    kv_methods,
    kv_variant_manifest,
    kv_variant_spec,
    shape_ranges,
)
from covipal_export.export.onnx_export import DEFAULT_OPSET, EXPORTER, OPSETS, export_graph
from covipal_export.export.pruning_choice import check_strategy, choose_pruning
from covipal_export.export.quantize import QuantOptions, quantize_export
from covipal_export.export.references import References, compute_references
from covipal_export.export.verify import Report, verify_export
from covipal_export.manifest import (
    FORMAT_VERSION,
    DecoderSpec,
    GraphSpec,
    KVVariantSpec,
    Manifest,
    ModelSpec,
    PruningSpec,
    Resources,
    ShapeRanges,
    SpecialTokens,
    StepResources,
    TokenizerSpec,
    Versions,
    describe_files,
    save_manifest,
)
from covipal_export.memory import GIB, gib, peak_rss_bytes, release_memory, total_bytes
from covipal_export.runtime.reference import DTYPES, load_reference_model


@dataclass
class ExportOptions:
    """What to export; checked on creation (one-line CovipalErrors)."""

    model: str
    budget: Budget  # the manifest's default budget; "all" exports with N
    out: Path | None = None  # default: engines/<model>-b<budget> (names.DEFAULT_ROOT)
    dtype: Literal["fp32", "fp16"] = "fp32"
    strategy: str | None = None  # None: the PPM if there is one, else the measured default (pruning_choice)
    ppm: Path | None = None  # a trained PPM checkpoint directory
    position_policy: Literal["keep", "compact"] = "keep"  # the manifest's default; the graphs serve both
    model_path: Path | None = None  # a local checkpoint directory (LLaVA aliases)
    random_weights: bool = False
    layers: int | None = None  # fewer decoder layers, with random weights
    opset: int = DEFAULT_OPSET
    logits: Literal["last", "all"] = "last"  # decoder.onnx returns logits for the last position or for all
    max_batch: int = 8
    seed: int = 0  # torch's seed while random weights are built
    force: bool = False  # replace an existing export directory
    verify: bool = True
    quantization: QuantOptions = field(default_factory=QuantOptions)  # weight-only INT8/INT4 decoder
    kv_variant: bool = False  # also decoder_kv.onnx, the decoder on a compressed KV cache (its weights a second time)

    def __post_init__(self) -> None:
        self.budget = check_budget(self.budget)  # checked against N once the model is loaded
        choices = {"dtype": (self.dtype, tuple(DTYPES)), "opset": (self.opset, OPSETS),
                   "position_policy": (self.position_policy, POSITION_POLICIES),
                   "logits": (self.logits, ("last", "all"))}
        for name, (value, allowed) in choices.items():
            if value not in allowed:
                raise CovipalError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
        if self.layers is not None and not self.random_weights:
            raise CovipalError("--layers needs --random-weights (pretrained weights keep all their layers)")
        check_strategy(self.strategy, self.ppm)
        if self.kv_variant and self.quantization.bits is not None:
            raise CovipalError("--kv-variant with --quant is not supported yet: decoder_kv.onnx would keep the "
                               "unquantized weights")
        name = f"{self.model}-{ALL}" if self.budget == ALL else f"{self.model}-b{self.budget}"
        self.out = Path(self.out) if self.out is not None else names.DEFAULT_ROOT / name


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest  # its `resources` hold the time and peak memory of each step
    report: Report | None = None


class VerificationFailed(Exception):
    """The export ran but does not match PyTorch: a bug, reported with its table; nothing was kept."""

    def __init__(self, report: Report):
        super().__init__("the exported graphs do not match PyTorch")
        self.report = report


def export_model(options: ExportOptions) -> ExportResult:
    """Export as `options` say; returns the final directory, its manifest (with the time and peak memory of each
    step) and the verification report."""
    parent = writable_parent(options.out, options.force)
    calibration = options.quantization.calibration_set(options.model)  # refused here, before anything is exported
    steps: dict[str, StepResources] = {}
    quantize = options.quantization.bits is not None
    awq = options.quantization.method == "awq"
    if awq:
        awq_library()  # refused here without ModelOpt, before anything is exported
    count = 5 + len(names.STAGES) + quantize + awq + options.verify + options.kv_variant
    with tqdm(total=count, unit="step", leave=False, disable=None, file=sys.stderr) as bar:
        with _step(bar, steps, "load model"):
            model = load_reference_model(options.model, dtype=options.dtype, path=options.model_path,
                                         random_weights=options.random_weights, num_layers=options.layers,
                                         seed=options.seed)
            budget = resolve_budget(options.budget, model.num_visual_tokens, options.model)
            strategy, pruning = choose_pruning(model, options.strategy, options.ppm, budget,
                                               options.position_policy, options.seed, options.random_weights)
            ranges = shape_ranges(model, options.max_batch)
            if awq:
                check_awq_model(model)
        references: References | None = None
        if options.verify:
            with _step(bar, steps, "PyTorch references"):
                references = compute_references(model, strategy, budget, options.position_policy,
                                                options.logits == "last", kv_methods=kv_methods(options.kv_variant))
        if awq:
            with _step(bar, steps, "AWQ scales"):
                prompts = calibration_prompts(model, strategy, budget, options.position_policy, calibration)
                apply_awq_scales(model.language_model, prompts, options.quantization.block)
                del prompts
        scratch = make_scratch(parent, options.out)
        try:
            graphs = {}
            for spec in graph_specs(model, strategy, ranges, budget, options.logits == "last"):
                with _step(bar, steps, f"export {names.GRAPH_FILES[spec.stage]}"):
                    graphs[spec.stage] = export_graph(spec, scratch, options.opset)
                    if spec.stage == names.VISION:
                        release_weights(model.vision)  # no later graph reads the vision tower
                    release_memory()  # and what the exporter made for this graph
            kv_variant = None
            if options.kv_variant:
                with _step(bar, steps, f"export {names.KV_DECODER_FILE}"):
                    kv_variant = kv_variant_manifest(model, export_graph(kv_variant_spec(model, ranges), scratch,
                                                                         options.opset))
                    release_memory()
            with _step(bar, steps, "manifest"):
                manifest = write_manifest(scratch, model, options, pruning, ranges, graphs, kv_variant)
                release_weights(model)  # ONNX Runtime gets the memory the PyTorch model held
                del model, strategy, spec
                release_memory()
            if quantize:
                with _step(bar, steps, f"quantize {options.quantization.quant}"):
                    manifest = quantize_export(scratch, manifest, options.quantization, calibration, awq_scaled=awq)
            report = None
            if references is not None:
                with _step(bar, steps, "verify"):
                    report = verify_export(scratch, references=references)
                if not report.passed:
                    raise VerificationFailed(report)
            manifest.resources = Resources(round(sum(step.seconds for step in steps.values()), 1), peak_rss_bytes(),
                                           steps, machine())
            save_manifest(manifest, scratch)  # not among its own files: the checksums verified still hold
            install(scratch, options.out)
        except BaseException:
            shutil.rmtree(scratch, ignore_errors=True)
            raise
    if report is not None:
        report.directory = options.out
    return ExportResult(options.out, manifest, report)


def release_weights(module: torch.nn.Module) -> None:
    """Empty every parameter and buffer of `module` in place: the exporter keeps references to the tensor objects
    it exported (onnxscript's rewrite rules hold the last graph they matched), not to their memory."""
    for tensor in [*module.parameters(), *module.buffers()]:
        tensor.data = torch.empty(0, dtype=tensor.dtype)


@contextlib.contextmanager
def _step(bar: tqdm, steps: dict[str, StepResources], name: str):
    """Show a step on the progress bar; record its wall time and the peak resident memory so far."""
    bar.set_description(name)
    start = time.perf_counter()
    try:
        yield
    finally:
        steps[name] = StepResources(round(time.perf_counter() - start, 1), peak_rss_bytes())
        bar.update()


def machine() -> str:
    """"2 CPUs, 23.4 GiB RAM" (Linux; the CPU count alone elsewhere)."""
    try:
        memory = f", {total_bytes() / GIB:.1f} GiB RAM"
    except (ValueError, OSError, AttributeError):
        memory = ""
    return f"{os.cpu_count()} CPUs{memory} ({platform.machine()})"


def write_manifest(directory: Path, model: VisionLanguageModel, options: ExportOptions, pruning: PruningSpec,
                   ranges: ShapeRanges, graphs: dict[str, GraphSpec], kv_variant: KVVariantSpec | None) -> Manifest:
    """Copy the tokenizer files, then describe everything in `directory/manifest.json`."""
    tokenizer = save_tokenizer(model, directory)
    num_layers, num_kv_heads, head_dim = kv_cache_shape(model)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model=model_spec(model, options),
        pruning=pruning,
        shapes=ranges,
        graphs=graphs,
        decoder=DecoderSpec(options.logits, num_layers, num_kv_heads, head_dim),
        preprocessing=model.processor.image_preprocessing if model.processor else None,
        tokenizer=tokenizer,
        special_tokens=special_tokens(model),
        versions=Versions(covipal_export.__version__, torch.__version__, transformers.__version__, onnx.__version__,
                          onnxscript.__version__, options.opset, EXPORTER),
        files=describe_files(directory),
        kv_variant=kv_variant,
    )
    save_manifest(manifest, directory)
    return manifest


def writable_parent(out: Path, force: bool) -> Path:
    """The existing directory the temp dir goes in (so the final rename stays on one file system)."""
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise CovipalError(f"{out} exists and is not a directory")
        if not force:
            raise CovipalError(f"{out} already exists; pass --force to replace it")
        if any(out.iterdir()) and not (out / names.MANIFEST_FILE).is_file():
            raise CovipalError(f"{out} is not an export directory (no {names.MANIFEST_FILE}); not replacing it")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise CovipalError(f"cannot create {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise CovipalError(f"cannot create {out}: {parent} is not writable")
    return parent


def make_scratch(parent: Path, out: Path) -> Path:
    """An empty directory in `parent` with the permissions of a normal new directory (mkdtemp gives 0700)."""
    try:
        scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=parent))
    except OSError as exc:
        raise CovipalError(f"cannot create {out}: {exc.strerror}") from None
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)
    return scratch


def install(scratch: Path, out: Path) -> None:
    """Move the finished export into place; an old export (--force) is removed only once the new one is in."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():
        os.rename(scratch, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    try:
        os.rename(scratch, out)
    except OSError:
        os.rename(old / out.name, out)
        raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def model_spec(model: VisionLanguageModel, options: ExportOptions) -> ModelSpec:
    return ModelSpec(
        name=options.model, source=model.info.source,
        path=str(Path(options.model_path).resolve()) if options.model_path else None,
        random_weights=options.random_weights, seed=options.seed, dtype=options.dtype,
        hidden_size=model.hidden_size, vocab_size=model.text_config.vocab_size, image_size=model.image_size,
        num_visual_tokens=model.num_visual_tokens, image_token_id=model.image_token_id,
        random_init=model.info.random_init,
    )


def save_tokenizer(model: VisionLanguageModel, directory: Path) -> TokenizerSpec | None:
    """Copy the tokenizer files into `directory/tokenizer`; None for a model built without one."""
    processor = model.processor
    if processor is None:
        return None
    processor.tokenizer.save_pretrained(directory / names.TOKENIZER_DIR)
    return TokenizerSpec(names.TOKENIZER_DIR, processor.chat_template, processor.image_token,
                         processor.num_image_tokens, processor.add_special_tokens)


def special_tokens(model: VisionLanguageModel) -> SpecialTokens:
    """The ids generation uses: EOS as covipal's generate sees it, pad as it fills finished rows."""
    config = model.text_config
    bos = model.processor.tokenizer.bos_token_id if model.processor else config.bos_token_id
    return SpecialTokens(image=model.image_token_id, bos=bos, eos=eos_token_ids(model), pad=pad_token_id(model))


def describe(result: ExportResult) -> str:
    """A few lines for the terminal: where, what, how long, how much memory (the peak so far after each step)."""
    manifest = result.manifest
    resources = manifest.resources
    quantized = manifest.quantization
    weights = f"{manifest.model.dtype}, decoder {quantized.summary()}" if quantized else manifest.model.dtype
    lines = [f"exported {manifest.model.name} ({weights}, opset {manifest.versions.opset}) to "
             f"{result.directory} in {resources.seconds:.1f} s, peak RSS {gib(resources.peak_rss_bytes)}",
             f"  pruning: {manifest.pruning.strategy}, default budget {manifest.pruning.default_budget} of "
             f"{manifest.model.num_visual_tokens}, positions {manifest.pruning.position_policy} "
             f"({manifest.pruning.note})"]
    graphs = [*manifest.graphs.values(), *([manifest.kv_variant.graph] if manifest.kv_variant else [])]
    sizes = {f"export {g.file}": f"{_mib(manifest, g.file, g.external_data):9.1f} MiB" for g in graphs}
    if quantized:
        decoder = manifest.graphs[names.DECODER]
        sizes[f"export {decoder.file}"] = ""  # the file now holds the quantized weights
        trt_data = quantized.trt_file + ".data"  # beside it when the QDQ form passes 2 GB
        ort_form = _mib(manifest, decoder.file, decoder.external_data)
        trt_form = _mib(manifest, quantized.trt_file, trt_data if trt_data in manifest.files else None)
        sizes[f"quantize int{quantized.bits}"] = f"{ort_form:9.1f} MiB (+ {trt_form:.1f} MiB {quantized.trt_file})"
    for name, step in resources.steps.items():
        lines.append(f"  {name:<20} {step.seconds:6.1f} s  peak {gib(step.peak_rss_bytes):>9}  "
                     f"{sizes.get(name, '')}".rstrip())
    return "\n".join(lines)


def _mib(manifest: Manifest, *files: str | None) -> float:
    return sum(manifest.files[f].bytes for f in files if f) / 2**20
