"""A full-size LLaVA-1.5 checkpoint with random weights, in the Hugging Face layout, for runs without the Hub.

    PYTHONPATH=$PWD .venv/bin/python docs/bench/write_llava_checkpoint.py --out /work/big/llava-1.5-7b-random

writes what `hf download llava-hf/llava-1.5-7b-hf` would put in a directory, with the same shapes:
- `model-0000i-of-0000n.safetensors` (fp16, the Hub's key names: `language_model.model.*`,
  `language_model.lm_head.weight`, `vision_tower.vision_model.*`, `multi_modal_projector.*`) and
  `model.safetensors.index.json`;
- `config.json` (the registry's config for the alias, as `export.py --random-weights` builds it);
- the processor: a byte-level BPE tokenizer with LLaVA-1.5's ids (`<unk>` 0, `<s>` 1, `</s>` 2, `<image>` 32000,
  `<pad>` 32001; 32,002 tokens, the embedding padded to 32,064), CLIP's preprocessing at 336 px and the
  LLaVA-1.5 chat template.
The weights are `load_model(alias, random_weights=True)`'s under the same seed, made and written one layer at a
time, so the process holds about one shard (`--shard-gb`) and exports from the checkpoint (`--model-path`) and
from `--random-weights` write the same graphs.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CLIPImageProcessorPil, LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast

from covipal.models.random_init import fill_units
from covipal.models.registry import LLAVA_SPECS
from covipal.models.tiny import _CORPUS, CHAT_TEMPLATE, CLIP_MEAN, CLIP_STD

HUB_PREFIXES = (("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head."),
                ("model.vision_tower.", "vision_tower.vision_model."),
                ("model.multi_modal_projector.", "multi_modal_projector."))
TOKENIZER_SIZE = 32002  # LLaVA-1.5: Llama's 32,000, then <image> and <pad>


def hub_name(key: str) -> str:
    """The key a llava-hf checkpoint stores for one of our model's state dict keys."""
    for ours, hubs in HUB_PREFIXES:
        if key.startswith(ours):
            return hubs + key.removeprefix(ours)
    raise ValueError(f"no Hub name for {key}")


def write_weights(model: LlavaForConditionalGeneration, out: Path, shard_bytes: int) -> dict[str, str]:
    """Fill the meta-device `model` unit by unit, writing each unit's tensors into shards of about `shard_bytes`;
    returns the index's weight map (tensor -> shard)."""
    names = {id(module): name for name, module in model.named_modules()}
    shard: dict[str, torch.Tensor] = {}
    shard_files: list[list[str]] = []

    def flush() -> None:
        if shard:
            save_file(shard, out / f"shard-{len(shard_files)}.tmp", metadata={"format": "pt"})
            shard_files.append(list(shard))
            shard.clear()

    for unit in fill_units(model, torch.float16):
        prefix = names[id(unit)]
        for key, tensor in unit.state_dict(prefix=f"{prefix}." if prefix else "").items():
            if tensor.device.type != "meta" and hub_name(key) not in shard:
                shard[hub_name(key)] = tensor.contiguous()
        if sum(t.nbytes for t in shard.values()) >= shard_bytes:
            flush()
        unit.to("meta")  # written (or about to be): release it
    flush()
    weight_map = {}
    for i, keys in enumerate(shard_files):
        name = f"model-{i + 1:05d}-of-{len(shard_files):05d}.safetensors"
        (out / f"shard-{i}.tmp").rename(out / name)
        weight_map.update(dict.fromkeys(keys, name))
    return weight_map


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with LLaVA-1.5's special ids; the ids past the merges learnt from a small corpus are fillers."""
    trained = Tokenizer(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trained.train_from_iterator(_CORPUS.splitlines(), trainer)
    state = json.loads(trained.to_str())["model"]
    vocab = dict(state["vocab"])
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), TOKENIZER_SIZE - 2)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>", additional_special_tokens=["<image>"])
    wrapped.add_special_tokens({"pad_token": "<pad>"})
    return wrapped


def build_processor(image_size: int, patch_size: int) -> LlavaProcessor:
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                         crop_size={"height": image_size, "width": image_size},
                                         image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=patch_size,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=CHAT_TEMPLATE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the checkpoint directory (must not exist)")
    parser.add_argument("--model", choices=tuple(LLAVA_SPECS), default="llava-1.5-7b")
    parser.add_argument("--seed", type=int, default=0, help="torch's seed (export.py's --random-weights uses 0)")
    parser.add_argument("--shard-gb", type=float, default=2.0, help="about this many GB per shard")
    parser.add_argument("--layers", type=int, default=None, help="fewer decoder layers (to try the script quickly)")
    args = parser.parse_args()
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists")
    start = time.perf_counter()
    scratch = args.out.with_name(args.out.name + ".partial")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    config = LLAVA_SPECS[args.model].config(args.layers)
    config._attn_implementation = "sdpa"
    processor = build_processor(config.vision_config.image_size, config.vision_config.patch_size)
    tokenizer = processor.tokenizer
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in ("<unk>", "<s>", "</s>", "<image>", "<pad>")}
    assert ids == {"<unk>": 0, "<s>": 1, "</s>": 2, "<image>": config.image_token_id,
                   "<pad>": config.text_config.pad_token_id} and len(tokenizer) == TOKENIZER_SIZE, ids
    with torch.random.fork_rng():
        torch.manual_seed(args.seed)  # as covipal_export.runtime.reference.load_reference_model does
        with torch.device("meta"):
            model = LlavaForConditionalGeneration(config).eval()
        weight_map = write_weights(model, scratch, int(args.shard_gb * 1e9))
    sizes = {path.name: path.stat().st_size for path in scratch.glob("*.safetensors")}
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (scratch / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    config.dtype = torch.float16
    config.save_pretrained(scratch)
    processor.save_pretrained(scratch)
    scratch.rename(args.out)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"wrote {args.out}: {len(sizes)} shards, {sum(sizes.values()) / 1e9:.2f} GB, {len(weight_map)} tensors, "
          f"in {time.perf_counter() - start:.0f} s, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
