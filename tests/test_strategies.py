"""Scoring strategies: each checked against an independent statement of its rule."""

from __future__ import annotations

import pytest
import torch

from covipal.cdpruner import cdpruner_picks, relevance
from covipal.dart import dart_picks
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


def test_text_sim_keeps_the_tokens_least_like_the_text():
    visual, text, mask = batch()
    question = text[0, :3].mean(0)  # the masked mean of row 0's valid text
    visual[0, 10] = question * 2.0  # same direction: cosine 1
    visual[0, 20] = -question  # opposite: cosine -1
    scores = make_strategy("text-sim").scores(visual, text, mask, 4)
    assert scores[0].argmax() == 20 and scores[0].argmin() == 10
    assert torch.isclose(scores[0, 20], torch.tensor(1.0), atol=1e-5)


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
     "unknown strategy 'top-attention'; choose one of: ppm, random, uniform, text-sim, knorm, cdpruner, dart"),
    ({"name": "cdpruner", "relevance_weight": 1.5}, r"--relevance-weight must be in \[0, 1\], got 1.5"),
    ({"name": "ppm"}, "strategy 'ppm' needs a trained PPM checkpoint"),
    ({"name": "knorm"}, "strategy 'knorm' needs the model's decoder"),
])
def test_strategy_errors(kwargs, message):
    with pytest.raises(CovipalError, match=message):
        make_strategy(**kwargs)


def test_knorm_layer_out_of_range(tiny):
    with pytest.raises(CovipalError, match="knorm layer must be in 0..1, got 5"):
        make_strategy("knorm", language_model=tiny.language_model, knorm_layer=5)


# --- cdpruner and dart -------------------------------------------------------------------------------------------

def conditional_kernel(visual, text, mask, theta, negative=True):
    """CDPruner's L = diag(q) S diag(q), q = exp(theta / (2 (1 - theta)) r), written out for one row."""
    unit = visual / visual.norm(dim=-1, keepdim=True)
    r = relevance(visual[None], text[None], mask[None], negative)[0]
    q = torch.exp(theta / (2 * (1 - theta)) * r).double()
    return q[:, None] * (unit @ unit.T).double() * q[None, :]


@pytest.mark.parametrize("theta", [0.0, 0.3, 0.5, 0.8])
def test_cdpruner_is_the_greedy_map_of_the_conditional_dpp(theta):
    """Every pick maximises log det of the conditional kernel over the picks so far plus one (brute force)."""
    visual, text, mask = batch(num_visual=24, hidden=32, seed=1)
    picks = cdpruner_picks(visual, text, mask, 8, theta)
    for b in range(2):
        kernel = conditional_kernel(visual[b], text[b], mask[b], theta)
        chosen = []
        for pick in picks[b].tolist():
            gains = {j: torch.logdet(kernel[chosen + [j]][:, chosen + [j]]).item()
                     for j in range(24) if j not in chosen}
            assert gains[pick] == pytest.approx(max(gains.values()), abs=1e-6)
            chosen.append(pick)


def test_cdpruner_limits_and_negative_relevance():
    visual, text, mask = batch(num_visual=40, hidden=16, seed=2)
    r = relevance(visual, text, mask, negative=True)  # [B, N] in [0, 1]
    assert torch.allclose(r.amin(-1), torch.zeros(2)) and torch.allclose(r.amax(-1), torch.ones(2))
    top = cdpruner_picks(visual, text, mask, 6, relevance_weight=1.0)  # relevance only: the top 6 of r
    assert torch.equal(top.sort(-1).values, r.topk(6).indices.sort(-1).values)
    diverse = cdpruner_picks(visual, text, mask, 6, relevance_weight=0.0)  # diversity only: the text does not matter
    assert torch.equal(diverse, cdpruner_picks(visual, torch.randn_like(text), mask, 6, relevance_weight=0.0))
    # negative relevance ranks like positive relevance to the negated text
    assert torch.equal(cdpruner_picks(visual, text, mask, 6), cdpruner_picks(visual, -text, mask, 6,
                                                                             negative_relevance=False))
    padded = text.clone()
    padded[0, 3:] = 50.0
    assert torch.equal(cdpruner_picks(visual, padded, mask, 6), cdpruner_picks(visual, text, mask, 6))


def test_dart_drops_the_duplicates_of_its_pivot():
    """One image pivot (the largest L1 norm) and no text pivot: its near-copies go, the distinct tokens stay."""
    generator = torch.Generator().manual_seed(0)
    distinct = torch.linalg.qr(torch.randn(16, 16, generator=generator))[0][:6]  # 6 orthonormal directions
    pivot = torch.zeros(16)
    pivot[0] = 10.0
    copies = 0.9 * pivot + 0.01 * torch.randn(5, 16, generator=generator)  # cosine ~1 with the pivot, smaller norms
    visual = torch.cat([copies[:2], pivot[None], copies[2:], distinct])[None]  # pivot at 2, copies at 0,1,3,4,5
    text, mask = torch.zeros(1, 1, 16), torch.zeros(1, 1, dtype=torch.bool)
    picks = dart_picks(visual, text, mask, 4, image_pivots=1, text_pivots=0)[0].tolist()
    similarity = torch.nn.functional.cosine_similarity(visual[0, 6:], pivot[None], dim=-1)
    assert picks[0] == 2 and picks[1:] == (6 + similarity.topk(3, largest=False).indices).tolist()


def test_dart_text_pivots_keep_what_differs_from_the_question():
    """With only a text pivot's quota left, the kept tokens are those least like the question token."""
    visual, text, mask = batch(num_visual=30, hidden=16, seed=3)
    picks = dart_picks(visual, text, mask, 5, image_pivots=1, text_pivots=1)  # quota round(5 / 2) = 2 per pivot
    for b in range(2):
        valid = text[b][mask[b]]
        image_pivot = int(visual[b].abs().sum(-1).argmax())
        text_pivot = valid[int(valid.abs().sum(-1).argmax())]
        rest = [j for j in range(30) if j != image_pivot]
        cos_image = torch.nn.functional.cosine_similarity(visual[b, rest], visual[b, image_pivot][None], dim=-1)
        after_image = [rest[i] for i in cos_image.topk(2, largest=False).indices.tolist()]
        rest = [j for j in rest if j not in after_image]
        cos_text = torch.nn.functional.cosine_similarity(visual[b, rest], text_pivot[None], dim=-1)
        after_text = [rest[i] for i in cos_text.topk(2, largest=False).indices.tolist()]
        assert picks[b].tolist() == [image_pivot, *after_image, *after_text]  # 1 + 2 + 2 = 5: nothing to fill


@pytest.mark.parametrize("name", ["cdpruner", "dart"])
def test_sequential_strategies_select_exactly_their_picks(name):
    visual, text, mask = batch(num_visual=20, hidden=8, seed=4)
    strategy = make_strategy(name)
    picks = {"cdpruner": cdpruner_picks, "dart": dart_picks}[name]
    for k in (1, 2, 7, 19, 20):
        kept, scores = strategy.select(visual, text, mask, k)
        assert kept.shape == (2, k) and all(len(set(row)) == k for row in kept.tolist())
        assert torch.equal(kept, picks(visual, text, mask, k).sort(-1).values)
        assert torch.equal(kept, keep_topk_in_order(strategy.scores(visual, text, mask, torch.tensor(k)), k))


def test_dart_fills_by_norm_when_the_quotas_fall_short():
    """1 image + 3 text pivots and k = 10: quota round(10 / 4) = 2, 1 + 4 x 2 = 9 kept, 1 more by the largest norm."""
    visual, text, mask = batch(num_visual=30, hidden=16, seed=5)
    mask = torch.ones_like(mask)
    picks = dart_picks(visual, text, mask, 10, image_pivots=1, text_pivots=3)
    for b in range(2):
        chosen = picks[b].tolist()
        rest = [j for j in range(30) if j not in chosen[:9]]
        assert len(set(chosen)) == 10 and chosen[9] == max(rest, key=lambda j: float(visual[b, j].norm()))
