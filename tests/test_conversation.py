"""`Pipeline.chat`: follow-up turns prefilled after the cache give what one fresh prefill of the whole chat gives."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, decode_loop, generate_from_batch
from covipal.models.processing import PromptBatch
from covipal.pruning import prune_prompt
from covipal_export.runtime import Pipeline
from covipal_export.runtime.reference import reference_from_manifest

NEW_TOKENS = 8
BUDGET = 6


@pytest.fixture(scope="module")
def pipe(tiny_export: Path) -> Pipeline:
    return Pipeline.from_dir(tiny_export, backend="ort", threads=1)


@pytest.fixture(scope="module")
def reference(pipe):
    return reference_from_manifest(pipe.manifest)


def fresh_greedy(reference, pipe, image, question, fed: list[int]) -> tuple[list[int], torch.Tensor]:
    """PyTorch, one prefill: the pruned first prompt followed by `fed` ids, then greedy tokens; and the logits."""
    model, strategy = reference
    batch = pipe.processor([image], [question])
    with torch.no_grad():
        prompt = prune_prompt(model.embed_prompt(batch.input_ids), batch.input_ids, batch.attention_mask,
                              model.encode_images(batch.pixel_values), model.image_token_id, strategy, BUDGET, "keep")
        extra = torch.tensor([fed])
        embeds = torch.cat([prompt.inputs_embeds, model.embed_tokens(extra)], dim=1)  # [1, P + S, D]
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
        start = int(prompt.position_ids[0, -1]) + 1
        positions = torch.cat([prompt.position_ids, torch.arange(start, start + len(fed))[None]], dim=1)
        cache = model.new_cache()
        logits = model.decode(embeds, mask, positions, cache)[:, -1]  # [1, V]

        def step(token, mask, position):
            return model.decode(model.embed_tokens(token[:, None]), mask, position, cache)[:, -1]

        special = pipe.manifest.special_tokens
        tokens = decode_loop(logits, mask, positions, step, SamplingConfig(NEW_TOKENS), special.eos, special.pad,
                             stop_at_eos=False)
        return [int(t) for t in tokens], logits


def test_follow_ups_equal_one_fresh_prefill_of_the_chat(pipe, reference, images, questions):
    chat = pipe.chat(images[0], budget=BUDGET)
    first = chat.ask(questions[0], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    alone = pipe.generate(images[0], questions[0], budget=BUDGET, max_new_tokens=NEW_TOKENS, ignore_eos=True)
    np.testing.assert_array_equal(first.sequences, alone.sequences)  # the first turn is a plain call
    answer1 = first.sequences[0].tolist()
    fed = answer1 + pipe.processor.follow_up(questions[1])  # the answer's last token is no EOS here
    assert answer1[-1] not in pipe.manifest.special_tokens.eos
    second = chat.ask(questions[1], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    want, _ = fresh_greedy(reference, pipe, images[0], questions[0], fed)
    assert second.sequences[0].tolist() == want
    assert second.prefill_length == len(fed) - len(answer1) + 1  # the last answer token + the follow-up's text
    np.testing.assert_array_equal(second.kept_index, first.kept_index)  # the first question's selection
    assert second.timings_ms.vision == 0 and second.timings_ms.vision_cache_misses == 0
    third = chat.ask(questions[2], max_new_tokens=NEW_TOKENS, ignore_eos=True)
    fed += second.sequences[0].tolist() + pipe.processor.follow_up(questions[2])
    assert third.sequences[0].tolist() == fresh_greedy(reference, pipe, images[0], questions[0], fed)[0]
    assert [q for q, _ in chat.turns] == questions and chat.turns[2][1] == third.answer


def test_continuing_prefill_logits_equal_a_fresh_prefill(pipe, reference, images, questions):
    """The decoder graph with past KV and S > 1 new positions, against PyTorch's single prefill."""
    backend = pipe.backend
    batch = pipe.processor([images[1]], [questions[0]])
    prompt = backend.prune(batch.input_ids, batch.attention_mask, backend.encode_images(batch.pixel_values), BUDGET,
                           "keep")
    _, cache = backend.prefill(prompt)
    fed = pipe.processor.follow_up("And what colour is it?")
    mask = torch.ones(1, prompt.attention_mask.shape[1] + len(fed), dtype=torch.long)
    start = int(prompt.position_ids[0, -1]) + 1
    got = backend.extend(cache, torch.tensor([fed]), mask, torch.arange(start, start + len(fed))[None])
    _, want = fresh_greedy(reference, pipe, images[1], questions[0], fed)
    torch.testing.assert_close(got, want.float(), atol=1e-4, rtol=1e-4)


def test_a_full_context_ends_the_chat_in_one_line(pipe, images):
    chat = pipe.chat(images[2], budget=BUDGET)
    chat.ask("What is it?", max_new_tokens=2)
    context = pipe.manifest.shapes.max_context
    with pytest.raises(CovipalError, match=rf"^the conversation is full: {chat.positions_used} positions used \+ "
                                           rf"\d+ for this question \+ {context} new tokens need \d+, this export's "
                                           rf"context holds {context}; start a new chat$"):
        chat.ask("And now?", max_new_tokens=context)
    assert chat.ask("And now?", max_new_tokens=2).answer == chat.turns[-1][1]  # the chat goes on
    with pytest.raises(CovipalError, match="the question is empty"):
        chat.ask("  ")


def test_reselect_prunes_the_whole_chat_again(pipe, reference, images, questions):
    """reselect=True: a follow-up is the PyTorch generate of the whole chat, pruned for it (new kept tokens)."""
    model, strategy = reference
    chat = pipe.chat(images[1], budget=BUDGET, reselect=True)
    first = chat.ask(questions[0], max_new_tokens=NEW_TOKENS)
    answer1 = first.sequences[0].tolist()
    assert len(answer1) == NEW_TOKENS and answer1[-1] not in pipe.manifest.special_tokens.eos
    second = chat.ask(questions[1], max_new_tokens=NEW_TOKENS)
    batch = pipe.processor([images[1]], [questions[0]])
    full = torch.tensor([batch.input_ids[0].tolist() + answer1 + pipe.processor.follow_up(questions[1])])
    want = generate_from_batch(model, PromptBatch(full, torch.ones_like(full), batch.pixel_values), strategy=strategy,
                               budget=BUDGET, sampling=SamplingConfig(NEW_TOKENS))
    np.testing.assert_array_equal(second.sequences, want.sequences.numpy())
    np.testing.assert_array_equal(second.kept_index, want.kept_index.numpy())
    assert second.timings_ms.vision_cache_hits == 1 and second.prefill_length == full.shape[1] - 64 + BUDGET
