"""KV-cache compression for decode: the config and its pieces (budgets, SnapKV scores, the codebook).

    none       the full cache (the model's own Hugging Face cache, untouched)
    eviction   SnapKV scores (pooled attention of the last `window` prompt queries) with a PyramidKV
               per-layer budget (more KV kept in shallow layers, linearly less in deep ones); GQA groups
               share one choice (scores averaged over the group's query heads), so each KV head keeps k_l
    spindlekv  eviction, plus in the first `codebook_layers` of the layers: K/V unfolded to the query
               heads, evicted per query head, and the survivors' pre-RoPE keys and values replaced by
               codebook[ref] x norm (greedy highest-degree node of the cosine graph, thresholds 0.98 / 0.95);
               such a layer keeps as many tokens as fit in the bytes eviction holds there (equal memory)

The budget is the mean number of prompt tokens kept per layer (and head): a fraction of each row's
prompt length in (0, 1], or a count. `covipal.kv_cache` runs the decoder on the compressed cache.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from typing import Union

import torch
import torch.nn.functional as F

from covipal.errors import CovipalError

KV_METHODS = ("none", "eviction", "spindlekv")
KVBudget = Union[int, float]  # float: a fraction in (0, 1]; int: a token count


@dataclass
class KVConfig:
    method: str = "none"
    budget: KVBudget = 1.0
    window: int = 16  # SnapKV observation window: the last prompt queries, always kept
    pool_kernel: int = 7  # SnapKV's 1-D average pooling of the scores over keys
    pyramid: float = 0.5  # layer 0 keeps (1 + p) x the mean budget, the last layer (1 - p) x
    codebook_layers: float = 0.2  # spindlekv: the shallow fraction of the layers with a codebook
    threshold_k: float = 0.98
    threshold_v: float = 0.95

    def __post_init__(self) -> None:
        if self.method not in KV_METHODS:
            raise CovipalError(f"unknown KV method {self.method!r}: expected one of {', '.join(KV_METHODS)}")
        self.budget = check_kv_budget(self.budget)
        if self.window <= 0 or self.pool_kernel <= 0 or self.pool_kernel % 2 == 0:
            raise CovipalError(f"window must be positive and pool_kernel odd and positive, got {self.window}, "
                               f"{self.pool_kernel}")
        if not 0 <= self.pyramid < 1 or not 0 <= self.codebook_layers <= 1:
            raise CovipalError(f"pyramid must be in [0, 1) and codebook_layers in [0, 1], got {self.pyramid}, "
                               f"{self.codebook_layers}")


def check_kv_budget(budget: KVBudget) -> KVBudget:
    """A fraction in (0, 1] (a float) or a positive token count (an int); anything else is a CovipalError."""
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise CovipalError(f"KV budget must be a fraction in (0, 1] or a positive count, got {budget!r}")
    if isinstance(budget, float) and not 0 < budget <= 1:
        raise CovipalError(f"KV budget as a fraction must be in (0, 1], got {budget}")
    if isinstance(budget, int) and budget <= 0:
        raise CovipalError(f"KV budget as a count must be positive, got {budget}")
    return budget


def kv_budget_arg(text: str) -> KVBudget:
    """argparse type of `--kv-budget`: "0.4" (a fraction, it has a point) or "512" (a count)."""
    try:
        value: KVBudget = float(text) if any(c in text for c in ".eE") else int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1] or a positive count, got {text!r}") from None
    try:
        return check_kv_budget(value)
    except CovipalError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def mean_keep(budget: KVBudget, length: int) -> int:
    """Prompt tokens kept per layer on average for a row of `length` real tokens."""
    count = round(budget * length) if isinstance(budget, float) else budget
    return max(1, min(count, length))


def pyramid_budgets(mean: int, length: int, num_layers: int, pyramid: float, window: int) -> list[int]:
    """PyramidKV: per-layer keep counts falling linearly from (1 + p) x mean to (1 - p) x mean, with the
    slope p lowered where that would leave [min(window, length), length] (so the mean stays `mean`)."""
    floor = min(window, length)
    mean = max(mean, floor)
    if num_layers == 1:
        return [mean]
    slope = max(0.0, min(pyramid, length / mean - 1, 1 - floor / mean))
    return [max(floor, min(length, round(mean * (1 + slope * (1 - 2 * layer / (num_layers - 1))))))
            for layer in range(num_layers)]


def window_scores(query: torch.Tensor, keys: torch.Tensor, key_valid: torch.Tensor, scaling: float,
                  window: int, pool_kernel: int) -> torch.Tensor:
    """SnapKV scores `[B, H, L]`: attention of the last `window` queries, summed and pooled over keys.

    query: [B, H, L, D] (post-RoPE); keys: [B, H, L, D] (post-RoPE, repeated to the query heads);
    key_valid: [B, L] (False at left padding). The window's own keys score +inf (always kept), padding -inf.
    """
    length = keys.shape[2]
    w = min(window, length)
    logits = query[:, :, -w:] @ keys.transpose(-1, -2) * scaling  # [B, H, w, L]
    rows = torch.arange(length - w, length)[:, None]  # the window queries' positions in the prompt
    allowed = (torch.arange(length)[None, :] <= rows) & key_valid[:, None, None, :]  # [B, 1, w, L]
    probs = torch.softmax(logits.float().masked_fill(~allowed, float("-inf")), dim=-1)
    scores = probs.sum(2)  # [B, H, L]
    valid = key_valid[:, None, :].to(scores.dtype).expand_as(scores)  # pooled over real keys only, as in one row
    pool = dict(kernel_size=pool_kernel, stride=1, padding=pool_kernel // 2)
    scores = F.avg_pool1d(scores, **pool) / F.avg_pool1d(valid, **pool).clamp_min(1e-9)
    scores[..., length - w:] = float("inf")
    return scores.masked_fill(~key_valid[:, None, :], float("-inf"))


def keep_indices(scores: torch.Tensor, counts: torch.Tensor, key_valid: torch.Tensor) -> tuple[torch.Tensor,
                                                                                                    torch.Tensor]:
    """The top `counts[b]` keys of each row and head, ascending: (index [B, H, k], valid [B, H, k]).

    scores: [B, H, L]; counts: [B] (k = counts.max(); slots past a row's count are invalid, as are
    padding keys a short row could not avoid).
    """
    k = int(counts.max())
    top = scores.topk(k, dim=-1).indices  # [B, H, k], best first
    rank_ok = torch.arange(k)[None, None, :] < counts[:, None, None]  # [B, 1, k]
    position = top.masked_fill(~rank_ok, scores.shape[-1])  # invalid slots sort last
    order = position.argsort(dim=-1)
    index = top.gather(-1, order)
    valid = rank_ok.expand_as(top).gather(-1, order) & key_valid.gather(1, index.flatten(1)).view_as(index)
    return index, valid


def build_codebook(vectors: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy codebook of unit directions for `vectors [n, D]`: (entries [C, D], ref [n]).

    The graph links vectors whose cosine similarity exceeds `threshold`; the highest-degree node left
    becomes an entry and takes all its neighbours left, until none is left. Entries are then pairwise at
    most `threshold` apart, so a rebuild over entries plus one new vector adds exactly that vector.
    """
    unit = F.normalize(vectors.float(), dim=-1)
    n = unit.shape[0]
    adjacent = (unit @ unit.T > threshold) | torch.eye(n, dtype=torch.bool)  # [n, n]
    degree = adjacent.sum(1)
    alive = torch.ones(n, dtype=torch.bool)
    ref = torch.empty(n, dtype=torch.long)
    entries = []
    while alive.any():
        node = int(degree.masked_fill(~alive, -1).argmax())
        members = adjacent[node] & alive
        ref[members] = len(entries)
        entries.append(unit[node])
        alive &= ~members
        degree -= adjacent[:, members].sum(1)
    stacked = torch.stack(entries) if entries else unit.new_zeros(0, unit.shape[1])
    return stacked.to(vectors.dtype), ref


def merge_or_add(entries: torch.Tensor, vector: torch.Tensor, threshold: float) -> tuple[torch.Tensor, int]:
    """A decode vector `[D]` joins the most similar entry above `threshold`, else it becomes a new entry
    (the rebuild, see `build_codebook`). Returns (entries [C', D], its ref)."""
    unit = F.normalize(vector.float(), dim=-1).to(entries.dtype)
    if entries.shape[0]:
        sims = entries.float() @ unit.float()
        best = int(sims.argmax())
        if float(sims[best]) > threshold:
            return entries, best
    return torch.cat([entries, unit[None]]), entries.shape[0]


def codebook_layer_count(config: KVConfig, num_layers: int) -> int:
    return math.ceil(config.codebook_layers * num_layers) if config.method == "spindlekv" else 0
