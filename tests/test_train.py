"""PPM training: the teacher labels, the soft-pruning mask, the data reader and the training command."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import requires_easy_vqa
from PIL import Image

from covipal.errors import CovipalError
from covipal.modeling_ppm import PruningModule, weights_sha256
from covipal.models import load_model
from covipal.pruning import image_span, prune_prompt
from covipal.training.attention_labels import visual_attention_labels
from covipal.training.batching import answer_ids, pad_answered
from covipal.training.data.instruct_json import load_instruct_json
from covipal.training.gradient_labels import answer_gradient_labels
from covipal.training.guide_layer_sweep import OracleScores
from covipal.training.soft_pruning import answer_loss, soft_key_bias, soft_pruning_mask
from covipal.training.train_ppm import normal_ranks


def full_prompt(model, images, questions):
    batch = model.processor(images, questions)
    with torch.no_grad():
        visual = model.encode_images(batch.pixel_values)
        embeds = model.embed_prompt(batch.input_ids)
    return batch, visual, embeds


def test_labels_equal_eager_attention_weights(images, questions):
    """The one-layer labels equal Hugging Face's own eager attention probabilities at that layer."""
    model = load_model("tiny-random-llava")  # a private copy: switched to eager attention below
    batch, visual, embeds = full_prompt(model, images[:2], questions[1:3])  # different lengths: left padding
    full = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, model.image_token_id, None)
    layers = [0, 1]
    labels = visual_attention_labels(model, full.inputs_embeds, batch.input_ids, batch.attention_mask, layers)

    model.language_model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model.language_model(inputs_embeds=full.inputs_embeds, attention_mask=batch.attention_mask,
                                   position_ids=full.position_ids, output_attentions=True)
    start = image_span(batch.input_ids, model.image_token_id, model.num_visual_tokens)
    for layer in layers:
        for b in range(2):
            first_query = int(start[b]) + model.num_visual_tokens
            weights = out.attentions[layer][b, :, first_query:]  # [H, rows after the image, L]
            expected = weights.sum(dim=(0, 1))[int(start[b]) : first_query]  # [N]
            torch.testing.assert_close(labels[layer][b], expected, rtol=1e-4, atol=1e-5)
    assert all(v.shape == (2, model.num_visual_tokens) and v.dtype == torch.float32 for v in labels.values())


def test_labels_reject_a_layer_outside_the_stack(tiny, images, questions):
    batch, visual, embeds = full_prompt(tiny, images[:1], questions[:1])
    with pytest.raises(CovipalError, match="guide layer must be in 0..1"):
        visual_attention_labels(tiny, embeds, batch.input_ids, batch.attention_mask, [2])


@pytest.mark.parametrize("policy_budget", [5, 20, 63])
def test_minus_infinity_bias_is_hard_pruning(tiny, images, questions, policy_budget):
    """A key bias of -inf on the dropped tokens gives the hard-pruned prompt's logits (original positions)."""
    batch, visual, embeds = full_prompt(tiny, images[:2], questions[:2])
    scores = torch.randn(2, tiny.num_visual_tokens, generator=torch.Generator().manual_seed(policy_budget))
    full = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, tiny.image_token_id, None)
    hard = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, tiny.image_token_id,
                        OracleScores(scores), policy_budget, "keep")
    kept = torch.zeros_like(scores, dtype=torch.bool).scatter(1, hard.kept_index, True)
    start = image_span(batch.input_ids, tiny.image_token_id, tiny.num_visual_tokens)
    mask = soft_pruning_mask(batch.attention_mask, start, torch.where(kept, 0.0, float("-inf")))
    with torch.no_grad():
        soft = tiny.language_model(inputs_embeds=full.inputs_embeds, attention_mask=mask,
                                   position_ids=full.position_ids).last_hidden_state[:, -1]
        reference = tiny.language_model(inputs_embeds=hard.inputs_embeds, attention_mask=hard.attention_mask,
                                        position_ids=hard.position_ids).last_hidden_state[:, -1]
    torch.testing.assert_close(soft, reference, rtol=1e-4, atol=1e-4)


def test_answer_gradient_labels_are_the_loss_slope_per_token(images, questions):
    """Each label is minus the finite-difference slope of the answer's loss along that token's key bias, and
    a row's labels do not depend on the other rows of the batch."""
    model = load_model("tiny-random-llava").double()  # a private copy, in float64 for the finite differences
    processor = model.require_processor()
    answers = [answer_ids(model, a) for a in ("a red apple", "two")]
    prompts = [processor.tokenize(q) for q in questions[1:3]]  # different lengths: left padding
    input_ids, attention_mask, lengths = pad_answered(model, prompts, answers)
    with torch.no_grad():
        visual = model.encode_images(processor(images[:2], questions[1:3]).pixel_values.double())  # [2, N, D]
    labels = answer_gradient_labels(model, input_ids, attention_mask, lengths, visual)
    assert labels.shape == (2, model.num_visual_tokens) and labels.abs().sum() > 0

    def loss(bias):
        with torch.no_grad():
            return answer_loss(model, input_ids, attention_mask, lengths, visual, bias, reduction="sum").item()

    eps = 1e-2  # central differences; smaller steps drown in the decoder's float32 internals
    for b, token in [(0, 0), (0, 17), (1, 40), (1, 63)]:
        step = torch.zeros_like(labels)
        step[b, token] = eps
        slope = (loss(step) - loss(-step)) / (2 * eps)
        assert abs(-slope - labels[b, token].item()) < 2e-4 + 1e-2 * abs(slope)

    alone = answer_gradient_labels(model, input_ids[1:], attention_mask[1:], lengths[1:], visual[1:])
    torch.testing.assert_close(alone[0], labels[1].float(), rtol=1e-6, atol=1e-9)


def test_normal_ranks_keep_the_order_and_drop_the_outliers():
    labels = torch.tensor([[3.0, 1000.0, -1.0, 0.0], [0.5, 0.25, 0.125, 2.0]])
    target = normal_ranks(labels)
    quantiles = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([0.125, 0.375, 0.625, 0.875]))
    torch.testing.assert_close(target, quantiles[labels.argsort(-1).argsort(-1)])
    assert torch.equal(target[0], normal_ranks(labels[:1] * 1e-3 - 5)[0])  # scale and shift do not matter


def test_soft_key_bias_is_centred_on_the_budget():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0, 4.0]])
    bias = soft_key_bias(scores, budget=2)
    assert torch.equal(bias.argsort(-1, descending=True)[:, :2].sort(-1).values, torch.tensor([[0, 1], [3, 4]]))
    kept = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert (bias[kept] > np.log(0.5)).all() and (bias[~kept] < np.log(0.5)).all()  # the top 2 above 1/2, the rest below
    torch.testing.assert_close(soft_key_bias(scores * 10 + 3, budget=2), bias)  # scale and shift do not matter
    assert torch.equal(soft_key_bias(scores, budget=5), torch.zeros_like(scores))


def write_dataset(directory, count=6):
    rng = np.random.default_rng(0)
    records = []
    for i in range(count):
        Image.fromarray((rng.random((56, 56, 3)) * 255).astype(np.uint8)).save(directory / f"{i}.png")
        records.append({"image": f"{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "a red apple"},
            {"from": "human", "value": "What color is the car?"}, {"from": "gpt", "value": "white"}]})
    path = directory / "data.json"
    path.write_text(json.dumps(records))
    return path


def test_instruct_json_reader(tmp_path):
    examples = load_instruct_json(write_dataset(tmp_path, 2))
    assert [(e.image.name, e.question, e.answer) for e in examples] == [
        ("0.png", "What is on the table?", "a red apple"), ("0.png", "What color is the car?", "white"),
        ("1.png", "What is on the table?", "a red apple"), ("1.png", "What color is the car?", "white")]
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "missing.png", "conversations": []}]))
    with pytest.raises(CovipalError, match="image .*missing.png not found"):
        load_instruct_json(tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(CovipalError, match="is not valid JSON"):
        load_instruct_json(tmp_path / "broken.json")


def train(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "covipal.train", "--model", "tiny-random-llava", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)


def test_training_on_tiny_lowers_the_loss_and_writes_a_checkpoint(tmp_path):
    data = write_dataset(tmp_path)
    cache = tmp_path / "cache"
    stage1 = train("--data", data, "--stage", 1, "--out", tmp_path / "s1", "--steps", 40, "--batch-size", 6,
                   "--lr", "3e-3", "--cache-dir", cache)
    assert stage1.returncode == 0, stage1.stderr
    record = json.loads((tmp_path / "s1" / "config.json").read_text())["metadata"]
    assert record["loss_last_20"] < record["loss_first_20"] and record["guide_layer"] == 1 and record["stage"] == 1
    assert "--stage 1" in record["command"] and "seeded subset of 12 examples" in record["data"]

    stage2 = train("--data", data, "--stage", 2, "--init", tmp_path / "s1", "--out", tmp_path / "s2", "--steps", 40,
                   "--batch-size", 6, "--lr", "3e-3", "--budgets", "8,16", "--cache-dir", cache)
    assert stage2.returncode == 0, stage2.stderr
    record = json.loads((tmp_path / "s2" / "config.json").read_text())["metadata"]
    assert record["loss_last_20"] < record["loss_first_20"] and record["budgets"] == [8, 16]
    ppm = PruningModule.load(tmp_path / "s2")
    assert ppm.config.num_visual_tokens == 64 and not (tmp_path / "s2" / "train_state.pt").exists()

    gradient = train("--data", data, "--stage", 1, "--labels", "answer-gradient", "--out", tmp_path / "g1", "--steps",
                     40, "--batch-size", 6, "--lr", "3e-3", "--cache-dir", cache)
    assert gradient.returncode == 0, gradient.stderr
    record = json.loads((tmp_path / "g1" / "config.json").read_text())["metadata"]
    assert record["loss_last_20"] < record["loss_first_20"]
    assert record["labels"] == "answer-gradient" and record["guide_layer"] is None
    assert len(list(cache.glob("answer-gradient-tiny-random-llava-*.pt"))) == 1

    # distil the stage-1 PPM into a smaller one: its scores are the labels
    student = train("--data", data, "--stage", 1, "--labels", "ppm", "--teacher-ppm", tmp_path / "s1", "--dim", 16,
                    "--blocks", 1, "--out", tmp_path / "d1", "--steps", 40, "--batch-size", 6, "--lr", "3e-3",
                    "--cache-dir", cache)
    assert student.returncode == 0, student.stderr
    record = json.loads((tmp_path / "d1" / "config.json").read_text())["metadata"]
    assert record["loss_last_20"] < record["loss_first_20"] and record["labels"] == "ppm"
    assert record["teacher_ppm"] == {"path": str(tmp_path / "s1"), "weights_sha256": weights_sha256(tmp_path / "s1")}
    config = PruningModule.load(tmp_path / "d1").config
    assert (config.dim, config.num_blocks) == (16, 1)
    (labels_file,) = cache.glob("ppm-labels-tiny-random-llava-*.pt")
    assert torch.load(labels_file).shape == (12, 64)


def test_training_is_deterministic_and_resumes(tmp_path):
    data = write_dataset(tmp_path, 3)
    common = ["--model", "tiny-random-llava", "--data", data, "--stage", 1, "--steps", 40, "--batch-size", 4,
              "--save-every", 5, "--cache-dir", tmp_path / "cache"]
    assert train(*common[2:], "--out", tmp_path / "a").returncode == 0
    weights = (tmp_path / "a" / "model.safetensors").read_bytes()

    # interrupt a second run as soon as its first resume point is on disk, then run it again:
    # the same seed gives the uninterrupted run's weights, bit for bit
    command = [sys.executable, "-m", "covipal.train", *map(str, common), "--out", str(tmp_path / "c")]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = tmp_path / "c" / "train_state.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    assert state.exists() and not (tmp_path / "c" / "model.safetensors").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0 and "resuming at step" in resumed.stderr
    assert (tmp_path / "c" / "model.safetensors").read_bytes() == weights and not state.exists()


@requires_easy_vqa  # the sweep's questions come from easy-VQA even for the tiny model
def test_guide_layer_sweep_with_the_answer_gradient_row():
    result = subprocess.run([sys.executable, "-m", "covipal.training.guide_layer_sweep", "--model", "tiny-random-llava",
                             "--layers", "0,1", "--budgets", "8,2", "--limit", "4", "--answer-gradient"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| ") and "k=" not in line]
    assert [r[0].strip() for r in rows] == ["0", "1", "answer-gradient"]
    assert all(len(r) == 3 and all(0 <= float(v) <= 100 for v in r[1:]) for r in rows)


@pytest.mark.parametrize("args, message", [
    (["--stage", 3, "--out", "x"], "argument --stage: invalid choice"),
    (["--stage", 1, "--out", "x", "--labels", "oracle"], "argument --labels: invalid choice"),
    (["--stage", 2, "--out", "x", "--budgets", "8,64"], "--budgets must be below the model's 64 visual tokens"),
    (["--stage", 1, "--out", "x", "--budgets", "8,zero"], "--budgets takes comma-separated positive integers"),
    (["--stage", 1, "--out", "x", "--data", "nope.json"], "no such data file: nope.json"),
    (["--stage", 1, "--out", "x", "--labels", "ppm"], "--labels ppm and --teacher-ppm DIR go together"),
    (["--stage", 1, "--out", "x", "--teacher-ppm", "."], "--labels ppm and --teacher-ppm DIR go together"),
    (["--stage", 1, "--out", "x", "--labels", "ppm", "--teacher-ppm", "nope"], "no PPM checkpoint at nope"),
])
def test_cli_errors(tmp_path, args, message):
    result = train(*args, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_own_llava_checkpoint_gets_a_ppm_that_exports(tiny, tmp_path):
    """`covipal.train --model llava-1.5-7b --model-path DIR --data FILE.json` on a LLaVA saved in the Hugging Face
    layout (tiny-random-llava's weights), then `export.py --ppm` on its output, verified against PyTorch."""
    from test_models import hf_processor

    from covipal_export.export.exporter import ExportOptions, export_model

    checkpoint = tmp_path / "my-llava"
    tiny.hf_model.save_pretrained(checkpoint)
    hf_processor(tiny).save_pretrained(checkpoint)
    data = write_dataset(tmp_path, 4)
    result = subprocess.run([sys.executable, "-m", "covipal.train", "--model", "llava-1.5-7b", "--model-path",
                             str(checkpoint), "--data", str(data), "--stage", "1", "--labels", "answer-gradient",
                             "--target", "normal-rank", "--steps", "30", "--batch-size", "4", "--lr", "3e-3",
                             "--dim", "16", "--blocks", "1", "--label-batch-size", "3", "--out", str(tmp_path / "ppm"),
                             "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "ppm" / "config.json").read_text())["metadata"]
    assert record["model"] == "llava-1.5-7b" and record["model_source"] == str(checkpoint)
    assert record["loss_last_20"] < record["loss_first_20"] and "seeded subset of 8 examples" in record["data"]

    export = export_model(ExportOptions(model="llava-1.5-7b", model_path=checkpoint, ppm=tmp_path / "ppm", budget=8,
                                        out=tmp_path / "export"))
    pruning = export.manifest.pruning
    assert pruning.strategy == "ppm" and pruning.ppm.checkpoint == str((tmp_path / "ppm").resolve())
    assert pruning.ppm.config["dim"] == 16 and export.report is not None and export.report.passed
