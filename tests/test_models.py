"""Model registry, checkpoint loading, prompt processing and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaProcessor

from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate
from covipal.models import MODEL_NAMES, load_model
from covipal.models.tiny import CHAT_TEMPLATE
from covipal.strategies import make_strategy


def hf_processor(tiny) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tiny.processor.tokenizer, patch_size=7,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def test_tiny_model_shape(tiny):
    assert tiny.num_visual_tokens == 64 and tiny.hidden_size == 64 and tiny.image_size == 56
    assert tiny.processor.render("Hi?") == "USER: <image>\nHi? ASSISTANT:"


def test_tiny_model_is_seeded():
    first, second = load_model("tiny-random-llava"), load_model("tiny-random-llava")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name


def test_processor_matches_hugging_face(tiny, images, questions):
    ours = tiny.processor(images[:2], questions[:2])
    prompts = [tiny.processor.render(q) for q in questions[:2]]
    theirs = hf_processor(tiny)(images=[Image.fromarray(i) for i in images[:2]], text=prompts,
                                return_tensors="pt", padding=True, padding_side="left")
    assert torch.equal(ours.input_ids, theirs.input_ids)
    assert torch.equal(ours.attention_mask, theirs.attention_mask)
    assert torch.allclose(ours.pixel_values, theirs.pixel_values, atol=1e-6)
    assert ours.input_ids[0, 0] == tiny.processor.tokenizer.pad_token_id  # shorter row is left-padded
    assert (ours.input_ids == tiny.image_token_id).sum(-1).tolist() == [64, 64]


def test_llava_7b_random_weights_on_meta():
    model = load_model("llava-1.5-7b", random_weights=True, device="meta")
    params = sum(p.numel() for p in model.hf_model.parameters())
    assert round(params / 1e9, 2) == 7.06
    assert model.num_visual_tokens == 576 and model.hidden_size == 4096 and model.image_size == 336
    assert model.text_config.num_hidden_layers == 32 and model.text_config.vocab_size == 32064


def test_llava_13b_random_weights_and_fewer_layers():
    assert round(sum(p.numel() for p in load_model("llava-1.5-13b", random_weights=True, device="meta")
                     .hf_model.parameters()) / 1e9, 2) == 13.35
    short = load_model("llava-1.5-7b", random_weights=True, num_layers=2, device="meta")
    assert short.text_config.num_hidden_layers == 2 and "2 decoder layers" in short.info.source


def test_llava_checkpoint_from_local_path(tiny, tmp_path, images, questions):
    """The pretrained path (from_pretrained + AutoProcessor, offline) on a checkpoint saved in llava-hf layout."""
    tiny.hf_model.save_pretrained(tmp_path)
    hf_processor(tiny).save_pretrained(tmp_path)
    loaded = load_model("llava-1.5-7b", path=tmp_path)
    assert loaded.info.source == str(tmp_path) and loaded.num_visual_tokens == 64
    kwargs = dict(strategy=make_strategy("uniform"), budget=16, sampling=SamplingConfig(8))
    expected = generate(tiny, images[:2], questions[:2], **kwargs).sequences
    assert torch.equal(generate(loaded, images[:2], questions[:2], **kwargs).sequences, expected)


def test_missing_checkpoint_errors(tmp_path, monkeypatch):
    with pytest.raises(CovipalError, match=f"llava-1.5-7b: no checkpoint at {tmp_path}"):
        load_model("llava-1.5-7b", path=tmp_path)
    monkeypatch.setattr("covipal.models.registry._cached_snapshot", lambda repo_id: None)
    with pytest.raises(CovipalError, match=r"checkpoint llava-hf/llava-1\.5-13b-hf not found in the Hugging Face "
                                           r"cache \(.+\); download it .*hf download llava-hf/llava-1\.5-13b-hf"):
        load_model("llava-1.5-13b")


def test_unknown_model_and_bad_combinations():
    with pytest.raises(CovipalError, match="unknown model 'llava-9b'; choose one of: " + ", ".join(MODEL_NAMES)):
        load_model("llava-9b")
    with pytest.raises(CovipalError, match="num_layers can only be changed with random weights"):
        load_model("llava-1.5-7b", num_layers=2)


def test_random_weights_without_tokenizer(monkeypatch):
    monkeypatch.setattr("covipal.models.registry._cached_snapshot", lambda repo_id: None)
    model = load_model("llava-1.5-7b", random_weights=True, num_layers=1, device="meta")
    with pytest.raises(CovipalError, match="built without a tokenizer"):
        model.require_processor()


@pytest.mark.parametrize("image, message", [
    (np.zeros((32, 32, 4), np.uint8), r"an image array must have shape \[H, W, 3\], got \[32, 32, 4\]"),
    (np.zeros((32, 32), np.uint8), r"an image array must have shape \[H, W, 3\], got \[32, 32\]"),
    (np.zeros((32, 32, 3), np.float32), "an image array must be uint8"),
    ("/nonexistent/cat.jpg", "image not found: /nonexistent/cat.jpg"),
    (42, "unsupported image type int"),
])
def test_bad_images(tiny, image, message):
    with pytest.raises(CovipalError, match=message):
        tiny.processor([image], ["What is it?"])


def test_unreadable_image_files(tiny, tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not an image")
    jpeg = tmp_path / "broken.jpg"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(jpeg)
    jpeg.write_bytes(jpeg.read_bytes()[:200])  # truncated: a corrupt JPEG
    for path in (text, jpeg):
        with pytest.raises(CovipalError, match=f"cannot read image {path}"):
            tiny.processor([path], ["What is it?"])


def test_bad_questions_and_pixel_values(tiny, images):
    with pytest.raises(CovipalError, match="the question is empty"):
        tiny.processor(images[:1], ["   "])
    with pytest.raises(CovipalError, match="must not contain '<image>'"):
        tiny.processor(images[:1], ["<image> again?"])
    with pytest.raises(CovipalError, match="need one question per image, got 2 images and 1 questions"):
        tiny.processor(images[:2], ["one?"])
    with pytest.raises(CovipalError, match=r"pixel_values must have shape \[B, 3, 56, 56\] for tiny-random-llava, "
                                           r"got \[1, 3, 32, 32\]"):
        tiny.encode_images(torch.zeros(1, 3, 32, 32))
