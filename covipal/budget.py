"""The visual-token budget: how many of the N visual tokens the decoder sees. Its one owner.

    ALL                          "all": no pruning, every one of the N tokens in its original order, unscored
    check_budget(budget)         a positive integer (numpy and 0-d tensors included) or "all", before N is known
    resolve_budget(budget, N)    the budget as k in 1..N ("all" -> N); anything else is a CovipalError
    budget_arg / parse_budgets   the command-line forms: "64", "all"; "all,64,32"

Policy: a budget above N is refused everywhere (export, runtime, eval, bench) with the one message
written here, never clamped in silence. Keeping k = N tokens is the same as no pruning, so callers
skip scoring when `resolve_budget` returns N. Only the pruning graph clamps its budget input to
[1, N] (`covipal.selection.keep_topk_traceable`): a graph cannot raise, and the runtime checks the
budget before it feeds one.
"""

from __future__ import annotations

import argparse
from typing import Literal, Union

import numpy as np
import torch

from covipal.errors import CovipalError

ALL = "all"
Budget = Union[int, Literal["all"]]


def check_budget(budget: Budget | np.integer | torch.Tensor) -> Budget:
    """The budget as a plain int or "all", before N is known: a positive int (numpy or 0-d integer tensor
    included) or "all"; anything else is a CovipalError."""
    if isinstance(budget, str):
        if budget == ALL:
            return ALL
        raise CovipalError(f"budget must be a positive integer or {ALL!r}, got {budget!r}")
    if isinstance(budget, torch.Tensor):
        if budget.numel() != 1 or budget.dtype.is_floating_point or budget.dtype == torch.bool:
            raise CovipalError(f"budget must be a single integer, got a tensor of shape {list(budget.shape)} "
                               f"and dtype {budget.dtype}")
        budget = int(budget.item())
    elif isinstance(budget, (bool, np.bool_)) or not isinstance(budget, (int, np.integer)):
        raise CovipalError(f"budget must be a positive integer, got {budget}")  # str(): numpy's True, not np.True_
    if budget <= 0:
        raise CovipalError(f"budget must be a positive integer, got {budget}")
    return int(budget)


def resolve_budget(budget: Budget | np.integer | torch.Tensor, num_tokens: int, source: str = "this model") -> int:
    """k in 1..num_tokens for `budget` (see `check_budget`); "all" is N, and above N is refused.

    source: whose tokens these are, for the error above N ("tiny-random-llava", "this export", ...).
    """
    budget = check_budget(budget)
    if budget == ALL:
        return num_tokens
    if budget > num_tokens:
        raise CovipalError(f"budget {budget} is larger than the {num_tokens} visual tokens of {source}")
    return budget


def parse_budget(text: str) -> Budget:
    """One budget as typed: a positive integer or "all"."""
    text = text.strip()
    if text == ALL:
        return ALL
    try:
        value = int(text)
    except ValueError:
        raise CovipalError(f"expected a positive integer or {ALL!r}, got {text!r}") from None
    if value <= 0:
        raise CovipalError(f"expected a positive integer, got {value}")
    return value


def budget_arg(text: str) -> Budget:
    """argparse type of a `--budget` flag: a positive integer or "all"."""
    try:
        return parse_budget(text)
    except CovipalError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def parse_budgets(text: str, flag: str = "--budgets", allow_all: bool = True) -> list[Budget]:
    """Comma-separated budgets in the given order, without repeats; "all" only where `allow_all`."""
    budgets: list[Budget] = []
    for item in text.split(","):
        try:
            value = parse_budget(item)
        except CovipalError:
            value = None
        if value is None or (value == ALL and not allow_all):
            kinds = f"positive integers and {ALL!r}" if allow_all else "comma-separated positive integers"
            raise CovipalError(f"{flag} takes {kinds}, got {item.strip()!r}")
        if value not in budgets:
            budgets.append(value)
    return budgets
