"""A Triton model repository for one export: two Python-backend models on one `Pipeline` each per instance.

    REPO/covipal/config.pbtxt          IMAGE, QUESTION [, BUDGET, MAX_NEW_TOKENS, TEMPERATURE, SEED] ->
    REPO/covipal/1/model.py            ANSWER, TOKENS_KEPT, TOKENS_TOTAL, TIMINGS; dynamic batching
    REPO/covipal_stream/config.pbtxt   the same inputs, decoupled: TEXT pieces, then the full outputs
    REPO/covipal_stream/1/model.py
    REPO/covipal/export/               the export itself, with --copy (else config.pbtxt references it)

config.pbtxt records the export's path and its manifest's sha256; a model refuses to load when the
manifest differs, and the Pipeline refuses any file that differs from the manifest.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.manifest import sha256_of
from covipal_export.runtime.export_dir import open_export
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.serve.request import MB, Limits
from covipal_export.triton import handler

MODEL, STREAM_MODEL = "covipal", "covipal_stream"
COPY_DIR = "export"  # under REPO/covipal/, with --copy (Triton reads numbered version directories only)


@dataclass
class RepositoryOptions:
    export_dir: Path
    out: Path
    instances: int = 1  # model instances (Pipelines) per model
    max_batch: int = 8  # Triton's max_batch_size; 1: no dynamic batching
    backend: str = "auto"
    copy: bool = False  # copy the export into the repository instead of referencing it
    threads: int = 0  # ONNX Runtime intra-op threads per instance (0: its default)
    max_queue_delay_us: int = 2000  # how long the dynamic batcher waits to fill a batch
    max_image_mb: int = 16
    max_new_tokens: int = 256  # the most a request may ask for
    stream_instances: int = 1


def write_repository(options: RepositoryOptions) -> Path:
    """Write the repository (refusing an existing non-empty `out`); returns `out`."""
    source = options.export_dir.resolve()
    manifest = open_export(source)  # checks every file against the manifest now, not at load time on a server
    if not 1 <= options.max_batch <= manifest.shapes.max_batch:
        raise CovipalError(f"--max-batch must be in 1..{manifest.shapes.max_batch} (the export's max batch), "
                           f"got {options.max_batch}")
    out = options.out
    if out.exists() and any(out.iterdir()):
        raise CovipalError(f"{out} exists and is not empty: choose another --out or remove it")
    reference = str(source)
    if options.copy:
        shutil.copytree(source, out / MODEL / COPY_DIR)
        reference = f"{MODEL}/{COPY_DIR}"  # relative to the repository
    params = {"export_dir": reference, "manifest_sha256": sha256_of(source / names.MANIFEST_FILE),
              "backend": options.backend, "threads": str(options.threads),
              "max_image_bytes": str(options.max_image_mb * MB), "max_new_tokens": str(options.max_new_tokens)}
    model_file = Path(__file__).with_name("model.py")
    for name, text in ((MODEL, _config(MODEL, options, params, stream=False)),
                       (STREAM_MODEL, _config(STREAM_MODEL, options, params, stream=True))):
        (out / name / "1").mkdir(parents=True, exist_ok=True)
        (out / name / "config.pbtxt").write_text(text)
        shutil.copyfile(model_file, out / name / "1" / "model.py")
    return out


def open_pipeline(repository: Path, params: dict[str, str]) -> tuple[Pipeline, Limits]:
    """What a model instance opens in `initialize`: the export (manifest sha256 checked), then its Pipeline."""
    directory = Path(params["export_dir"])
    directory = directory if directory.is_absolute() else repository / directory
    manifest_file = directory / names.MANIFEST_FILE
    if not manifest_file.is_file():
        raise CovipalError(f"the export {directory} this repository references has no {names.MANIFEST_FILE}")
    if sha256_of(manifest_file) != params["manifest_sha256"]:
        raise CovipalError(f"{manifest_file} is not the manifest this repository was written for (sha256 differs): "
                           f"write the repository again with `python -m covipal_export.triton`")
    threads = int(params["threads"]) or None
    pipe = Pipeline.from_dir(directory, backend=params["backend"], threads=threads)
    return pipe, Limits(int(params["max_image_bytes"]), int(params["max_new_tokens"]))


def _config(name: str, options: RepositoryOptions, params: dict[str, str], stream: bool) -> str:
    batched = not stream
    dims = "[ 1 ]"
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {options.max_batch if batched else 0}"]
    for tensor, dtype in handler.INPUTS.items():
        optional = " optional: true" if tensor in handler.OPTIONAL else ""
        lines.append(f'input {{ name: "{tensor}" data_type: {dtype} dims: {dims}{optional} }}')
    for tensor, dtype in (handler.STREAM_OUTPUTS if stream else handler.OUTPUTS).items():
        lines.append(f'output {{ name: "{tensor}" data_type: {dtype} dims: {dims} }}')
    count = options.stream_instances if stream else options.instances
    lines.append(f"instance_group [ {{ count: {count} kind: KIND_CPU }} ]")
    if batched and options.max_batch > 1:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {options.max_queue_delay_us} }}")
    if stream:
        lines.append("model_transaction_policy { decoupled: true }")
    for key, value in params.items():
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"
