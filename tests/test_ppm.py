"""The PPM: shapes, masking, checkpoint round trip, parameter and FLOP counts."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from covipal.errors import CovipalError
from covipal.modeling_ppm import PPMConfig, PruningModule, default_ppm_config, describe


def make_ppm(seed: int = 0, **overrides) -> PruningModule:
    torch.manual_seed(seed)
    config = PPMConfig(**{"hidden_size": 64, "grid_size": 8, "dim": 32, "num_heads": 4, **overrides})
    return PruningModule(config).eval()


def inputs(batch: int = 2, num_text: int = 11, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(batch, 64, 64, generator=generator)  # [B, N, D]
    text = torch.randn(batch, num_text, 64, generator=generator)  # [B, T, D]
    mask = torch.ones(batch, num_text, dtype=torch.bool)
    mask[0, num_text - 3:] = False  # row 0 has 3 padding positions
    return visual, text, mask


def test_scores_shape_and_dtype():
    scores = make_ppm()(*inputs())
    assert scores.shape == (2, 64) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()


def test_masked_text_is_ignored_and_real_text_matters():
    ppm, (visual, text, mask) = make_ppm(), inputs()
    with torch.no_grad():
        base = ppm(visual, text, mask)
        changed_pad = text.clone()
        changed_pad[0, -3:] = 100.0  # masked positions of row 0
        assert torch.allclose(ppm(visual, changed_pad, mask), base, atol=1e-5)
        changed_question = text.clone()
        changed_question[0, 0] = torch.randn(64, generator=torch.Generator().manual_seed(9))  # a valid token of row 0
        assert not torch.allclose(ppm(visual, changed_question, mask)[0], base[0], atol=1e-4)


def test_row_without_text_is_finite():
    visual, text, mask = inputs()
    mask[1] = False
    assert torch.isfinite(make_ppm()(visual, text, mask)).all()


def test_rows_are_independent():
    ppm, (visual, text, mask) = make_ppm(), inputs()
    with torch.no_grad():
        batched = ppm(visual, text, mask)
        single = ppm(visual[1:], text[1:], mask[1:])
    assert torch.allclose(batched[1:], single, atol=1e-5)


def test_save_load_round_trip(tmp_path):
    ppm, batch = make_ppm(seed=3), inputs()
    ppm.save(tmp_path / "ckpt", metadata={"note": "test"})
    record = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert record["format"] == "covipal-ppm" and record["config"]["dim"] == 32
    assert record["metadata"] == {"note": "test"}
    loaded = PruningModule.load(tmp_path / "ckpt")
    assert loaded.config == ppm.config
    with torch.no_grad():
        assert torch.equal(loaded(*batch), ppm(*batch))


def test_load_missing_checkpoint(tmp_path):
    with pytest.raises(CovipalError, match="no PPM checkpoint at .*expected config.json and model.safetensors"):
        PruningModule.load(tmp_path / "nowhere")


def test_wrong_visual_shape():
    visual, text, mask = inputs()
    with pytest.raises(CovipalError, match=r"this PPM expects visual tokens \[B, 64, 64\], got \[2, 49, 64\]"):
        make_ppm()(visual[:, :49], text, mask)


def test_parameter_count():
    ppm = make_ppm()
    d, hidden, blocks = 32, 64, 2
    attention = 4 * (d * d + d)
    block = 2 * attention + 4 * (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)  # 2 attn, 4 norms, MLP
    expected = 2 * hidden + (hidden * d + d) + 2 * d + 2 * 8 * d + d + blocks * block + 2 * d + d + 1
    assert ppm.num_parameters() == expected


@pytest.mark.parametrize("num_text", [1, 11, 40])
def test_flops_match_torch_flop_counter(num_text):
    ppm, (visual, text, mask) = make_ppm(), inputs(batch=1, num_text=num_text)
    mask[:] = True
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        ppm(visual, text, mask)
    assert counter.get_total_flops() == ppm.flops(64, num_text)


def test_describe_and_default_config():
    config = default_ppm_config(hidden_size=4096, num_visual_tokens=576)
    assert config.grid_size == 24 and config.dim == 256
    line = describe(PruningModule(config), 576, 40)
    assert line.startswith("PPM: ") and "GFLOPs" in line
    with pytest.raises(CovipalError, match="square grid of visual tokens, got 50"):
        default_ppm_config(64, 50)
