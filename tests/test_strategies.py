"""Scoring strategies: each checked against an independent statement of its rule."""

from __future__ import annotations

import pytest
import torch

from covipal.errors import CovipalError
from covipal.modeling_ppm import PPMConfig, PruningModule
from covipal.selection import keep_topk_in_order
from covipal.strategies import STRATEGY_NAMES, make_strategy


def batch(num_visual: int = 64, hidden: int = 64, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    visual = torch.randn(2, num_visual, hidden, generator=generator)
    text = torch.randn(2, 5, hidden, generator=generator)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return visual, text, mask


@pytest.mark.parametrize("num_visual", [1, 7, 64, 576])
def test_uniform_keeps_the_stride_grid(num_visual):
    visual, text, mask = batch(num_visual, hidden=8)
    uniform = make_strategy("uniform")
    for budget in sorted({1, 2, 3, max(1, num_visual // 4), max(1, num_visual // 10), num_visual, num_visual + 5}):
        k = min(budget, num_visual)
        for as_tensor in (False, True):
            given = torch.tensor(k) if as_tensor else k
            kept = keep_topk_in_order(uniform.scores(visual, text, mask, given), k)
            expected = [i * num_visual // k for i in range(k)]
            assert kept.tolist() == [expected, expected], (num_visual, k)


def test_random_is_seeded():
    visual, text, mask = batch()
    first = make_strategy("random", seed=7).scores(visual, text, mask, 8)
    assert torch.equal(first, make_strategy("random", seed=7).scores(visual, text, mask, 8))
    assert not torch.equal(first, make_strategy("random", seed=8).scores(visual, text, mask, 8))


def test_text_sim_prefers_tokens_like_the_question():
    visual, text, mask = batch()
    question = text[0, :3].mean(0)  # the masked mean of row 0's valid text
    visual[0, 10] = question * 2.0  # same direction: cosine 1
    visual[0, 20] = -question  # opposite: cosine -1
    scores = make_strategy("text-sim").scores(visual, text, mask, 4)
    assert scores[0].argmax() == 10 and scores[0].argmin() == 20
    assert torch.isclose(scores[0, 10], torch.tensor(1.0), atol=1e-5)


def test_text_sim_ignores_padding():
    visual, text, mask = batch()
    padded = text.clone()
    padded[0, 3:] = 50.0
    strategy = make_strategy("text-sim")
    assert torch.allclose(strategy.scores(visual, text, mask, 4), strategy.scores(visual, padded, mask, 4))


@pytest.mark.parametrize("layer", [0, 1])
def test_knorm_matches_keys_of_a_full_decoder_run(tiny, layer):
    lm = tiny.language_model
    visual = tiny.encode_images(torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))).detach()
    captured = {}
    hook = lm.layers[layer].self_attn.k_proj.register_forward_hook(lambda m, i, o: captured.setdefault("k", o))
    with torch.no_grad():
        lm(inputs_embeds=visual, attention_mask=torch.ones(2, 64, dtype=torch.long),
           position_ids=torch.arange(64).expand(2, -1))
    hook.remove()
    head_dim = lm.layers[layer].self_attn.head_dim
    expected = -captured["k"].view(2, 64, -1, head_dim).mean(2).norm(dim=-1)  # [B, N]
    with torch.no_grad():
        scores = make_strategy("knorm", language_model=lm, knorm_layer=layer).scores(visual, None, None, 8)
    assert torch.allclose(scores, expected, atol=1e-5)


def test_ppm_strategy_returns_the_module_scores():
    torch.manual_seed(0)
    ppm = PruningModule(PPMConfig(hidden_size=64, grid_size=8, dim=32)).eval()
    visual, text, mask = batch()
    with torch.no_grad():
        assert torch.equal(make_strategy("ppm", ppm=ppm).scores(visual, text, mask, 8), ppm(visual, text, mask))


def test_every_name_builds(tiny):
    ppm = PruningModule(PPMConfig(hidden_size=64, grid_size=8, dim=32))
    for name in STRATEGY_NAMES:
        assert make_strategy(name, language_model=tiny.language_model, ppm=ppm).name == name


@pytest.mark.parametrize("kwargs, message", [
    ({"name": "top-attention"},
     "unknown strategy 'top-attention'; choose one of: ppm, random, uniform, text-sim, knorm"),
    ({"name": "ppm"}, "strategy 'ppm' needs a trained PPM checkpoint"),
    ({"name": "knorm"}, "strategy 'knorm' needs the model's decoder"),
])
def test_strategy_errors(kwargs, message):
    with pytest.raises(CovipalError, match=message):
        make_strategy(**kwargs)


def test_knorm_layer_out_of_range(tiny):
    with pytest.raises(CovipalError, match="knorm layer must be in 0..1, got 5"):
        make_strategy("knorm", language_model=tiny.language_model, knorm_layer=5)
