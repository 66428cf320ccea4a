"""The budget's one owner (covipal.budget) and the two forms of keep-top-k, tested together.

`keep_topk_in_order` (eager, a stable sort) and `keep_topk_traceable` (TopK + sort, what ppm.onnx holds)
must keep the same tokens; eager `torch.topk` does not break ties toward the lower index, so the graph
form is compared as ONNX Runtime runs it.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.export import Dim

from covipal.budget import ALL, check_budget, parse_budget, parse_budgets, resolve_budget
from covipal.errors import CovipalError
from covipal.selection import keep_topk_in_order, keep_topk_traceable

MAX_TOKENS = 80


@pytest.mark.parametrize("budget, k", [
    (1, 1), (7, 7), (64, 64), (np.int64(5), 5), (np.int32(64), 64), (torch.tensor(3), 3), (ALL, 64),
])
def test_resolve_budget_takes_every_integer_form_and_all(budget, k):
    assert resolve_budget(budget, 64) == k and type(resolve_budget(budget, 64)) is int


@pytest.mark.parametrize("budget, message", [
    (0, "budget must be a positive integer, got 0"),
    (-2, "budget must be a positive integer, got -2"),
    (np.int64(0), "budget must be a positive integer, got 0"),
    (2.0, "budget must be a positive integer, got 2.0"),
    (True, "budget must be a positive integer, got True"),
    (np.bool_(True), "budget must be a positive integer, got True"),
    ("16", "budget must be a positive integer or 'all', got '16'"),
    (None, "budget must be a positive integer, got None"),
    (torch.tensor([1, 2]), "budget must be a single integer"),
    (65, "budget 65 is larger than the 64 visual tokens of this model"),
    (np.int64(65), "budget 65 is larger than the 64 visual tokens of this model"),
])
def test_resolve_budget_refuses_in_one_line(budget, message):
    with pytest.raises(CovipalError, match=message.replace("[", r"\[")) as error:
        resolve_budget(budget, 64)
    assert "\n" not in str(error.value)


def test_the_error_above_n_names_whose_tokens():
    with pytest.raises(CovipalError, match="^budget 9 is larger than the 8 visual tokens of this export$"):
        resolve_budget(9, 8, "this export")
    assert check_budget(ALL) == ALL and check_budget(np.int16(9)) == 9  # the form alone, before N is known


def test_budget_parsers():
    assert parse_budget("all") == ALL and parse_budget(" 12 ") == 12
    assert parse_budgets("all, 64,8,64") == [ALL, 64, 8]
    assert parse_budgets("16,32", allow_all=False) == [16, 32]
    for text, message in [("0", "expected a positive integer, got 0"), ("x", "expected a positive integer or 'all'")]:
        with pytest.raises(CovipalError, match=message):
            parse_budget(text)
    with pytest.raises(CovipalError, match="--budgets takes positive integers and 'all', got '-1'"):
        parse_budgets("all,-1")
    with pytest.raises(CovipalError, match="--budgets takes comma-separated positive integers, got 'all'"):
        parse_budgets("8,all", allow_all=False)


class KeepTopK(nn.Module):
    def forward(self, scores: torch.Tensor, budget: torch.Tensor) -> torch.Tensor:
        return keep_topk_traceable(scores, budget)


@pytest.fixture(scope="module")
def traceable_graph(tmp_path_factory) -> ort.InferenceSession:
    """keep_topk_traceable exported the way ppm.onnx is (dynamo, opset 20), batch and N dynamic."""
    path = tmp_path_factory.mktemp("topk") / "keep_topk.onnx"
    batch, tokens = Dim("batch", min=1, max=8), Dim("tokens", min=2, max=MAX_TOKENS)
    program = torch.onnx.export(KeepTopK().eval(), (torch.rand(2, 10), torch.tensor(4)), dynamo=True, opset_version=20,
                                input_names=["scores", "budget"], output_names=["kept_index"],
                                dynamic_shapes=({0: batch, 1: tokens}, None), verbose=False)
    program.save(path)
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@settings(max_examples=150, deadline=None)
@given(batch=st.integers(1, 4), num_tokens=st.integers(2, MAX_TOKENS), budget=st.integers(1, MAX_TOKENS),
       levels=st.integers(1, 5), seed=st.integers(0, 2**31 - 1))
def test_the_graph_form_keeps_what_the_eager_rule_keeps(traceable_graph, batch, num_tokens, budget, levels, seed):
    generator = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (batch, num_tokens), generator=generator).float()  # few levels: many ties
    k = min(budget, num_tokens)
    graph = traceable_graph.run(None, {"scores": scores.numpy(), "budget": np.array(k, np.int64)})[0]
    assert np.array_equal(graph, keep_topk_in_order(scores, k).numpy())


def test_the_graph_form_clamps_what_the_eager_rule_refuses(traceable_graph):
    scores = torch.rand(2, 10, generator=torch.Generator().manual_seed(0))
    for budget, k in [(0, 1), (-5, 1), (11, 10), (500, 10)]:  # a graph cannot raise: it clamps to [1, N]
        graph = traceable_graph.run(None, {"scores": scores.numpy(), "budget": np.array(budget, np.int64)})[0]
        assert np.array_equal(graph, keep_topk_in_order(scores, k).numpy())
    with pytest.raises(CovipalError, match="budget 11 is larger than the 10 visual tokens"):
        keep_topk_in_order(scores, 11)
