"""The layout's promises: a runtime without export code, strict engine metadata, console commands that resolve."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

from covipal.errors import CovipalError
from covipal_export import names
from covipal_export.engine_info import EngineInfo, Profile, TensorInfo, read_engine_info, write_engine_info

ROOT = Path(__file__).resolve().parents[1]
EXPORT_MODULES = ("onnx", "onnxscript", "torch.onnx", "onnx_ir", "onnx_graphsurgeon")
REPORT = ("import atexit, json, sys\n"
          f"atexit.register(lambda: print(json.dumps([m for m in {EXPORT_MODULES!r} if m in sys.modules]), "
          "file=sys.stderr))\n")


def loaded_after(code: str) -> tuple[subprocess.CompletedProcess, list[str]]:
    """Run `code` in a fresh interpreter; the export modules it left loaded, read at exit."""
    result = subprocess.run([sys.executable, "-c", REPORT + code], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    return result, json.loads(result.stderr.strip().splitlines()[-1])


def test_importing_the_runtime_loads_no_export_code():
    result, loaded = loaded_after("import covipal_export.runtime, covipal_export.runtime.cli\n"
                                  "from covipal_export import Pipeline")
    assert result.returncode == 0, result.stderr
    assert loaded == []


def test_run_trt_help_loads_no_export_code():
    result, loaded = loaded_after("import runpy\nsys.argv = ['run_trt.py', '--help']\n"
                                  "runpy.run_path('run_trt.py', run_name='__main__')")
    assert result.returncode == 0 and "--engine-dir" in result.stdout, result.stderr
    assert loaded == []


def test_the_export_side_does_load_them():  # the check above can fail: the exporter pulls these in
    _, loaded = loaded_after("import covipal_export.export.exporter")
    assert {"onnx", "onnxscript", "torch.onnx"} <= set(loaded)


def engine_info(stage: str = names.VISION) -> EngineInfo:
    tensor = TensorInfo(names.PIXEL_VALUES, "float32", [-1, 3, 56, 56])
    return EngineInfo(stage, "vision.onnx", "ab" * 32, "tensorrt_rtx", "1.7.0", "sm89", [tensor],
                      [TensorInfo(names.VISUAL_TOKENS, "float32", [-1, 64, 64])],
                      [Profile(names.PIXEL_VALUES, [1, 3, 56, 56], [1, 3, 56, 56], [8, 3, 56, 56])], None, 1.5)


def test_engine_metadata_round_trips(tmp_path):
    (tmp_path / names.ENGINE_DIR).mkdir()
    write_engine_info(engine_info(), tmp_path / names.ENGINE_DIR)
    assert read_engine_info(tmp_path, names.VISION) == engine_info()


@pytest.mark.parametrize("edit, message", [
    (lambda r: r.update(colour="red"), "unknown key 'colour'"),
    (lambda r: r.pop("target"), "missing key 'target'"),
    (lambda r: r["profiles"][0].update(min="1"), "'profiles[0].min' has an unexpected value '1'"),
    (lambda r: r["inputs"][0].pop("dtype"), "missing key 'inputs[0].dtype'"),
    (lambda r: r.update(stage="decoder"), "describes the 'decoder' engine, not 'vision'"),
    (None, "is not valid JSON"),
])
def test_engine_metadata_loader_is_strict(tmp_path, edit, message):
    engine_dir = tmp_path / names.ENGINE_DIR
    engine_dir.mkdir()
    path = write_engine_info(engine_info(), engine_dir)
    if edit is None:
        path.write_text("{not json")
    else:
        record = json.loads(path.read_text())
        edit(record)
        path.write_text(json.dumps(record))
    with pytest.raises(CovipalError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
        read_engine_info(tmp_path, names.VISION)
    assert "\n" not in str(error.value) and "rebuild with `python -m covipal_export.build" in str(error.value)


def test_engine_metadata_without_a_file_says_how_to_build(tmp_path):
    with pytest.raises(CovipalError, match="no TensorRT engine for vision .*python -m covipal_export.build"):
        read_engine_info(tmp_path, names.VISION)
    defaulted = [f.name for f in dataclasses.fields(EngineInfo) if f.default is not dataclasses.MISSING]
    assert defaulted == ["gather", "peak_rss_bytes"]  # the keys older engines' records lack


def test_console_commands_resolve_to_their_mains():
    commands = {e.name: e for e in importlib.metadata.entry_points(group="console_scripts")
                if e.value.startswith(("covipal.", "covipal_export."))}
    assert set(commands) == {"covipal", "covipal-eval", "covipal-train", "covipal-export", "covipal-verify",
                             "covipal-build", "covipal-run", "covipal-bench", "covipal-pipeline-eval", "covipal-serve",
                             "covipal-triton"}
    for name, entry in commands.items():
        module = importlib.import_module(entry.module)
        assert callable(entry.load()) and callable(module.main), name
