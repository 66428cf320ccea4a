"""`python -m covipal_export.bench`: latency and memory per (backend, weights, budget), measured interleaved.

    export (or reuse) DIR in --work-dir, or take --export DIR as it is
      -> a quantized copy of it per int8/int4 variant (DIR-int4, ...)
      -> one worker process per (backend, variant) -> warm-up + repeats rounds, each round one call per
      (budget, backend, variant), alternating the order -> medians [min-max] -> ratios -> tables, JSON, plot

The budget N (no pruning) is always measured: it is the reference of the pruned/unpruned ratios; the first
variant is the reference of the quantized/unquantized ones.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import NoReturn

from tqdm import tqdm

import covipal
from covipal.budget import ALL, Budget, parse_budgets, resolve_budget
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.modeling_ppm import WEIGHTS_FILE
from covipal.models import MODEL_NAMES
from covipal.strategies import STRATEGY_NAMES
from covipal_export.bench.report import (
    lane,
    plot,
    ratios,
    ratios_table,
    records_table,
    require_matplotlib,
    summarize,
)
from covipal_export.bench.worker import BACKEND_NAMES, WorkerSpec, device_name, serve
from covipal_export.engine_info import engine_path
from covipal_export.export.pruning_choice import ppm_checkpoint
from covipal_export.export.quantize import QUANT_BITS, UNCALIBRATED, QuantOptions, quantize_export
from covipal_export.manifest import Manifest, load_manifest
from covipal_export.memory import total_bytes
from covipal_export.names import DECODER, DEFAULT_ROOT, MANIFEST_FILE, STAGES

DEFAULT_WORK_DIR = DEFAULT_ROOT / "bench"
DEFAULT_IMAGE = Path(covipal.__file__).parent / "assets" / "astronaut.jpg"
DEFAULT_QUESTION = "What is the person in this picture wearing, and what is in the background behind them?"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal_export.bench", description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", choices=MODEL_NAMES, metavar="NAME",
                        help=f"registered model, exported (or reused) in --work-dir: {', '.join(MODEL_NAMES)}")
    source.add_argument("--export", type=Path, default=None, metavar="DIR",
                        help="an export directory measured as it is (quantized or not; its manifest says what it "
                             "holds): no export options apply")
    parser.add_argument("--budgets", required=True,
                        help=f"comma-separated visual-token budgets; '{ALL}' = N (always measured, as the reference)")
    parser.add_argument("--backends", required=True, help=f"comma-separated, from: {', '.join(BACKEND_NAMES)}")
    parser.add_argument("--variants", default=None, metavar="LIST",
                        help="comma-separated decoder weights measured side by side: the export's own (its --dtype, "
                             "or its quantization with --export) and int8, int4 (a copy of the export with export.py's "
                             "--quant, RTN, its default block), int4-q4_1 (--quant-method q4_1); default: the "
                             "export's own alone")
    parser.add_argument("--quant-lm-head", action="store_true",
                        help="the int8/int4 variants quantize the LM head too (export.py's --quant-lm-head)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the records as JSON to OUT")
    parser.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                        help="plot the records (needs matplotlib)")
    parser.add_argument("--random-weights", action="store_true", help="the architecture with seeded random weights")
    parser.add_argument("--layers", type=positive_int, default=None,
                        help="decoder layers to build, with --random-weights (stated in the output)")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default=None, help="default: fp32")
    parser.add_argument("--strategy", choices=STRATEGY_NAMES, default=None, metavar="S",
                        help="pruning strategy of the export (default: export.py's: a random PPM for --random-weights, "
                             "mini-llava's bundled PPM, else the measured training-free default)")
    parser.add_argument("--ppm", type=Path, default=None, help="trained PPM checkpoint directory for the export")
    parser.add_argument("--work-dir", type=Path, default=DEFAULT_WORK_DIR,
                        help="where exports are cached and reused (default: %(default)s)")
    parser.add_argument("--verify", action=argparse.BooleanOptionalAction, default=True,
                        help="verify a new export against PyTorch (default: on)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed rounds (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default: %(default)s)")
    parser.add_argument("--new-tokens", type=positive_int, default=32,
                        help="tokens generated per call, EOS ignored (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, default=os.cpu_count() or 1,
                        help="torch threads and ONNX Runtime intra-op threads (default: the CPU count, %(default)s)")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="default: the bundled astronaut.jpg")
    parser.add_argument("--question", default=DEFAULT_QUESTION, help="default: %(default)r")
    parser.add_argument("--text-tokens", type=positive_int, default=40,
                        help="non-image prompt tokens of the synthetic prompt used when the export has no tokenizer "
                             "(default: %(default)s)")
    return parser


def parse_backends(text: str) -> list[str]:
    backends = list(dict.fromkeys(part.strip() for part in text.split(",")))
    for name in backends:
        if name not in BACKEND_NAMES:
            raise CovipalError(f"unknown backend {name!r} in --backends; choose from: {', '.join(BACKEND_NAMES)}")
    return backends


def parse_variants(text: str | None, own: str, quantized: bool = False) -> list[str]:
    """The decoder weights to measure, in order: the export's own (its dtype, or its quantization) and/or int8, int4,
    int4-q4_1 (copies of an unquantized export)."""
    if text is None:
        return [own]
    variants = list(dict.fromkeys(part.strip() for part in text.split(",")))
    for name in variants:
        if name == own:
            continue
        variant_options(name, lm_head=False)  # a variant the bench cannot make is refused here
        if quantized:
            raise CovipalError(f"--variants {name}: the export is already quantized ({own}); a quantized copy is made "
                               f"from an unquantized export")
    return variants


def own_variant(manifest: Manifest) -> str:
    """An export's own decoder weights as a variant name: its dtype, or int8 / int4 / int4-q4_1 ..."""
    quantization = manifest.quantization
    if quantization is None:
        return manifest.model.dtype
    return f"int{quantization.bits}" + ("" if quantization.method == "rtn" else f"-{quantization.method}")


def given_export(args) -> tuple[Path, Manifest]:
    """--export DIR, checked (manifest and checksums) and measured as it is; export options are refused with it."""
    from covipal_export.runtime.export_dir import open_export

    given = [flag for flag, value in (("--random-weights", args.random_weights), ("--layers", args.layers),
                                      ("--dtype", args.dtype), ("--strategy", args.strategy), ("--ppm", args.ppm))
             if value]
    if given:
        raise CovipalError(f"{', '.join(given)} make an export; --export measures {args.export} as it was exported")
    return args.export, open_export(args.export)


def variant_options(variant: str, lm_head: bool) -> QuantOptions:
    """A quantized variant's options: QUANT or QUANT-METHOD (int8, int4, int4-q4_1; methods without calibration)."""
    quant, _, method = variant.partition("-")
    if quant not in QUANT_BITS or quant == "none" or (method and method not in UNCALIBRATED):
        choices = ", ".join(["int8", "int4", *(f"int4-{m}" for m in UNCALIBRATED)])
        raise CovipalError(f"unknown variant {variant!r} in --variants; choose from the export's --dtype, {choices}")
    return QuantOptions(quant, method=method or None, lm_head=lm_head)


def resolve_budgets(budgets: list[Budget], num_visual: int) -> list[int]:
    """Descending budgets with N first (the unpruned reference); a budget over N is refused."""
    return sorted({num_visual, *(resolve_budget(b, num_visual) for b in budgets)}, reverse=True)


def export_name(args) -> str:
    """The cache directory of an export made with these options."""
    parts = [args.model, "random" if args.random_weights else None, f"L{args.layers}" if args.layers else None,
             args.dtype, args.strategy, f"ppm-{args.ppm.resolve().name}" if args.ppm else None]
    return "-".join(p for p in parts if p)


def mismatch(directory: Path, manifest: Manifest, args) -> str | None:
    """Why the existing export in `directory` does not match the options, or None."""
    model, pruning = manifest.model, manifest.pruning
    checks = [("model", model.name, args.model), ("random weights", model.random_weights, args.random_weights),
              ("dtype", model.dtype, args.dtype)]
    if args.layers:
        checks.append(("decoder layers", manifest.decoder.num_layers, args.layers))
    if args.strategy:
        checks.append(("strategy", pruning.strategy, args.strategy))
    ppm = ppm_checkpoint(args.model, args.strategy, args.ppm)  # the PPM export.py would use
    if ppm:
        checks.append(("PPM", pruning.ppm and pruning.ppm.checkpoint, str(ppm.resolve())))
    why = next((f"{what} is {have}, not {want}" for what, have, want in checks if have != want), None)
    if why is None and ppm and (ppm / WEIGHTS_FILE).stat().st_mtime > (directory / MANIFEST_FILE).stat().st_mtime:
        why = f"the PPM checkpoint {ppm} changed after the export"
    return why


def prepared_export(args) -> tuple[Path, Manifest]:
    """A valid export for the options in --work-dir: reused when its manifest and checksums match, else made."""
    from covipal_export.export.exporter import ExportOptions, describe, export_model
    from covipal_export.runtime.export_dir import open_export

    directory = args.work_dir / export_name(args)
    if directory.exists():
        try:
            manifest = open_export(directory)
            why = mismatch(directory, manifest, args)
        except CovipalError as exc:
            why = str(exc)
        if why is None:
            print(f"reusing the export in {directory}", file=sys.stderr)
            return directory, manifest
        print(f"exporting again into {directory}: {why}", file=sys.stderr)
    options = ExportOptions(model=args.model, budget=1, out=directory, dtype=args.dtype, strategy=args.strategy,
                            ppm=args.ppm, random_weights=args.random_weights, layers=args.layers,
                            force=directory.exists(), verify=args.verify)
    result = export_model(options)
    print(describe(result), file=sys.stderr)
    return directory, result.manifest


def quantized_variant(base: Path, variant: str, lm_head: bool) -> tuple[Path, Manifest]:
    """`base` with its decoder quantized as `variant` (int8, int4) in `base`-`variant`[-lm-head]: reused when its
    manifest says so and is newer than the base's, else copied from `base` and quantized (a temp dir renamed at the
    end)."""
    from covipal_export.runtime.export_dir import open_export

    options = variant_options(variant, lm_head)
    directory = base.with_name(f"{base.name}-{variant}" + ("-lm-head" if lm_head else ""))
    if directory.exists():
        try:
            manifest = open_export(directory)
            fresh = (options.made(manifest.quantization)
                     and (directory / MANIFEST_FILE).stat().st_mtime >= (base / MANIFEST_FILE).stat().st_mtime)
        except CovipalError:
            fresh = False
        if fresh:
            print(f"reusing the {variant} export in {directory}", file=sys.stderr)
            return directory, manifest
    print(f"quantizing a copy of {base} to {variant} in {directory}", file=sys.stderr)
    scratch = directory.with_name(directory.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    try:
        shutil.copytree(base, scratch)
        manifest = quantize_export(scratch, load_manifest(scratch), options)
        shutil.rmtree(directory, ignore_errors=True)
        scratch.rename(directory)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return directory, manifest


class Workers:
    """One process per lane (a backend on one variant's export; spawned: no forked torch state), driven one request
    at a time."""

    def __init__(self, specs: dict[str, WorkerSpec]):
        context = multiprocessing.get_context("spawn")
        self.conns, self.processes, self.info, self.skipped = {}, {}, {}, {}
        for name, spec in specs.items():
            parent, child = context.Pipe()
            process = context.Process(target=serve, args=(child, spec), daemon=True)
            process.start()
            child.close()
            self.conns[name], self.processes[name] = parent, process
        try:
            for name in list(self.conns):  # all load at once, then each says ready or why not
                try:
                    self.info[name] = self._reply(name)
                except CovipalError as exc:
                    self.skipped[name] = str(exc)
                    self._stop(name)
        except BaseException:
            self.close()
            raise

    def measure(self, name: str, budget: int) -> dict:
        self.conns[name].send(budget)
        return self._reply(name)

    def _reply(self, name: str) -> dict:
        try:
            kind, payload = self.conns[name].recv()
        except EOFError:
            self.processes[name].join(5)
            code = self.processes[name].exitcode
            raise RuntimeError(f"the {name} worker died (exit code {code}; out of memory?)") from None
        if kind == "error":
            raise CovipalError(payload)
        if kind == "bug":
            raise RuntimeError(f"the {name} worker failed:\n{payload}")
        return payload

    def _stop(self, name: str) -> None:
        conn, process = self.conns.pop(name), self.processes.pop(name)
        try:
            conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        conn.close()
        process.join(30)
        if process.is_alive():
            process.terminate()
            process.join()

    def close(self) -> None:
        for name in list(self.conns):
            self._stop(name)

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure_all(workers: Workers, lanes: list[str], budgets: list[int], warmup: int,
                repeats: int) -> dict[tuple[str, int], list[dict]]:
    """Rounds of one call per (budget, lane), order reversed every other round; warm-up rounds dropped."""
    order = [(budget, name) for budget in budgets for name in lanes]
    samples: dict[tuple[str, int], list[dict]] = defaultdict(list)
    with tqdm(total=(warmup + repeats) * len(order), unit="call", leave=False, disable=None, file=sys.stderr) as bar:
        for round_ in range(warmup + repeats):
            for budget, name in order if round_ % 2 == 0 else order[::-1]:
                bar.set_description(f"{'warm-up' if round_ < warmup else 'timed'} {name} k={budget}")
                sample = workers.measure(name, budget)
                if round_ >= warmup:
                    samples[(name, budget)].append(sample)
                bar.update()
    return samples


def model_size_mb(directory: Path, manifest: Manifest, backend: str, stages: tuple[str, ...] = STAGES) -> float | None:
    """On disk: the ONNX graphs of `stages` (with external weights) for ort, their engines for trt; None for torch."""
    if backend == "ort":
        graphs = [manifest.graphs[stage] for stage in stages]
        return sum(manifest.files[f].bytes for g in graphs for f in (g.file, g.external_data) if f) / 2**20
    if backend == "trt":
        engines = [p for p in (engine_path(directory, stage) for stage in stages) if p.is_file()]
        return sum(p.stat().st_size for p in engines) / 2**20 if engines else None
    return None


def machine_info(threads: int) -> dict:
    import onnxruntime
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
               platform.processor())
    memory = total_bytes() / 2**30
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "memory_gib": round(memory, 1), "gpu": device_name(),
            "threads": threads, "load_average_start": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__}


def model_info(directory: Path, manifest: Manifest, args, prompt_length: int) -> dict:
    from covipal.models.registry import LLAVA_SPECS

    model, pruning = manifest.model, manifest.pruning
    full_layers = LLAVA_SPECS[model.name].num_layers if model.name in LLAVA_SPECS else manifest.decoder.num_layers
    info = {"name": model.name, "random_weights": model.random_weights, "dtype": model.dtype,
            "decoder_layers": manifest.decoder.num_layers, "full_decoder_layers": full_layers,
            "hidden_size": model.hidden_size, "vocab_size": model.vocab_size, "num_visual_tokens":
            model.num_visual_tokens, "text_tokens": prompt_length - model.num_visual_tokens,
            "prompt": "synthetic" if manifest.tokenizer is None else {"image": str(args.image),
                                                                      "question": args.question},
            "strategy": pruning.strategy, "pruning_note": pruning.note, "export_dir": str(directory)}
    if pruning.ppm is not None:
        from covipal.modeling_ppm import PPMConfig, PruningModule

        ppm = PruningModule(PPMConfig(**pruning.ppm.config))
        info["ppm_params"] = ppm.num_parameters()
        info["ppm_gflops"] = round(ppm.flops(model.num_visual_tokens, info["text_tokens"]) / 1e9, 3)
    return info


def describe_run(model: dict, machine: dict, settings: dict) -> str:
    layers = model["decoder_layers"]
    reduced = (f" ({layers} of its {model['full_decoder_layers']} decoder layers, --layers {layers})"
               if layers != model["full_decoder_layers"] else f" ({layers} decoder layers)")
    weights = "random weights" if model["random_weights"] else "its weights"
    return "\n".join([
        f"model: {model['name']}{reduced}, {weights}, {model['dtype']}; D={model['hidden_size']}, "
        f"N={model['num_visual_tokens']} visual + T={model['text_tokens']} text tokens; pruning: {model['strategy']}"
        + (f" ({model['ppm_gflops']} GFLOPs)" if "ppm_gflops" in model else ""),
        f"machine: {machine['cpu']}, {machine['cpu_count']} CPUs, {machine['memory_gib']} GiB, GPU: "
        f"{machine['gpu'] or 'none'}; {settings['threads']} threads; load average at start "
        f"{machine['load_average_start'][0]}",
        f"decoder weights: {'; '.join(settings['variants'].values())}",
        f"calls: {settings['warmup']} warm-up + {settings['repeats']} timed rounds, interleaved; "
        f"{settings['new_tokens']} new tokens per call; medians [min-max]; peak RSS: each backend's own process, "
        f"{settings['peak_mode']}",
    ])


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    requested_budgets, backends = parse_budgets(args.budgets), parse_backends(args.backends)
    if args.export:
        directory, manifest = given_export(args)
        own = own_variant(manifest)
    else:
        args.dtype = own = args.dtype or "fp32"
    variants = parse_variants(args.variants, own, quantized=bool(args.export and manifest.quantization))
    if args.plot:
        require_matplotlib()
    if args.warmup < 0:
        raise CovipalError(f"--warmup must be 0 or more, got {args.warmup}")
    if args.quant_lm_head and variants == [own]:
        raise CovipalError("--quant-lm-head needs an int8 or int4 variant in --variants")
    if args.layers and not args.random_weights:
        raise CovipalError("--layers needs --random-weights (pretrained weights keep all their layers)")
    quiet_libraries()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by the workers
    if not args.export:
        directory, manifest = prepared_export(args)
    num_visual = manifest.model.num_visual_tokens
    budgets = resolve_budgets(requested_budgets, num_visual)
    exports = {v: (directory, manifest) if v == own else quantized_variant(directory, v, args.quant_lm_head)
               for v in variants}
    machine = machine_info(args.threads)
    lanes = {lane(b, v): (b, v) for b in backends for v in variants}
    specs = {name: WorkerSpec(str(exports[v][0]), b, args.threads, str(args.image), args.question, args.text_tokens,
                              args.new_tokens, None) for name, (b, v) in lanes.items()}
    with Workers(specs) as workers:
        for name, why in workers.skipped.items():
            print(f"{name}: skipped: {why}", file=sys.stderr)
        live = [name for name in lanes if name in workers.info]
        if not live:
            raise CovipalError(f"no backend could run: {'; '.join(f'{n}: {w}' for n, w in workers.skipped.items())}")
        start = time.perf_counter()
        samples = measure_all(workers, live, budgets, args.warmup, args.repeats)
        seconds = time.perf_counter() - start
    first = workers.info[live[0]]
    settings = {"repeats": args.repeats, "warmup": args.warmup, "new_tokens": args.new_tokens,
                "threads": args.threads, "peak_mode": first["peak_mode"], "seconds": round(seconds, 1),
                "variants": {v: exports[v][1].decoder_weights() for v in variants},
                "load_average_end": [round(x, 2) for x in os.getloadavg()]}
    model = model_info(directory, manifest, args, first["prompt_length"])
    records = []
    for name in live:
        (backend, variant), (where, exported) = lanes[name], exports[lanes[name][1]]
        extra = {"variant": variant, "runtime": workers.info[name]["backend"],
                 "model_mb": model_size_mb(where, exported, backend),
                 "decoder_mb": model_size_mb(where, exported, backend, (DECODER,))}
        records += [summarize(samples[(name, k)], backend, k, num_visual, extra) for k in budgets]
    rows = ratios(records, model["text_tokens"], variants[0])
    print(describe_run(model, machine, settings))
    print(f"\n{records_table(records)}\n\n{ratios_table(rows)}")
    for name in live:
        print(f"{name}: {workers.info[name]['reason']}; loaded in {workers.info[name]['load_s']} s", file=sys.stderr)
    if args.json:
        report = {"machine": machine, "model": model, "settings": settings, "records": records, "ratios": rows,
                  "skipped": [{"backend": lanes[n][0], "variant": lanes[n][1], "reason": w}
                              for n, w in workers.skipped.items()],
                  "workers": {name: workers.info[name] for name in live}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.plot:
        title = describe_run(model, machine, settings).splitlines()[0]
        plot(records, model["text_tokens"], title, args.plot)
    return 0


def console() -> NoReturn:
    """The `covipal-bench` command (also `python -m covipal_export.bench`)."""
    run(main)
