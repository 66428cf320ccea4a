"""Pruned generation against Hugging Face: full-token parity and a hand-built pruned reference."""

from __future__ import annotations

import pytest
import torch

import covipal.generation
from covipal.budget import ALL
from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate, generate_from_batch
from covipal.pruning import prune_prompt
from covipal.selection import keep_topk_in_order
from covipal.strategies import make_strategy

NEW_TOKENS = 16


def hf_generate(tiny, **inputs) -> torch.Tensor:
    """Greedy Hugging Face generate; returns only the new tokens."""
    with torch.no_grad():
        out = tiny.hf_model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
    prompt_length = inputs["input_ids"].shape[1] if "input_ids" in inputs else 0
    return out[:, prompt_length:]


@pytest.mark.parametrize("rows", [[0], [1], [2], [0, 1], [2, 1]])
@pytest.mark.parametrize("budget", [ALL, 64])  # "all" and k = N are both no pruning
def test_unpruned_equals_hf_generate(tiny, images, questions, rows, budget):
    batch = tiny.processor([images[i] for i in rows], [questions[i] for i in rows])
    expected = hf_generate(tiny, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                           pixel_values=batch.pixel_values)
    out = generate_from_batch(tiny, batch, strategy=make_strategy("random"), budget=budget,
                              sampling=SamplingConfig(NEW_TOKENS))
    assert out.sequences.tolist() == expected.tolist()
    assert out.kept_index.shape == (len(rows), 64) and out.prefill_length == batch.input_ids.shape[1]


def test_a_budget_above_n_is_refused(tiny, images, questions):
    batch = tiny.processor(images[:1], questions[:1])
    with pytest.raises(CovipalError, match="^budget 500 is larger than the 64 visual tokens of this model$"):
        generate_from_batch(tiny, batch, strategy=make_strategy("random"), budget=500)


def hand_built_prefill(tiny, batch, kept_index, policy):
    """The pruned prompt, row by row in plain Python: prefix + kept visual tokens + suffix, left-padded."""
    image_id = tiny.image_token_id
    with torch.no_grad():
        visual = tiny.encode_images(batch.pixel_values)
    rows = []
    for b in range(batch.input_ids.shape[0]):
        ids = [t for t, m in zip(batch.input_ids[b].tolist(), batch.attention_mask[b].tolist()) if m]
        start = ids.index(image_id)
        embeds, positions = [], []
        for pos, token in enumerate(ids):
            if token != image_id:
                embeds.append(tiny.embed_tokens(torch.tensor(token)))
                positions.append(pos)
            elif pos - start in kept_index[b].tolist():
                embeds.append(visual[b, pos - start])
                positions.append(pos)
        if policy == "compact":
            positions = list(range(len(embeds)))
        rows.append((torch.stack(embeds), positions))
    length = max(len(p) for _, p in rows)
    hidden = rows[0][0].shape[-1]
    inputs_embeds = torch.zeros(len(rows), length, hidden)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    position_ids = torch.zeros(len(rows), length, dtype=torch.long)
    for b, (embeds, positions) in enumerate(rows):
        pad = length - len(positions)
        inputs_embeds[b, pad:], mask[b, pad:] = embeds, 1
        position_ids[b, pad:] = torch.tensor(positions)
    return inputs_embeds.detach(), mask, position_ids


@pytest.mark.parametrize("policy", ["keep", "compact"])
@pytest.mark.parametrize("strategy_name, budget", [("uniform", 16), ("random", 6), ("text-sim", 25), ("knorm", 8),
                                                    ("cdpruner", 10), ("dart", 12)])
@pytest.mark.parametrize("rows", [[0], [1, 2]])
def test_pruned_equals_hand_built_reference(tiny, images, questions, policy, strategy_name, budget, rows):
    batch = tiny.processor([images[i] for i in rows], [questions[i] for i in rows])
    strategy = make_strategy(strategy_name, language_model=tiny.language_model, seed=3)
    out = generate_from_batch(tiny, batch, strategy=strategy, budget=budget, position_policy=policy,
                              sampling=SamplingConfig(NEW_TOKENS))
    assert out.kept_index.shape == (len(rows), budget)
    assert torch.equal(out.kept_index, keep_topk_in_order(out.scores, budget))
    inputs_embeds, mask, position_ids = hand_built_prefill(tiny, batch, out.kept_index, policy)
    assert out.prefill_length == inputs_embeds.shape[1] == batch.input_ids.shape[1] - 64 + budget
    expected = hf_generate(tiny, inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids)
    assert out.sequences.tolist() == expected.tolist()


def test_position_policies_differ_and_keep_preserves_positions(tiny, images, questions):
    batch = tiny.processor(images[:1], questions[:1])
    with torch.no_grad():
        visual = tiny.encode_images(batch.pixel_values)
        embeds = tiny.embed_tokens(batch.input_ids.masked_fill(batch.input_ids == tiny.image_token_id, 0))
    strategy = make_strategy("uniform")
    keep = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, tiny.image_token_id, strategy, 8, "keep")
    compact = prune_prompt(embeds, batch.input_ids, batch.attention_mask, visual, tiny.image_token_id, strategy, 8,
                           "compact")
    length = batch.input_ids.shape[1]
    assert compact.position_ids.tolist() == [list(range(length - 64 + 8))]
    assert keep.position_ids[0, -1].item() == length - 1  # the last prompt token keeps its original position
    assert torch.equal(keep.inputs_embeds, compact.inputs_embeds)


def test_pruning_changes_the_answer_input(tiny, images, questions):
    """Different budgets feed different prefixes: the kept tokens really are what the decoder sees."""
    batch = tiny.processor(images[:1], questions[:1])
    outputs = {budget: generate_from_batch(tiny, batch, strategy=make_strategy("uniform"), budget=budget,
                                           sampling=SamplingConfig(NEW_TOKENS)).sequences.tolist()
               for budget in (2, 64)}
    assert outputs[2] != outputs[64]


def test_sampling_is_seeded(tiny, images, questions):
    def sample(seed):
        return generate(tiny, images[:2], questions[:2], strategy=make_strategy("uniform"), budget=16,
                        sampling=SamplingConfig(NEW_TOKENS, temperature=1.0, top_p=0.9, seed=seed)).sequences
    first = sample(1)
    assert torch.equal(first, sample(1))
    assert not torch.equal(first, sample(2))


def test_top_p_tiny_mass_is_greedy(tiny, images, questions):
    greedy = generate(tiny, images[:1], questions[:1], sampling=SamplingConfig(NEW_TOKENS)).sequences
    nucleus = generate(tiny, images[:1], questions[:1],
                       sampling=SamplingConfig(NEW_TOKENS, temperature=1.0, top_p=1e-6)).sequences
    assert torch.equal(greedy, nucleus)


def test_stops_at_eos_and_pads_finished_rows(tiny, images, questions, monkeypatch):
    free = generate(tiny, images[:2], questions[:2], sampling=SamplingConfig(NEW_TOKENS)).sequences
    eos = free[0, 2].item()  # make row 0's third token the end of sequence
    monkeypatch.setattr(covipal.generation, "eos_token_ids", lambda model: [eos])
    stopped = generate(tiny, images[:2], questions[:2], sampling=SamplingConfig(NEW_TOKENS)).sequences
    first_eos = free[0].tolist().index(eos)
    assert stopped[0, : first_eos + 1].tolist() == free[0, : first_eos + 1].tolist()
    assert (stopped[0, first_eos + 1 :] == tiny.text_config.pad_token_id).all()
    if eos not in free[1].tolist():  # row 1 runs on to the end
        assert stopped[1].tolist() == free[1].tolist()


def test_answers_are_decoded_text(tiny, images, questions):
    out = generate(tiny, images[:2], questions[:2], strategy=make_strategy("uniform"), budget=8,
                   sampling=SamplingConfig(8))
    assert len(out.texts) == 2 and all(isinstance(t, str) for t in out.texts)
    assert out.texts[0] == tiny.processor.decode(out.sequences[0].tolist())
