"""`Pipeline.chat(image)`: questions about one image in one chat, each turn reusing the KV cache of those before.

    first ask     the usual call: vision (cached by frame) -> prune for this question -> prefill (the prefix
                  cache applies) -> decode
    follow-ups    only the new text is prefilled after the cache: the answer's last token when it is not an
                  EOS, the chat template's end of the answer and the next user turn (`PromptProcessor.follow_up`)
    pruning       follow-ups keep the first question's visual tokens (default): their KV is what the cache
                  holds; `reselect=True` prunes again for each follow-up, the PPM reading the whole chat's text,
                  and prefills the whole chat again (the vision cache still hits). On easy-VQA pairs it answered
                  no better and took 3-6x the follow-up's TTFT (docs/BENCHMARKS.md#frames-cameras-and-chats)
    context full  one-line CovipalError naming the positions used and the export's context

One conversation is one caller's (not shared between threads); the Pipeline under it may be.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from covipal.budget import Budget
from covipal.errors import CovipalError
from covipal.models.processing import ImageInput, PromptBatch
from covipal_export.runtime.backend import KVCache

if TYPE_CHECKING:
    from covipal_export.runtime.pipeline import GenerationResult, Pipeline


class Conversation:
    """A chat about one image; `ask` answers the next question, `turns` holds (question, answer) pairs."""

    def __init__(self, pipe: "Pipeline", image: ImageInput, budget: Budget | None, color: str,
                 position_policy: str | None, reselect: bool = False):
        self.pipe, self.image, self.budget, self.color = pipe, image, budget, color
        self.position_policy, self.reselect = position_policy, reselect
        self.turns: list[tuple[str, str]] = []
        self._ids: list[int] = []  # the whole chat so far, unpruned (N image tokens), as the cache holds it
        self._pixels: torch.Tensor | None = None  # [1, 3, S, S]
        self._cache: KVCache | None = None
        self._mask = torch.zeros(1, 0, dtype=torch.long)  # [1, P] what the cache holds
        self._next_position = 0  # position id of the next token fed
        self._pending: list[int] = []  # the last answer token, not fed back yet (unless it was an EOS)
        self._kept_index = None

    @property
    def positions_used(self) -> int:
        return self._mask.shape[1]

    def ask(self, question: str, *, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
            seed: int = 0, ignore_eos: bool = False) -> "GenerationResult":
        """The answer to `question`, given the image and the earlier turns."""
        pipe = self.pipe
        run = pipe._start(max_new_tokens, temperature, top_p, seed, self.budget, self.position_policy, ignore_eos)
        if self._cache is None:  # the first question: a plain call
            batch = run.prepare([self.image], [question], self.color)
            self._pixels, turn = batch.pixel_values, batch.input_ids[0].tolist()
            prompt, logits, cache = run.prefill(batch)
            mask, positions, self._kept_index = prompt.attention_mask, prompt.position_ids, run.kept_index
        else:
            mark = time.perf_counter()
            turn = self._pending + pipe.processor.follow_up(question)  # what the cache lacks
            run.timings.preprocess = (time.perf_counter() - mark) * 1000.0
            shapes = pipe.manifest.shapes
            used = len(self._ids) - shapes.visual_tokens + run.k if self.reselect else self.positions_used
            needed = used + len(turn) + max_new_tokens
            if needed > shapes.max_context:
                raise CovipalError(f"the conversation is full: {used} positions used + {len(turn)} for this question "
                                   f"+ {max_new_tokens} new tokens need {needed}, this export's context holds "
                                   f"{shapes.max_context}; start a new chat")
            if self.reselect:  # the whole chat again, pruned for it: the vision cache hits, PPM and prefill run
                turn, self._ids = self._ids + turn, []
                full = torch.tensor([turn], dtype=torch.long)  # [1, L]
                prompt, logits, cache = run.prefill(PromptBatch(full, torch.ones_like(full), self._pixels))
                mask, positions, self._kept_index = prompt.attention_mask, prompt.position_ids, run.kept_index
            else:  # only the new text, after the cache
                cache, new = self._cache, torch.tensor([turn], dtype=torch.long)  # [1, S]
                mask = torch.cat([self._mask, torch.ones_like(new)], dim=1)  # [1, P + S]
                positions = torch.arange(self._next_position, self._next_position + len(turn))[None]  # [1, S]
                mark = time.perf_counter()
                logits = pipe.backend.extend(cache, new, mask, positions)  # [1, V]
                run.timings.prefill = (time.perf_counter() - mark) * 1000.0
                run.kept_index, run.prefill_length = self._kept_index, len(turn)
        for _ in run.decode(logits, cache, mask, positions):
            pass
        tokens = run.rows[0]
        fed = len(tokens) - 1  # every answer token but the last went through the decoder
        self._ids += turn + tokens[:-1]
        self._cache, self._next_position = cache, int(positions[0, -1]) + 1 + fed
        self._mask = torch.cat([mask, mask.new_ones(1, fed)], dim=1)
        self._pending = [] if tokens[-1] in pipe.manifest.special_tokens.eos else tokens[-1:]
        result = run.result()
        self.turns.append((question, result.answer))
        return result
