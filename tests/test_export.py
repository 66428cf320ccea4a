"""ONNX export of tiny-random-llava: the manifest, stage parity, runtime budgets, the ORT greedy chain, the CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxscript
import pytest
import torch
import transformers

import covipal_export
from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate_from_batch
from covipal.modeling_ppm import PruningModule, default_ppm_config
from covipal.models import ModelInfo
from covipal.pruning import text_for_scoring
from covipal.selection import keep_topk_in_order
from covipal.strategies import make_strategy
from covipal_export import names
from covipal_export.export.cli import main as export_main
from covipal_export.export.exporter import ExportOptions, describe, export_model, install, writable_parent
from covipal_export.export.graphs import graph_specs, shape_ranges
from covipal_export.export.onnx_export import export_graph
from covipal_export.export.pruning_choice import (
    EXPORTABLE_STRATEGIES,
    TRAINING_FREE_DEFAULT,
    check_strategy,
    choose_pruning,
)
from covipal_export.export.verify import verify_export
from covipal_export.manifest import describe_files, load_manifest
from covipal_export.runtime.ort_backend import OrtBackend
from covipal_export.runtime.pipeline import Pipeline
from covipal_export.runtime.reference import load_reference_model, reference_from_manifest

ROOT = Path(__file__).resolve().parents[1]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """tiny-random-llava exported once (fp32, budget 8, its random PPM, verified during export)."""
    out = tmp_path_factory.mktemp("export") / "tiny-b8"
    return export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out, strategy="ppm"))


@pytest.fixture(scope="module")
def backend(exported):
    """The runtime's ONNX Runtime backend on the export (CPU)."""
    return OrtBackend(exported.directory, exported.manifest)


@pytest.fixture(scope="module")
def reference(exported):
    """The PyTorch model and strategy, rebuilt from the manifest alone."""
    return reference_from_manifest(load_manifest(exported.directory))


def test_export_verifies_every_stage(exported):
    report = exported.report
    assert report.passed, report.table()
    rows = {check.what: check for check in report.checks}
    assert {c.stage for c in report.checks} >= {*names.STAGES, "chain", "files", "tokenizer"}
    for policy in ("keep", "compact"):
        assert rows[f"greedy tokens, batch 2, {policy}"].result == f"{NEW_TOKENS} tokens x 2 rows equal"
        assert rows[f"kept_index, {policy}"].result == "equal"
    for budget in (1, 8, 64):
        assert rows[f"kept_index, budget {budget}"].result == "equal"
    if shutil.which("polygraphy") or (Path(sys.executable).parent / "polygraphy").is_file():
        assert [c.result for c in report.checks if c.stage == "polygraphy"] == ["PASSED"] * 4
    assert report.table().endswith("PASSED")


def test_manifest_lists_every_file_with_its_sha256(exported):
    directory, manifest = exported.directory, exported.manifest
    assert load_manifest(directory) == manifest
    on_disk = sorted(p.relative_to(directory).as_posix() for p in directory.rglob("*")
                     if p.is_file() and p.name != names.MANIFEST_FILE)
    assert sorted(manifest.files) == on_disk
    assert set(names.GRAPH_FILES.values()) | {"tokenizer/tokenizer.json"} <= set(on_disk)
    for name, entry in manifest.files.items():
        data = (directory / name).read_bytes()
        assert entry.sha256 == hashlib.sha256(data).hexdigest() and entry.bytes == len(data)
    assert not list(directory.parent.glob(".*partial")), "the temporary directory was left behind"


def test_manifest_describes_the_graphs_as_written(exported):
    manifest = exported.manifest
    onnx_types = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.INT64: "int64"}
    for stage in names.STAGES:
        spec = manifest.graphs[stage]
        model = onnx.load(exported.directory / spec.file)
        assert {o.domain: o.version for o in model.opset_import}[""] == manifest.versions.opset == 20
        for declared, actual in [(spec.inputs, model.graph.input), (spec.outputs, model.graph.output)]:
            assert [t.name for t in declared] == [v.name for v in actual]
            assert [t.dtype for t in declared] == [onnx_types[v.type.tensor_type.elem_type] for v in actual]
            assert [t.shape for t in declared] == [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                                                   for v in actual]
    prune = {t.name: t for t in manifest.graphs[names.PRUNE].inputs + manifest.graphs[names.PRUNE].outputs}
    assert prune[names.BUDGET].shape == [] and prune[names.BUDGET].dtype == "int64"
    assert prune[names.KEPT_TOKENS].shape == ["batch", "kept", 64]
    assert prune[names.KEPT_INDEX].shape == ["batch", "kept"]
    decoder = {t.name: t for t in manifest.graphs[names.DECODER].inputs + manifest.graphs[names.DECODER].outputs}
    assert decoder["past_key_values.1.value"].shape == ["batch", 2, "past", 16]
    assert decoder["present.1.value"].shape == ["batch", 2, "total", 16]
    assert decoder[names.ATTENTION_MASK].shape == ["batch", "total"]
    assert decoder[names.LOGITS].shape == ["batch", 1, 384]
    assert manifest.decoder.num_layers == 2 and manifest.decoder.logits == "last"


def test_manifest_carries_what_the_runtime_needs(exported, tiny):
    manifest = exported.manifest
    assert manifest.model.name == "tiny-random-llava" and manifest.model.source == tiny.info.source
    shapes = manifest.shapes
    assert shapes.visual_tokens == 64 and shapes.max_context == 512 and shapes.max_text == 448
    assert manifest.pruning.default_budget == 8 and manifest.pruning.position_policy == "keep"
    assert manifest.pruning.strategy == "ppm" and manifest.pruning.ppm.seed == 0
    assert manifest.preprocessing == tiny.processor.image_preprocessing
    tokenizer = tiny.processor.tokenizer
    assert manifest.tokenizer.chat_template == tiny.processor.chat_template
    assert manifest.tokenizer.image_token == "<image>"
    special = manifest.special_tokens
    assert (special.image, special.bos, special.eos, special.pad) == (
        tiny.image_token_id, tokenizer.bos_token_id, [tokenizer.eos_token_id], tokenizer.pad_token_id)
    saved = transformers.AutoTokenizer.from_pretrained(exported.directory / manifest.tokenizer.directory)
    prompt = tiny.processor.render("What is on the table?")
    assert saved(prompt)["input_ids"] == tokenizer(prompt)["input_ids"]
    versions = manifest.versions
    assert (versions.torch, versions.transformers, versions.onnx, versions.onnxscript, versions.covipal_export) == (
        torch.__version__, transformers.__version__, onnx.__version__, onnxscript.__version__,
        covipal_export.__version__)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["model"].update(colour="red"), "unknown key 'model.colour'"),
    (lambda m: m["pruning"].pop("default_budget"), "missing key 'pruning.default_budget'"),
    (lambda m: m["shapes"].update(max_batch="8"), "'shapes.max_batch' has an unexpected value '8'"),
    (lambda m: m["graphs"]["prune"]["inputs"][0].update(extra=1), "unknown key 'graphs.prune.inputs[0].extra'"),
    (lambda m: m.update(format_version=99), "format_version 99 is not supported"),
    (lambda m: m["graphs"]["decoder"]["inputs"].pop(), "graphs.decoder must have inputs"),
])
def test_manifest_loader_is_strict(exported, tmp_path, edit, message):
    record = json.loads((exported.directory / names.MANIFEST_FILE).read_text())
    edit(record)
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(record))
    with pytest.raises(CovipalError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_manifest(tmp_path)


def test_vision_and_embed_match_pytorch_at_other_batch_sizes(backend, reference, images, questions):
    model, _ = reference
    for rows in ([2], [0, 1, 2]):
        batch = model.processor([images[i] for i in rows], [questions[i] for i in rows])
        with torch.no_grad():
            visual = model.encode_images(batch.pixel_values).numpy()
            embeds = model.embed_tokens(batch.input_ids).numpy()
        assert np.abs(backend.encode_images(batch.pixel_values).numpy() - visual).max() < 1e-5
        assert np.array_equal(backend.run(names.EMBED, {names.INPUT_IDS: batch.input_ids})[names.TEXT_EMBEDS], embeds)


@pytest.mark.parametrize("budget", [8, 16, 32, 100])
def test_one_ppm_graph_serves_every_budget(backend, reference, images, questions, budget):
    model, strategy = reference
    batch = model.processor(images[:2], questions[:2])
    with torch.no_grad():
        visual = model.encode_images(batch.pixel_values)
        embeds = model.embed_tokens(batch.input_ids.masked_fill(batch.input_ids == model.image_token_id, 0))
        text_embeds, text_mask = text_for_scoring(embeds, batch.input_ids, batch.attention_mask, model.image_token_id)
        k = min(budget, 64)  # the graph clamps what the runtime would refuse (a graph cannot raise)
        expected = keep_topk_in_order(strategy.scores(visual, text_embeds, text_mask, k), k)
    out = {name: value.numpy() for name, value in backend.run(names.PRUNE, {
        names.VISUAL_TOKENS: visual, names.TEXT_EMBEDS: text_embeds, names.TEXT_MASK: text_mask,
        names.BUDGET: np.array(budget)}).items()}
    assert out[names.KEPT_TOKENS].shape == (2, k, 64) and out[names.SCORES].shape == (2, 64)
    assert np.array_equal(out[names.KEPT_INDEX], expected.numpy())
    assert np.array_equal(out[names.KEPT_TOKENS], np.take_along_axis(visual.numpy(), expected.numpy()[..., None], 1))


@pytest.mark.parametrize("policy", ["keep", "compact"])
@pytest.mark.parametrize("rows", [[1], [0, 2]])
def test_ort_greedy_chain_equals_pytorch_generate(exported, backend, reference, images, questions, policy, rows):
    model, strategy = reference
    batch = model.processor([images[i] for i in rows], [questions[i] for i in rows])
    if len(rows) == 2:
        assert (batch.attention_mask == 0).any(), "the batch should exercise left padding"
    expected = generate_from_batch(model, batch, strategy=strategy, budget=8, position_policy=policy,
                                   sampling=SamplingConfig(NEW_TOKENS))
    pipe = Pipeline(exported.directory, exported.manifest, None, backend, "ONNX Runtime on the CPU")
    out = pipe.generate_from_batch(batch, budget=8, position_policy=policy, max_new_tokens=NEW_TOKENS)
    assert np.array_equal(out.kept_index, expected.kept_index.numpy())
    assert out.prefill_length == expected.prefill_length
    assert out.sequences.tolist() == expected.sequences.tolist()


@pytest.mark.parametrize("strategy_name", ["uniform", "text-sim"])
def test_training_free_strategies_export_the_same_way(tiny, tmp_path, strategy_name):
    strategy = make_strategy(strategy_name)
    spec = graph_specs(tiny, strategy, shape_ranges(tiny, 8), 8, True)[names.STAGES.index(names.PRUNE)]
    graph = export_graph(spec, tmp_path, 20)
    import onnxruntime as ort

    session = ort.InferenceSession(str(tmp_path / graph.file), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    visual, text = torch.randn(3, 64, 64, generator=generator), torch.randn(3, 5, 64, generator=generator)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1], [1, 1, 0, 0, 0]])
    for budget in (8, 16, 32):
        feeds = {names.VISUAL_TOKENS: visual.numpy(), names.TEXT_EMBEDS: text.numpy(), names.TEXT_MASK: mask.numpy(),
                 names.BUDGET: np.array(budget)}
        kept_tokens, kept_index, _ = session.run(None, feeds)
        expected = keep_topk_in_order(strategy.scores(visual, text, mask, budget), budget)
        assert kept_tokens.shape == (3, budget, 64) and np.array_equal(kept_index, expected.numpy())


def test_strategy_choice(tiny, tmp_path):
    strategy, pruning = choose_pruning(tiny, None, None, 8, "keep", 0)  # no trained PPM: the measured default
    assert strategy.name == pruning.strategy == TRAINING_FREE_DEFAULT.strategy and pruning.ppm is None
    assert TRAINING_FREE_DEFAULT.evidence in pruning.note and "without a trained PPM" in pruning.note
    assert TRAINING_FREE_DEFAULT.strategy in EXPORTABLE_STRATEGIES
    for random_ppm in (choose_pruning(tiny, "ppm", None, 8, "keep", 0),  # random weights: a seeded random PPM
                       choose_pruning(tiny, None, None, 8, "keep", 0, random_ppm=True)):  # export.py --random-weights
        assert random_ppm[1].strategy == "ppm" and random_ppm[1].ppm.seed == 0
    checkpoint = PruningModule(default_ppm_config(64, 64, dim=32)).save(tmp_path / "ppm")
    strategy, pruning = choose_pruning(tiny, None, checkpoint, 8, "keep", 0)
    assert pruning.ppm.checkpoint == str(checkpoint.resolve()) and pruning.ppm.config["dim"] == 32
    assert strategy.ppm.config.dim == 32
    PruningModule(default_ppm_config(64, 16)).save(tmp_path / "small")
    with pytest.raises(CovipalError, match="the PPM scores \\[B, 16, 64\\] visual tokens"):
        choose_pruning(tiny, None, tmp_path / "small", 8, "keep", 0)
    pretrained = copy.copy(tiny)
    pretrained.info = ModelInfo("some-llava", "a local checkpoint")
    strategy, pruning = choose_pruning(pretrained, None, None, 8, "keep", 0)
    assert strategy.name == pruning.strategy == TRAINING_FREE_DEFAULT.strategy and "pass --ppm CKPT" in pruning.note
    assert choose_pruning(pretrained, "text-sim", None, 8, "keep", 0)[1].note == "training-free strategy text-sim"
    with pytest.raises(CovipalError, match="strategy 'ppm' needs a trained PPM for some-llava"):
        choose_pruning(pretrained, "ppm", None, 8, "keep", 0)
    with pytest.raises(CovipalError, match="strategy 'random' cannot be exported"):
        check_strategy("random", None)
    for name in ("cdpruner", "dart"):
        with pytest.raises(CovipalError, match=f"strategy '{name}' cannot be exported: it picks .* choose one of: "
                                               f"ppm, uniform, text-sim$"):
            check_strategy(name, None)
    with pytest.raises(CovipalError, match="--ppm is only used by --strategy ppm"):
        check_strategy("uniform", checkpoint)
    with pytest.raises(CovipalError, match="tiny-random-llava has a fixed architecture"):
        load_reference_model("tiny-random-llava", dtype="fp32", random_weights=True, num_layers=1)


def test_verify_rebuilds_the_reference_from_the_manifest(exported):
    report = verify_export(exported.directory, polygraphy=False, batch_size=1, new_tokens=4)
    assert report.passed, report.table()


def test_a_failed_export_leaves_nothing_behind(tmp_path, monkeypatch):
    def broken(spec, directory, opset):
        (directory / "half-written.onnx").write_bytes(b"\0")
        raise RuntimeError("disk full")

    monkeypatch.setattr("covipal_export.export.exporter.export_graph", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        export_model(ExportOptions(model="tiny-random-llava", budget=8, out=tmp_path / "a" / "b"))
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_only_an_export_directory(tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    (old / "notes.txt").write_text("mine")
    with pytest.raises(CovipalError, match="is not an export directory"):
        writable_parent(old, force=True)
    (old / names.MANIFEST_FILE).write_text("{}")
    assert writable_parent(old, force=True) == tmp_path
    new = tmp_path / ".new.partial"
    new.mkdir()
    (new / names.MANIFEST_FILE).write_text("new")
    install(new, old)
    assert [p.name for p in tmp_path.iterdir()] == ["old"] and (old / names.MANIFEST_FILE).read_text() == "new"
    assert describe_files(old).keys() == set()  # the manifest itself is not listed


def run_export(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "export.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def assert_one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


def test_fp16_export_succeeds_and_reports_its_differences(tmp_path):
    out = tmp_path / "tiny-fp16"
    result = run_export("--model", "tiny-random-llava", "--budget", "8", "--dtype", "fp16", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert f"to {out}" in result.stdout and "verification of" in result.stdout and "(fp16; " in result.stdout
    # no --ppm, no --strategy: the output and the manifest name the measured training-free rule and why
    default = TRAINING_FREE_DEFAULT
    assert f"pruning: {default.strategy}, " in result.stdout and default.evidence in result.stdout
    for stage in names.STAGES:
        assert f"{stage:<10} " in result.stdout
    manifest = load_manifest(out)
    assert manifest.model.dtype == "fp16" and TRAINING_FREE_DEFAULT.evidence in manifest.pruning.note
    assert manifest.graphs[names.DECODER].input("past_key_values.0.key").dtype == "float16"
    assert manifest.graphs[names.VISION].input(names.PIXEL_VALUES).dtype == "float32"
    assert manifest.graphs[names.PRUNE].outputs[2].dtype == "float32"  # scores


@pytest.mark.parametrize("args, message", [
    (["--model", "llava-9b", "--budget", "8"], "argument --model: invalid choice: 'llava-9b'"),
    (["--budget", "0"], "argument --budget: expected a positive integer, got 0"),
    (["--budget", "-3"], "argument --budget: expected a positive integer, got -3"),
    (["--budget", "65"], "budget 65 is larger than the 64 visual tokens of tiny-random-llava"),
    (["--budget", "8", "--strategy", "knorm"], "strategy 'knorm' cannot be exported"),
    (["--budget", "8", "--strategy", "cdpruner"], "strategy 'cdpruner' cannot be exported"),
    (["--budget", "8", "--layers", "1"], "--layers needs --random-weights"),
    (["--budget", "8", "--out", "{existing}"], "already exists; pass --force to replace it"),
    (["--budget", "8", "--out", "{file}/sub"], "is not a directory"),
])
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(in_process, tmp_path, args, message):
    (tmp_path / "existing").mkdir()
    (tmp_path / "file").write_text("not a directory")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    args = [a.format(existing=tmp_path / "existing", file=tmp_path / "file") for a in args]
    if args[0] != "--model":
        args = ["--model", "tiny-random-llava", "--out", str(tmp_path / "out"), *args]
    assert_one_line_error(in_process(export_main, *args), message)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before


def test_unwritable_output_directory(in_process, tmp_path):
    if os.geteuid() == 0:  # root writes through permission bits; /sys refuses everyone
        target = Path("/sys/covipal-export-test")
    else:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "out"
    result = in_process(export_main, "--model", "tiny-random-llava", "--budget", "8", "--out", str(target))
    assert_one_line_error(result, f"cannot create {target}")
    assert not target.exists()


def test_the_manifest_records_time_and_peak_memory(exported, tmp_path):
    resources = exported.manifest.resources
    steps = resources.steps
    assert list(steps)[:3] == ["load model", "PyTorch references", "export vision.onnx"] and "verify" in steps
    assert resources.peak_rss_bytes >= steps["verify"].peak_rss_bytes >= steps["load model"].peak_rss_bytes > 2**20
    assert resources.seconds >= sum(step.seconds for step in steps.values()) - 1 and "CPUs" in resources.machine
    assert f"peak RSS {resources.peak_rss_bytes / 2**30:.2f} GiB" in describe(exported)
    record = json.loads((exported.directory / names.MANIFEST_FILE).read_text())
    del record["resources"], record["model"]["random_init"]  # a manifest written before they were recorded
    (tmp_path / names.MANIFEST_FILE).write_text(json.dumps(record))
    older = load_manifest(tmp_path)
    assert older.resources is None and older.model.random_init is None


def test_random_weights_made_another_way_are_refused(exported):
    manifest = copy.deepcopy(exported.manifest)
    manifest.model.random_weights, manifest.model.random_init = True, "by-layer"  # tiny-random-llava is built whole
    with pytest.raises(CovipalError, match="random weights were made .* cannot be rebuilt: export again"):
        reference_from_manifest(manifest)


def test_linear_weights_are_written_transposed(exported, reference):
    """Each linear layer's MatMul reads W^T, written from the module's weight (no Transpose left in the graph)."""
    model, _ = reference
    graph = onnx.load(exported.directory / "decoder.onnx").graph
    weights = {tensor.name: onnx.numpy_helper.to_array(tensor) for tensor in graph.initializer}
    assert not [node for node in graph.node if node.op_type == "Transpose" and node.input[0] in weights]
    matmuls = [weights[node.input[1]] for node in graph.node if node.op_type == "MatMul" and node.input[1] in weights]
    q_proj = model.language_model.layers[0].self_attn.q_proj.weight.detach().numpy()
    assert any(np.array_equal(w, q_proj.T) for w in matmuls) and len(matmuls) == 15  # 7 a layer x 2, the LM head
    produced = {output for node in graph.node for output in node.output}
    assert {names.HIDDEN_STATES % i for i in (1, 2)} <= produced  # each layer's output, named for groups of layers


@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("length", [1, 5])
def test_grouped_attention_equals_sdpa_over_repeated_heads(length, per_head):
    """9 query heads on 3 key/value heads, a left-padded row, one mask for all heads or one per query head (as
    decoder_kv.onnx has): the exported form equals transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from covipal_export.export.decoder_forms import grouped_attention

    generator = torch.Generator().manual_seed(0)
    past, batch, heads, kv_heads, head_dim = 6, 2, 9, 3, 16
    total = past + length
    query = torch.randn(batch, heads, length, head_dim, generator=generator)
    key, value = (torch.randn(batch, kv_heads, total, head_dim, generator=generator) for _ in range(2))
    valid = torch.ones(batch, total, dtype=torch.bool)
    valid[1, :3] = False  # row 1 is left-padded
    causal = torch.arange(total)[None, :] <= torch.arange(past, total)[:, None]  # [S, T]
    mask = (causal[None] & valid[:, None])[:, None]  # [B, 1, S, T]
    if per_head:  # each query head also loses some past keys of its own; a query always sees itself
        itself = torch.zeros(length, total, dtype=torch.bool)
        itself[torch.arange(length), past + torch.arange(length)] = True
        mask = mask & (torch.rand(batch, heads, 1, total, generator=generator) > 0.3) | itself
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = heads // kv_heads, True, False
    expected, _ = sdpa_attention_forward(module, query, key, value, mask, scaling=head_dim ** -0.5)
    got, _ = grouped_attention(module, query, key, value, mask, scaling=head_dim ** -0.5)
    assert got.shape == expected.shape == (batch, length, heads, head_dim)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_the_decoder_reads_its_cache_as_stored_and_its_norms_fuse(exported, tmp_path):
    """decoder.onnx attends with the cached key/value heads as they are (no copy repeated to the query heads), and
    ONNX Runtime fuses each RMSNorm into one SimplifiedLayerNormalization when a session opens."""
    import onnxruntime as ort

    graph = onnx.load(exported.directory / "decoder.onnx").graph
    layers = exported.manifest.decoder.num_layers
    users = {node.op_type for node in graph.node if any(name.startswith("present.") for name in node.input)}
    assert users <= {"MatMul", "Transpose"}, users  # no Expand/Reshape of the cache
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(exported.directory / "decoder.onnx", options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(tmp_path / "optimized.onnx").graph.node
    assert sum(node.op_type == "SimplifiedLayerNormalization" for node in optimized) == 2 * layers + 1


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """tiny-random-llava with every graph's weights in external data (as a 7B's are), not verified yet."""
    patch = pytest.MonkeyPatch()
    patch.setattr(names, "EXTERNAL_DATA_BYTES", 0)
    try:
        out = tmp_path_factory.mktemp("external") / "tiny-b8"
        return export_model(ExportOptions(model="tiny-random-llava", budget=8, out=out, strategy="ppm", verify=False))
    finally:
        patch.undo()


def checked_by_groups(directory: Path, monkeypatch) -> dict[str, object]:
    """Verify `directory` with too little memory for its decoder whole: each layer on its own."""
    from covipal_export.export import verify
    from covipal_export.export.decoder_groups import ort_bytes

    whole = ort_bytes(onnx.load(directory / "decoder.onnx", load_external_data=False))
    monkeypatch.setattr(verify, "available_bytes", lambda: int(whole / verify.HEADROOM) - 1)
    report = verify_export(directory, polygraphy=False)
    return report, {check.what: check for check in report.checks}


def test_a_decoder_too_big_for_memory_is_checked_by_groups_of_layers(external, monkeypatch):
    manifest = external.manifest
    assert all(graph.external_data == graph.file + ".data" for graph in manifest.graphs.values())
    report, rows = checked_by_groups(external.directory, monkeypatch)
    assert report.passed, report.table()
    assert rows["checked by groups of layers"].result == "2 groups: layers 0, 1"
    for step in ("prefill", "decode step"):  # fp32: every layer's logits and KV within 1e-4, as whole
        assert rows[f"{step} logits max |diff|"].ok and rows[f"{step} present max |diff|"].ok
    skipped = rows["greedy tokens, batch 2, keep"]
    assert skipped.ok is None and not skipped.required and skipped.result.startswith("skipped: needs ~")


def test_groups_of_layers_catch_a_changed_weight(external, tmp_path, monkeypatch):
    directory = tmp_path / "changed"
    shutil.copytree(external.directory, directory)
    graph = onnx.load(directory / "decoder.onnx", load_external_data=False).graph
    weights = {tensor.name: tensor for tensor in graph.initializer}
    start = next(i for i, n in enumerate(graph.node) if names.HIDDEN_STATES % 1 in n.output)
    tensor = next(weights[n.input[1]] for n in graph.node[start:] if n.op_type == "MatMul" and n.input[1] in weights)
    offset = int(next(entry.value for entry in tensor.external_data if entry.key == "offset"))
    with open(directory / "decoder.onnx.data", "r+b") as data:
        data.seek(offset)
        data.write(np.full(16, 0.5, np.float32).tobytes())  # a few weights of layer 1's first linear layer
    report, rows = checked_by_groups(directory, monkeypatch)
    assert not report.passed
    assert rows["prefill logits max |diff|"].ok is False and rows["decode step logits max |diff|"].ok is False
