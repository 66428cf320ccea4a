"""Keep-top-k in order: count, order, uniqueness, tie-breaking, budget forms and errors.

A budget above N is refused (covipal.budget's policy), so the generated budgets are capped at N here.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from covipal.errors import CovipalError
from covipal.selection import gather_tokens, keep_topk_in_order


def reference_keep(scores: torch.Tensor, budget: int) -> list[list[int]]:
    """The rule spelled out: sort by (-score, index), take the first k, return ascending."""
    k = min(budget, scores.shape[1])
    rows = []
    for row in scores.tolist():
        ranked = sorted(range(len(row)), key=lambda i: (-row[i], i))
        rows.append(sorted(ranked[:k]))
    return rows


@settings(max_examples=300, deadline=None)
@given(
    batch=st.integers(1, 4),
    num_tokens=st.integers(1, 80),
    budget=st.integers(1, 100),
    levels=st.integers(1, 6),  # few distinct values -> many ties
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_reference_rule_with_ties(batch, num_tokens, budget, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (batch, num_tokens), generator=generator).float()
    k = min(budget, num_tokens)
    kept = keep_topk_in_order(scores, k)
    assert kept.shape == (batch, k) and kept.dtype == torch.int64
    for row in kept.tolist():
        assert row == sorted(set(row)), "ascending and unique"
    assert kept.tolist() == reference_keep(scores, k)


@settings(max_examples=100, deadline=None)
@given(num_tokens=st.integers(1, 64), budget=st.integers(1, 64), seed=st.integers(0, 2**31 - 1))
def test_distinct_scores_keep_the_k_largest(num_tokens, budget, seed):
    scores = torch.rand(2, num_tokens, generator=torch.Generator().manual_seed(seed))
    k = min(budget, num_tokens)
    kept = keep_topk_in_order(scores, k)
    expected = torch.sort(torch.topk(scores, k).indices, dim=-1).values
    assert torch.equal(kept, expected)


def test_all_ties_keep_the_first_tokens():
    kept = keep_topk_in_order(torch.zeros(3, 10), 4)
    assert kept.tolist() == [[0, 1, 2, 3]] * 3


def test_budget_as_tensor_equals_int():
    scores = torch.rand(2, 30, generator=torch.Generator().manual_seed(1))
    for budget in (1, 7, 30):
        assert torch.equal(keep_topk_in_order(scores, torch.tensor(budget)), keep_topk_in_order(scores, budget))
    for budget in (45, torch.tensor(45)):
        with pytest.raises(CovipalError, match="budget 45 is larger than the 30 visual tokens"):
            keep_topk_in_order(scores, budget)


@pytest.mark.parametrize("budget, message", [
    (0, "budget must be a positive integer, got 0"),
    (-3, "budget must be a positive integer, got -3"),
    (2.5, "budget must be a positive integer, got 2.5"),
    (True, "budget must be a positive integer, got True"),
    (torch.tensor([2, 3]), "budget must be a single integer"),
    (torch.tensor(2.0), "budget must be a single integer"),
])
def test_bad_budgets(budget, message):
    with pytest.raises(CovipalError, match=message.replace("[", r"\[")):
        keep_topk_in_order(torch.rand(1, 8), budget)


def test_scores_must_be_2d():
    with pytest.raises(CovipalError, match=r"scores must have shape \[B, N\], got \[8\]"):
        keep_topk_in_order(torch.rand(8), 2)


def test_gather_tokens_picks_rows():
    tokens = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)  # [B, N, D]
    index = torch.tensor([[0, 4], [1, 2]])
    kept = gather_tokens(tokens, index)
    assert kept.shape == (2, 2, 3)
    assert torch.equal(kept[0], tokens[0, [0, 4]]) and torch.equal(kept[1], tokens[1, [1, 2]])
