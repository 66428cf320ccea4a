"""Answer-gradient teacher: how much the answer's likelihood gains from attending more to each visual token.

The stage-2 loss (covipal.training.soft_pruning.answer_loss) with every key bias at 0 is the unpruned model;
its gradient with respect to those biases is a first-order, answer-aware importance:

    key_bias [B, N] = 0 (requires grad)  ->  answer cross-entropy of the frozen model
    label[b, i] = -d loss / d key_bias[b, i]        > 0: reading token i more makes the answer likelier

One forward and one backward pass of the frozen decoder per batch (the base model's weights get no
gradient). Unlike the attention labels it uses the answer, so it is a teacher for training only.
"""

from __future__ import annotations

import torch

from covipal.models.base import VisionLanguageModel
from covipal.training.soft_pruning import answer_loss


def answer_gradient_labels(model: VisionLanguageModel, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                           answer_lengths: list[int], visual_tokens: torch.Tensor) -> torch.Tensor:
    """`[B, N]` float32 importance of each visual token for its row's answer.

    input_ids / attention_mask: [B, L] left-padded prompt + answer rows whose last `answer_lengths[b]`
    tokens are the answer; visual_tokens: [B, N, D].
    """
    key_bias = torch.zeros(visual_tokens.shape[:2], dtype=visual_tokens.dtype, requires_grad=True)  # [B, N]
    with torch.enable_grad():
        # summed over the batch's answers so that each row's gradient does not depend on the batch's size
        loss = answer_loss(model, input_ids, attention_mask, answer_lengths, visual_tokens, key_bias,
                           reduction="sum")
        (gradient,) = torch.autograd.grad(loss, key_bias)
    return -gradient.float()
