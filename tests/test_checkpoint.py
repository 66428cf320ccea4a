"""LLaVA checkpoints from disk: sharded safetensors, the Hugging Face cache layout, and one-line refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from covipal.errors import CovipalError
from covipal.models import load_model
from tests.test_models import hf_processor


@pytest.fixture
def sharded(tiny, tmp_path):
    """The tiny LLaVA saved in llava-hf layout, sharded into several safetensors files with an index."""
    directory = tmp_path / "ckpt"
    tiny.hf_model.save_pretrained(directory, max_shard_size="200KB")
    hf_processor(tiny).save_pretrained(directory)
    return directory


def shards(directory):
    return sorted(set(json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"].values()))


def test_sharded_checkpoint_loads_same_weights(tiny, sharded):
    assert len(shards(sharded)) > 2
    loaded = load_model("llava-1.5-7b", path=sharded)
    expected = tiny.hf_model.state_dict()
    for key, value in loaded.hf_model.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_cache_layout_loads(tiny, sharded, tmp_path):
    repo = tmp_path / "hub" / "models--llava-hf--llava-1.5-7b-hf"
    shutil.copytree(sharded, repo / "snapshots" / "abc123")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    for path in (repo, tmp_path / "hub"):
        loaded = load_model("llava-1.5-7b", path=path)
        assert loaded.info.source == str(repo / "snapshots" / "abc123")
        assert torch.equal(loaded.hf_model.lm_head.weight, tiny.hf_model.lm_head.weight)


def test_missing_shard_is_named(sharded):
    gone = shards(sharded)[1]
    (sharded / gone).unlink()
    with pytest.raises(CovipalError, match=f"lacks 1 of .* weight shards \\({gone}\\)") as info:
        load_model("llava-1.5-7b", path=sharded)
    assert "\n" not in str(info.value)


def test_pickle_only_checkpoint_is_refused(tiny, tmp_path):
    tiny.hf_model.config.save_pretrained(tmp_path)
    torch.save(tiny.hf_model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(CovipalError, match=r"only pickle weights \(pytorch_model\*\.bin\), which are never loaded"):
        load_model("llava-1.5-7b", path=tmp_path)


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "is a 'llama' model, not a LLaVA checkpoint"),
    ({"text_config": {"hidden_size": 5120, "num_hidden_layers": 40}}, "is llava-1.5-13b.s .* --model llava-1.5-13b"),
])
def test_mismatched_config_is_refused(sharded, change, message):
    config = json.loads((sharded / "config.json").read_text())
    for key, value in change.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) else value
    (sharded / "config.json").write_text(json.dumps(config))
    with pytest.raises(CovipalError, match=message) as info:
        load_model("llava-1.5-7b", path=sharded)
    assert "\n" not in str(info.value)
