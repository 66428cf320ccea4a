"""Smoke test of `python -m covipal_export.bench` on tiny-random-llava: records, ratios, skipped rows, errors."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from covipal.cli import run
from covipal_export.bench.cli import main

NUM_VISUAL = 64  # tiny-random-llava
RECORD_FIELDS = {"backend": str, "budget": int, "vision_ms": float, "prune_ms": float, "prefill_ms": float,
                 "ttft_ms": float, "decode_ms_per_token": float, "peak_mem_mb": float}


def bench(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_:
        run(lambda: main(list(args)))
    out, err = capsys.readouterr()
    return exit_.value.code, out, err


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("bench")


@pytest.fixture(scope="module")
def report(work_dir):
    out = work_dir / "bench.json"
    argv = ["--model", "tiny-random-llava", "--budgets", "8,all", "--backends", "torch,ort,trt", "--work-dir",
            str(work_dir), "--no-verify", "--repeats", "2", "--warmup", "0", "--new-tokens", "3", "--threads", "1",
            "--json", str(out), "--plot", str(work_dir / "bench.png")]
    with pytest.raises(SystemExit) as exit_:
        run(lambda: main(argv))
    assert exit_.value.code == 0
    return json.loads(out.read_text())


def test_records_have_every_field_per_backend_and_budget(report, work_dir):
    records = report["records"]
    assert [(r["backend"], r["budget"]) for r in records] == [("torch", 64), ("torch", 8), ("ort", 64), ("ort", 8)]
    assert {r["variant"] for r in records} == {"fp32"} and records[2]["decoder_mb"] < records[2]["model_mb"]
    for r in records:
        for name, kind in RECORD_FIELDS.items():
            assert isinstance(r[name], kind), (name, r[name])
        assert r["repeats"] == 2 and r["tokens_total"] == NUM_VISUAL and r["tokens_kept"] == r["budget"]
        assert all(r[name] > 0 for name in ("vision_ms", "prune_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token"))
        assert r["ttft_ms"] >= r["vision_ms"] + r["prune_ms"] + r["prefill_ms"]
        assert r["range"]["prefill_ms"][0] <= r["prefill_ms"] <= r["range"]["prefill_ms"][1]
        # ort runs on CUDA where onnxruntime-gpu gets a GPU
        on_gpu = report["workers"][f"{r['backend']} fp32"]["backend"] == "onnxruntime-cuda"
        assert r["peak_mem_mb"] > 50 and (r["device_mem_mb"] > 0 if on_gpu else r["device_mem_mb"] is None)
    text = report["model"]["text_tokens"]
    assert {r["prefill_length"] for r in records} == {NUM_VISUAL + text, 8 + text}
    assert records[0]["model_mb"] is None and records[2]["model_mb"] > 0  # torch has no file, ort its graphs
    assert report["machine"]["threads"] == 1 and report["machine"]["cpu_count"] >= 1
    assert report["model"]["name"] == "tiny-random-llava" and report["model"]["decoder_layers"] == 2
    assert (work_dir / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ratios_are_computed_from_the_records(report):
    by_key = {(r["backend"], r["budget"]): r for r in report["records"]}
    text = report["model"]["text_tokens"]
    rows = {(r["backend"], r["budget"]): r for r in report["ratios"]}
    for (backend, budget), row in rows.items():
        record, full = by_key[(backend, budget)], by_key[(backend, NUM_VISUAL)]
        assert row["prefill_speedup"] == full["prefill_ms"] / record["prefill_ms"]
        assert row["ttft_speedup"] == full["ttft_ms"] / record["ttft_ms"]
        assert row["prefill_speedup_theory"] == (NUM_VISUAL + text) / (budget + text)
        assert row["ppm_share"] == record["ppm_select_ms"] / full["prefill_ms"]
    assert rows[("ort", 8)]["prefill_vs_torch"] == by_key[("torch", 8)]["prefill_ms"] / by_key[("ort", 8)]["prefill_ms"]
    assert rows[("ort", 64)]["decode_vs_torch"] == (by_key[("torch", 64)]["decode_ms_per_token"]
                                                    / by_key[("ort", 64)]["decode_ms_per_token"])
    assert rows[("torch", 8)]["prefill_vs_torch"] is None and rows[("torch", 64)]["prefill_speedup"] == 1.0


def test_an_unavailable_backend_is_a_skipped_row(report):
    assert [s["backend"] for s in report["skipped"]] == ["trt"]
    assert report["skipped"][0]["reason"]
    assert "trt" not in {r["backend"] for r in report["records"]}


@pytest.mark.parametrize("args, message", [
    (("--budgets", "0", "--backends", "ort"), "--budgets takes positive integers and 'all', got '0'"),
    (("--budgets", "8,x", "--backends", "ort"), "--budgets takes positive integers and 'all', got 'x'"),
    (("--budgets", "8", "--backends", "ort,onnx"), "unknown backend 'onnx' in --backends"),
    (("--budgets", "8", "--backends", "ort", "--layers", "2"), "--layers needs --random-weights"),
    (("--budgets", "8", "--backends", "ort", "--variants", "fp32,int3"),
     "unknown variant 'int3' in --variants; choose from the export's --dtype, int8, int4, int4-rtn, int4-q4_1"),
    (("--budgets", "8", "--backends", "ort", "--variants", "fp32,int4-gptq"), "unknown variant 'int4-gptq'"),
    (("--budgets", "8", "--backends", "ort", "--variants", "int8-q4_1"), "--quant-method q4_1 is a 4-bit grid"),
    (("--budgets", "8", "--backends", "ort", "--variants", "fp16,int4"), "unknown variant 'fp16' in --variants"),
    (("--budgets", "8", "--backends", "ort", "--quant-lm-head"), "--quant-lm-head needs an int8 or int4 variant"),
])
def test_bad_input_is_one_line_exit_2(capsys, args, message):
    code, out, err = bench(capsys, "--model", "tiny-random-llava", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), err


def test_budget_over_n_is_refused_after_the_export_is_opened(capsys, report, work_dir):
    code, _, err = bench(capsys, "--model", "tiny-random-llava", "--budgets", "65", "--backends", "ort",
                         "--work-dir", str(work_dir), "--no-verify")
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1] == "error: budget 65 is larger than the 64 visual tokens of this model"
    assert lines[0].startswith("reusing the export in") and len(lines) == 2  # no new export


def test_plot_without_matplotlib_is_one_line_exit_2(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    code, _, err = bench(capsys, "--model", "tiny-random-llava", "--budgets", "8", "--backends", "ort",
                         "--work-dir", str(tmp_path), "--plot", str(tmp_path / "p.png"))
    assert code == 2 and err.strip().splitlines() == [
        "error: --plot needs matplotlib: pip install 'covipal-export[tools]' (or matplotlib)"]
    assert not any(tmp_path.iterdir())  # refused before exporting anything


def test_variants_run_side_by_side_on_quantized_copies(capsys, report, work_dir):
    out = work_dir / "variants.json"
    args = ("--model", "tiny-random-llava", "--budgets", "8", "--backends", "torch,ort", "--variants",
            "fp32,int4,int4-q4_1",
            "--work-dir", str(work_dir), "--no-verify", "--repeats", "1", "--warmup", "0", "--new-tokens", "3",
            "--threads", "1", "--json", str(out))
    code, table, err = bench(capsys, *args)
    assert code == 0, err
    assert "quantizing a copy of" in err and "decoder weights: fp32; int4 rtn, block 32; int4 q4_1, block 32" in table
    variants = json.loads(out.read_text())
    records = {(r["backend"], r["variant"], r["budget"]): r for r in variants["records"]}
    assert set(records) == {("torch", "fp32", 64), ("torch", "fp32", 8), ("ort", "fp32", 64), ("ort", "fp32", 8),
                            ("ort", "int4", 64), ("ort", "int4", 8), ("ort", "int4-q4_1", 64), ("ort", "int4-q4_1", 8)}
    skipped = variants["skipped"]  # the PyTorch reference has no int4 decoder
    assert [(s["backend"], s["variant"]) for s in skipped] == [("torch", "int4"), ("torch", "int4-q4_1")]
    assert "--backend torch rebuilds the PyTorch model" in skipped[0]["reason"]
    fp32, int4 = records[("ort", "fp32", 8)], records[("ort", "int4", 8)]
    assert int4["decoder_mb"] < fp32["decoder_mb"]  # tiny: the fp32 LM head is most of it
    rows = {(r["backend"], r["variant"], r["budget"]): r for r in variants["ratios"]}
    assert rows[("ort", "int4", 8)]["decode_vs_base"] == fp32["decode_ms_per_token"] / int4["decode_ms_per_token"]
    assert rows[("ort", "int4", 8)]["decoder_size_vs_base"] == int4["decoder_mb"] / fp32["decoder_mb"]
    assert rows[("ort", "int4", 8)]["prefill_vs_torch"] is None and rows[("ort", "fp32", 8)]["decode_vs_base"] is None
    quantized = work_dir / (json.loads((work_dir / "bench.json").read_text())["model"]["export_dir"].split("/")[-1]
                            + "-int4")
    assert (quantized / "decoder.qdq.onnx").is_file() and not list(work_dir.glob("*.partial"))
    code, _, err = bench(capsys, *args)  # the quantized copy is reused
    assert code == 0 and "reusing the int4 export in" in err


def test_an_export_given_by_directory_is_measured_as_it_is(capsys, report, tmp_path):
    """--export DIR: a quantized export (the full-size int4 path) measured without exporting or quantizing again."""
    from covipal_export.export.quantize import QuantOptions, quantize_export
    from covipal_export.manifest import load_manifest

    given = tmp_path / "tiny-int4"
    shutil.copytree(report["model"]["export_dir"], given)
    quantize_export(given, load_manifest(given), QuantOptions("int4"))
    out = tmp_path / "given.json"
    code, table, err = bench(capsys, "--export", str(given), "--budgets", "8", "--backends", "ort", "--repeats", "1",
                             "--warmup", "0", "--new-tokens", "3", "--threads", "1", "--json", str(out))
    assert code == 0, err
    assert "export" not in err.replace("--export", "") and "quantizing" not in err
    assert "decoder weights: int4 rtn, block 32" in table
    measured = json.loads(out.read_text())
    assert measured["model"]["export_dir"] == str(given)
    assert [(r["variant"], r["budget"]) for r in measured["records"]] == [("int4", 64), ("int4", 8)]
    for args, message in [(("--dtype", "fp16"), f"--dtype make an export; --export measures {given} as it was"),
                          (("--random-weights", "--layers", "2"), "--random-weights, --layers make an export"),
                          (("--variants", "int4,int8"), "--variants int8: the export is already quantized (int4)")]:
        code, out_, err = bench(capsys, "--export", str(given), "--budgets", "8", "--backends", "ort", *args)
        lines = err.strip().splitlines()
        assert code == 2 and out_ == "" and len(lines) == 1 and lines[0].startswith(f"error: {message}"), err
    code, _, err = bench(capsys, "--export", str(given), "--model", "tiny-random-llava", "--budgets", "8",
                         "--backends", "ort")
    assert code == 2 and "not allowed with argument" in err
