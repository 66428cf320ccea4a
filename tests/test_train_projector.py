"""mini-llava's projector training: token dropout hides exactly the dropped visual tokens."""

from __future__ import annotations

import torch

from covipal.models.mini_llava import MiniLlavaProjector, ProjectorConfig
from covipal.training.train_projector import answer_loss, token_dropout


def test_token_dropout_sizes():
    generator = torch.Generator().manual_seed(0)
    assert token_dropout(4, 64, rate=0.0, min_keep=16, generator=generator).all()
    keep = token_dropout(200, 64, rate=1.0, min_keep=16, generator=generator)  # [200, 64]
    sizes = keep.sum(1)
    assert keep.shape == (200, 64) and sizes.min() >= 16 and sizes.max() <= 64
    assert len(set(sizes.tolist())) > 20  # the subset size varies across the range
    half = token_dropout(400, 64, rate=0.5, min_keep=16, generator=generator).all(1).float().mean()
    assert 0.4 < half < 0.6
    again = token_dropout(8, 64, 0.5, 16, torch.Generator().manual_seed(3))
    assert torch.equal(again, token_dropout(8, 64, 0.5, 16, torch.Generator().manual_seed(3)))


def test_dropped_tokens_do_not_reach_the_loss(tiny, questions):
    torch.manual_seed(0)
    num_visual, hidden = tiny.num_visual_tokens, tiny.text_config.hidden_size
    projector = MiniLlavaProjector(ProjectorConfig(vision_channels=8, hidden_size=hidden))
    prompts = [tiny.require_processor().tokenize(q) for q in questions[:2]]
    rows = [(prompts[0] + [5, 6], 2), (prompts[1] + [7], 1)]
    features = torch.randn(2, num_visual, 8)  # [B, N, C]
    keep = token_dropout(2, num_visual, rate=1.0, min_keep=4, generator=torch.Generator().manual_seed(1))
    assert not keep.all(1).any()
    changed = features.clone()
    changed[~keep] = torch.randn(int((~keep).sum()), 8) * 5  # new features for the dropped tokens only
    with torch.no_grad():
        pruned = answer_loss(tiny, projector, features, rows, keep)
        assert torch.allclose(answer_loss(tiny, projector, changed, rows, keep), pruned, atol=1e-6)
        full = answer_loss(tiny, projector, features, rows)
        assert torch.allclose(answer_loss(tiny, projector, features, rows, torch.ones_like(keep)), full)
        assert not torch.allclose(answer_loss(tiny, projector, changed, rows), full, atol=1e-4)
