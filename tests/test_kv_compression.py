"""KV-cache compression: none is today's path, eviction keeps what SnapKV/PyramidKV keep, the SpindleKV
codebook rebuilds what it should (re-RoPE'd), batches equal single rows, and the CLI's bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from covipal import kv_cache
from covipal.__main__ import main as covipal_main
from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate
from covipal.kv_cache import CodebookLayer, CompressedDecoder, EvictedLayer, compress_layer, evicted_bytes
from covipal.kv_compression import KVConfig, build_codebook, keep_indices, merge_or_add, pyramid_budgets, window_scores
from covipal.pruning import prune_prompt
from covipal_export.runtime.cli import main as run_trt_main

ROOT = Path(__file__).resolve().parents[1]
IMAGE = str(ROOT / "covipal" / "assets" / "shapes.png")
NEW_TOKENS = 12


def answer(tiny, images, questions, rows, kv):
    return generate(tiny, [images[i] for i in rows], [questions[i] for i in rows], sampling=SamplingConfig(NEW_TOKENS),
                    kv=kv)


def test_none_is_todays_path_and_keeping_everything_matches_it(tiny, images, questions, monkeypatch):
    batch = tiny.processor(images[:2], questions[:2])
    with torch.no_grad():
        out = tiny.hf_model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                     pixel_values=batch.pixel_values, max_new_tokens=NEW_TOKENS, do_sample=False)
    hf = out[:, batch.input_ids.shape[1]:].tolist()
    none = answer(tiny, images, questions, [0, 1], KVConfig())
    assert none.sequences.tolist() == hf
    # budget 1.0: every token in every layer, through covipal.kv_cache's own decoder; thresholds above 1: no merges,
    # and room for every token in a codebook layer (at equal memory an unmerged codebook layer keeps fewer)
    monkeypatch.setattr(kv_cache, "evicted_bytes", lambda *shape: 1 << 62)
    for kv in (KVConfig("eviction", 1.0), KVConfig("spindlekv", 1.0, threshold_k=1.01, threshold_v=1.01)):
        assert answer(tiny, images, questions, [0, 1], kv).sequences.tolist() == hf, kv


@pytest.mark.parametrize("kv", [KVConfig("eviction", 0.4), KVConfig("spindlekv", 0.3), KVConfig("spindlekv", 40)])
def test_a_left_padded_batch_equals_single_rows(tiny, images, questions, kv):
    together = answer(tiny, images, questions, [0, 1, 2], kv).sequences
    for row in range(3):
        alone = answer(tiny, images, questions, [row], kv).sequences[0]
        assert together[row, :alone.shape[0]].tolist() == alone.tolist(), row


def test_eviction_keeps_the_most_attended_keys_and_the_window():
    # 12 keys, D = 4; the two window queries (positions 10, 11) look at keys 2 and 5 only
    keys = torch.zeros(1, 1, 12, 4)
    keys[0, 0, 2, 0] = keys[0, 0, 5, 1] = 20.0
    query = torch.zeros(1, 1, 12, 4)
    query[0, 0, 10, 0] = query[0, 0, 11, 1] = 1.0
    valid = torch.ones(1, 12, dtype=torch.bool)
    scores = window_scores(query, keys, valid, scaling=1.0, window=2, pool_kernel=1)
    index, kept = keep_indices(scores, torch.tensor([4]), valid)
    assert index.tolist() == [[[2, 5, 10, 11]]] and kept.all()
    # pooled over 3 keys, key 2's neighbours outscore the rest; left padding (keys 0, 1) is never kept
    valid[0, :2] = False
    scores = window_scores(query, keys, valid, scaling=1.0, window=2, pool_kernel=3)
    index, kept = keep_indices(scores, torch.tensor([7]), valid)
    assert index.tolist() == [[[2, 3, 4, 5, 6, 10, 11]]] and kept.all()
    index, kept = keep_indices(scores, torch.tensor([11]), valid)  # more than the 10 real keys: one slot invalid
    assert sorted(index[kept].tolist()) == list(range(2, 12)) and index[~kept].tolist()[0] in (0, 1)


def test_pyramid_budgets_fall_linearly_and_keep_the_mean():
    budgets = pyramid_budgets(100, 400, 5, 0.5, window=16)
    assert budgets == [150, 125, 100, 75, 50]
    assert pyramid_budgets(400, 400, 5, 0.5, window=16) == [400] * 5  # everything: no slope left
    assert pyramid_budgets(20, 400, 3, 0.5, window=16) == [24, 20, 16]  # the last layer keeps the window


def test_codebook_rebuilds_duplicates_exactly_and_others_within_the_threshold():
    torch.manual_seed(0)
    directions = torch.randn(3, 16)
    vectors = torch.cat([directions[[0, 1, 0, 2, 1]] * torch.tensor([[1.0], [2.0], [3.5], [0.5], [7.0]]),
                         torch.randn(40, 16)])
    entries, ref = build_codebook(vectors, threshold=0.95)
    rebuilt = entries[ref] * vectors.norm(dim=-1, keepdim=True)
    assert torch.allclose(rebuilt[:5], vectors[:5], atol=1e-5)  # scaled copies: one entry each
    assert ref[0] == ref[2] and ref[1] == ref[4] and len(set(ref[:5].tolist())) == 3
    cosine = torch.nn.functional.cosine_similarity(rebuilt, vectors, dim=-1)
    assert (cosine > 0.95).all() and torch.allclose(rebuilt.norm(dim=-1), vectors.norm(dim=-1))
    pairwise = entries @ entries.T - 2 * torch.eye(len(entries))
    assert (pairwise <= 0.95).all()  # entries are pairwise apart: a rebuild adds exactly a new vector
    merged, joined = merge_or_add(entries, vectors[2] * 9, 0.95)
    assert joined == ref[2] and merged.shape == entries.shape
    grown, added = merge_or_add(entries, -entries.sum(0), 0.95)
    assert added == len(entries) and grown.shape[0] == len(entries) + 1


def test_codebook_layer_rebuilds_re_ropes_keys_and_unfolds_gqa(tiny):
    # tiny-random-llava: 2 KV heads for 4 query heads; each head's keys are scaled copies of two directions
    torch.manual_seed(0)
    config = tiny.text_config
    batch, kv_heads, length = 2, config.num_key_value_heads, 10
    dim = config.hidden_size // config.num_attention_heads
    groups = config.num_attention_heads // kv_heads
    directions = torch.randn(batch, kv_heads, 2, dim)
    pick = torch.randint(0, 2, (batch, kv_heads, length))
    scale = torch.rand(batch, kv_heads, length, 1) + 0.5
    keys_pre = directions.gather(2, pick[..., None].expand(-1, -1, -1, dim)) * scale
    values = keys_pre.flip(-1) * 2
    positions = torch.arange(length).repeat(batch, 1) + 3
    valid_tokens = torch.ones(batch, length, dtype=torch.bool)
    index, valid = keep_indices(torch.rand(batch, kv_heads * groups, length), torch.tensor([6, 6]), valid_tokens)
    layer = CodebookLayer(keys_pre, values, positions, index, valid, KVConfig("spindlekv", 0.6))
    assert layer.refs[0].shape == (batch, kv_heads * groups, 6)
    assert all(len(book) <= 2 for row in layer.books[0] for book in row)  # two directions per KV head
    rotary = tiny.language_model.rotary_emb
    keys, rebuilt_values, _ = layer.read(rotary)
    cos, sin = rotary(keys_pre, positions)
    _, roped = apply_rotary_pos_emb(keys_pre, keys_pre, cos, sin)  # [B, Hkv, L, D]
    take = index[..., None].expand(-1, -1, -1, dim)
    expected_keys = roped.repeat_interleave(groups, 1).gather(2, take)
    expected_values = values.repeat_interleave(groups, 1).gather(2, take)
    assert torch.allclose(keys, expected_keys, atol=1e-5) and torch.allclose(rebuilt_values, expected_values, atol=1e-5)


def test_a_codebook_layer_spends_evictions_bytes_on_more_tokens():
    # one row, 2 KV heads of 2 query heads, 64 tokens: keys and values on 3 directions per head (they merge), or
    # random (they do not); eviction would keep 8 tokens per KV head
    torch.manual_seed(0)
    kv_heads, groups, length, dim = 2, 2, 64, 16
    directions = torch.randn(1, kv_heads, 3, dim)
    pick = torch.randint(0, 3, (1, kv_heads, length))
    similar = directions.gather(2, pick[..., None].expand(-1, -1, -1, dim)) * (torch.rand(1, kv_heads, length, 1) + 0.5)
    scores = torch.rand(1, kv_heads * groups, length)
    valid = torch.ones(1, length, dtype=torch.bool)
    positions = torch.arange(length)[None]
    allowance = evicted_bytes(1, kv_heads, 8, dim, 4)
    kept = {}
    for name, keys in (("similar", similar), ("random", torch.randn(1, kv_heads, length, dim))):
        layer = compress_layer(scores, torch.tensor([8]), valid, keys, keys, keys.flip(-1), positions, True,
                               KVConfig("spindlekv", 8))
        assert isinstance(layer, CodebookLayer) and layer.nbytes() <= allowance, name
        kept[name] = int(layer.valid.sum(-1).min())
    assert kept["similar"] > 8 > kept["random"]  # 3 entries a head cost little; 8 unmerged tokens do not fit


def test_decode_memory_is_what_each_layer_holds(tiny, images, questions):
    config = tiny.text_config
    head_dim = config.hidden_size // config.num_attention_heads
    none = answer(tiny, images, questions, [0], KVConfig())
    evicted = answer(tiny, images, questions, [0], KVConfig("eviction", 0.4))
    length, steps = none.prefill_length, none.sequences.shape[1] - 1
    assert none.kv_bytes == config.num_hidden_layers * 2 * config.num_key_value_heads * (length + steps) * head_dim * 4
    kept = pyramid_budgets(round(0.4 * length), length, config.num_hidden_layers, 0.5, 16)
    slots = sum(k + steps for k in kept) * config.num_key_value_heads
    assert evicted.kv_bytes == slots * (2 * head_dim * 4 + 1)  # K and V in fp32, one validity byte
    assert evicted.kv_bytes < 0.5 * none.kv_bytes


def test_compressed_layers_have_the_expected_heads(tiny, images, questions):
    batch = tiny.processor(images[:2], questions[:2])
    prompt = prune_prompt(tiny.embed_prompt(batch.input_ids), batch.input_ids, batch.attention_mask,
                          tiny.encode_images(batch.pixel_values), tiny.image_token_id, None, "all", "keep")
    decoder = CompressedDecoder(tiny, KVConfig("spindlekv", 0.5, codebook_layers=0.5))
    with torch.no_grad():
        decoder.prefill(prompt.inputs_embeds, prompt.attention_mask, prompt.position_ids)
    config = tiny.text_config
    shallow, deep = decoder.layers
    assert isinstance(shallow, CodebookLayer) and isinstance(deep, EvictedLayer)
    assert shallow.valid.shape[:2] == (2, config.num_attention_heads)  # unfolded: per query head
    assert deep.keys.shape[:2] == (2, config.num_key_value_heads)  # shared per KV group


def test_bad_kv_configs_are_refused():
    for kwargs, message in [(dict(method="magic"), "unknown KV method 'magic'"),
                            (dict(method="eviction", budget=0), "count must be positive, got 0"),
                            (dict(method="eviction", budget=1.5), "fraction must be in (0, 1], got 1.5")]:
        with pytest.raises(CovipalError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            KVConfig(**kwargs)


COMMANDS = {"covipal": ["-m", "covipal"], "run_trt": ["run_trt.py"]}  # the PyTorch CLI and the runtime's
MAINS = {"covipal": covipal_main, "run_trt": run_trt_main}


def run(*args: str, command: str = "covipal") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *COMMANDS[command], IMAGE, "What is it?", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("args, message", [
    (["--kv-budget", "0"], "argument --kv-budget: KV budget as a count must be positive, got 0"),
    (["--kv-budget", "1.5"], "argument --kv-budget: KV budget as a fraction must be in (0, 1], got 1.5"),
    (["--kv-budget", "half"], "argument --kv-budget: expected a fraction in (0, 1] or a positive count"),
    (["--kv-method", "magic"], "argument --kv-method: invalid choice: 'magic'"),
])
def test_cli_bad_kv_input_is_one_line(in_process, command, args, message):
    result = in_process(MAINS[command], IMAGE, "What is it?", *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert message in lines[0]


def test_cli_reports_kv_bytes():
    records = {}
    for method in ("none", "spindlekv"):
        result = run("--kv-method", method, "--kv-budget", "0.25", "--max-new-tokens", "4", "--json")
        assert result.returncode == 0, result.stderr
        records[method] = json.loads(result.stdout)
    assert records["none"]["kv_budget"] is None and records["spindlekv"]["kv_budget"] == 0.25
    assert 0 < records["spindlekv"]["kv_bytes"] < records["none"]["kv_bytes"]
