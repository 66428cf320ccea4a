"""Model registry, checkpoint loading, prompt processing and input errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor

from covipal.errors import CovipalError
from covipal.generation import SamplingConfig, generate
from covipal.models import MODEL_NAMES, load_model
from covipal.models.random_init import fill_random, fill_units
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


def meta_tiny_llava():
    """tiny-random-llava's architecture on the meta device (nothing allocated)."""
    from covipal.models.tiny import build_config, build_tokenizer

    config = build_config(build_tokenizer())
    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return LlavaForConditionalGeneration(config).eval()


def test_random_weights_are_made_one_layer_at_a_time():
    """Never a whole fp32 copy: when each unit is done, the model holds the finished units in fp16, the rest on meta."""
    model = meta_tiny_llava()
    done = []
    for unit in fill_units(model, torch.float16):
        made = [p for p in model.parameters() if p.device.type != "meta"]
        assert {p.dtype for p in made} == {torch.float16}, unit
        done.append(len(made))
    assert done == sorted(done) and len(done) > 2 * model.config.text_config.num_hidden_layers
    assert all(p.device.type == "cpu" for p in [*model.parameters(), *model.buffers()])
    layer = model.model.language_model.layers[0]
    assert torch.all(layer.input_layernorm.weight.detach() == 1)  # the model's own init: norms at one
    assert 0.05 < float(layer.mlp.up_proj.weight.detach().float().std()) < 0.15  # initializer_range 0.1


def test_random_weights_are_seeded_and_the_same_in_every_dtype():
    made = {}
    for dtype in (torch.float32, torch.float16, torch.float16):
        torch.manual_seed(3)
        made.setdefault(dtype, []).append(fill_random(meta_tiny_llava(), dtype).state_dict())
    full, (half, again) = made[torch.float32][0], made[torch.float16]
    for key, value in full.items():
        assert torch.equal(half[key], value.to(half[key].dtype)) and torch.equal(half[key], again[key]), key


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
