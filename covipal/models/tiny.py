"""`tiny-random-llava`: a real `LlavaForConditionalGeneration` from a tiny config, built offline in seconds.

Weights are random but seeded; the tokenizer is a byte-level BPE trained on a small built-in corpus
with `tokenizers`, wrapped as a transformers tokenizer with a LLaVA-1.5 style chat template.
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from covipal.models.processing import ImagePreprocessing, PromptProcessor

IMAGE_SIZE = 56
PATCH_SIZE = 7  # (56 / 7)^2 = 64 visual tokens
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# LLaVA-1.5's conversation format: "USER: <image>\n{question} ASSISTANT:"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for part in message['content'] %}{{ part['text'] }}{% endfor %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)

_CORPUS = """\
What is on the table? There is a red apple, a blue cup and a green bottle on the wooden table.
How many people are in the picture? Two people are standing near the door of the house.
Describe the image in detail. A small robot moves across the floor of a bright room.
What color is the car? The car parked on the street is white with black wheels.
Is there a dog in the image? Yes, a brown dog is sleeping on the grass under a tree.
What shape is in the middle? A yellow circle is in the middle, a gray square is on the left.
Where is the cat? The cat sits on the window next to a plant and a lamp.
What is the person holding? The person is holding a camera and looking at the sky.
Is it day or night? It is night, the lights of the city are on and the road is wet.
What does the sign say? The sign says stop, it is red and white at the corner of the road.
Which object is the largest? The largest object is the box at the back of the shelf.
Answer with one word. Yes. No. Red. Blue. Green. Circle. Square. Triangle. Left. Right. One. Two. Three.
"""


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A deterministic byte-level BPE trained on `_CORPUS`; adds `<s>` in front of every prompt."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(_CORPUS.splitlines(), trainer)
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos_id)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", additional_special_tokens=["<image>"])


def build_config(tokenizer: PreTrainedTokenizerFast) -> LlavaConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id, initializer_range=0.1)
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    return LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                       image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2, vision_feature_layer=-2,
                       vision_feature_select_strategy="default", projector_hidden_act="gelu",
                       tie_word_embeddings=False)


def build_tiny_llava(seed: int = 0) -> tuple[LlavaForConditionalGeneration, PromptProcessor]:
    """The seeded tiny model (fp32, eval mode, SDPA attention) and its prompt processor."""
    tokenizer = build_tokenizer()
    config = build_config(tokenizer)
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = PromptProcessor(
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_token="<image>",
        num_image_tokens=config.image_seq_length,
        image_preprocessing=ImagePreprocessing(size=IMAGE_SIZE, crop_size=IMAGE_SIZE, mean=CLIP_MEAN, std=CLIP_STD),
    )
    return model, processor
