"""`python -m covipal.training.train_projector --out DIR`: train mini-llava's projector on easy-VQA train.

Only the projector learns; EfficientNet-Lite0 and SmolLM2 stay frozen. The frozen vision features
of every training image are computed once (and cached on disk). Each step runs a batch of
(image, question, answer) through the language model and takes the cross-entropy of the answer
tokens and `<|im_end|>`. With `--token-dropout P` (default 0.5), a share P of the questions sees
only a random subset of the visual tokens (the others masked out as keys, positions unchanged), so
that the frozen language model learns to answer from a pruned image. bf16 autocast on the CPU,
AdamW, linear warm-up then cosine decay (covipal.training.schedule). Deterministic for a seed;
`DIR/train_state.pt` (written every `--save-every` steps) makes an interrupted run resume where it
stopped; the final projector is written to DIR with the command.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tqdm import tqdm

from covipal.cli import ArgumentParser, positive_int, probability, quiet_libraries, run
from covipal.models.base import VisionLanguageModel
from covipal.models.mini_llava import MiniLlavaProjector, ProjectorConfig, build_mini_llava
from covipal.models.processing import load_image
from covipal.training.cache import DEFAULT_CACHE, cache_file, load_cached, save_cached
from covipal.training.data import easy_vqa
from covipal.training.resume import clear_resume_point, load_resume_point, save_resume_point
from covipal.training.schedule import learning_rate


@torch.no_grad()
def image_features(model: VisionLanguageModel, paths: list[Path], cache_dir: Path,
                   batch_size: int = 32) -> torch.Tensor:
    """Frozen tower features `[num_images, N, C]` (fp16) for `paths`, cached by the list of paths."""
    cache = cache_file(cache_dir, "effl0-stage5-224", map(str, paths))
    features = load_cached(cache)
    if features is not None:
        return features
    preprocess = model.processor.image_preprocessing
    tower = model.vision.vision_tower
    chunks = []
    for start in tqdm(range(0, len(paths), batch_size), desc="vision features", unit="batch"):
        pixels = torch.stack([torch.from_numpy(preprocess(load_image(p))) for p in paths[start : start + batch_size]])
        chunks.append(tower.get_image_features(pixels).half())  # [b, N, C]
    return save_cached(torch.cat(chunks), cache)


def encode_examples(model: VisionLanguageModel, examples: list[easy_vqa.VQAExample]) -> list[tuple[list[int], int]]:
    """(prompt + answer ids, answer length) per example; the answer ends with `<|im_end|>`."""
    tokenizer = model.processor.tokenizer
    encoded = []
    for example in examples:
        prompt = model.processor.tokenize(example.question)
        answer = tokenizer(example.answer + "<|im_end|>", add_special_tokens=False)["input_ids"]
        encoded.append((prompt + answer, len(answer)))
    return encoded


def token_dropout(batch: int, num_tokens: int, rate: float, min_keep: int, generator: torch.Generator) -> torch.Tensor:
    """Which visual tokens each row reads `[B, N]` (bool): all of them, or with probability `rate` a random
    subset of a random size in [min_keep, N], so that the projector learns tokens that still work pruned."""
    keep = torch.ones(batch, num_tokens, dtype=torch.bool)
    for row in range(batch):
        if torch.rand((), generator=generator) < rate:
            size = int(torch.randint(min(min_keep, num_tokens), num_tokens + 1, (), generator=generator))
            dropped = torch.randperm(num_tokens, generator=generator)[size:]
            keep[row, dropped] = False
    return keep


def answer_loss(model: VisionLanguageModel, projector: MiniLlavaProjector, features: torch.Tensor,
                rows: list[tuple[list[int], int]], visual_keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy of the answer tokens for a batch; features: [B, N, C]. A dropped visual token
    (`visual_keep` [B, N] False) is masked out as a key and keeps its position, as pruning with
    the `keep` position policy does."""
    length = max(len(ids) for ids, _ in rows)
    pad = model.text_config.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])  # [B, L], right-padded
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows])
    image_mask = input_ids == model.image_token_id
    if visual_keep is not None:
        attention_mask[image_mask] = visual_keep.flatten().long()
    embeds = model.embed_prompt(input_ids)  # [B, L, D]
    visual = projector(features.float())  # [B, N, D]
    embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual.to(embeds.dtype))
    hidden = model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    # the token at position t predicts t + 1: answer tokens sit at [len - n, len) of each row
    rows_index = torch.cat([torch.full((n,), b) for b, (_, n) in enumerate(rows)])
    targets_at = torch.cat([torch.arange(len(ids) - n, len(ids)) for ids, n in rows])
    logits = model.lm_head(hidden[rows_index, targets_at - 1]).float()  # [answer tokens, V]
    return F.cross_entropy(logits, input_ids[rows_index, targets_at])


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal.training.train_projector", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="directory for the projector checkpoint")
    parser.add_argument("--steps", type=positive_int, default=600, help="optimizer steps (default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="questions per step (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default: %(default)s)")
    parser.add_argument("--warmup", type=positive_int, default=20, help="warm-up steps (default: %(default)s)")
    parser.add_argument("--token-dropout", type=probability, default=0.5, metavar="P",
                        help="share of questions that see only a random subset of the visual tokens "
                             "(default: %(default)s)")
    parser.add_argument("--min-keep", type=positive_int, default=16,
                        help="smallest subset size under --token-dropout (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    parser.add_argument("--save-every", type=positive_int, default=50, help="resume point every N steps")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE,
                        help="where frozen vision features are cached (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    torch.manual_seed(args.seed)
    projector = MiniLlavaProjector(ProjectorConfig())
    model = build_mini_llava(projector=projector)
    model.language_model.requires_grad_(False)
    model.lm_head.requires_grad_(False)

    examples = easy_vqa.load_split("train")
    paths = sorted({e.image for e in examples})
    image_row = {path: i for i, path in enumerate(paths)}
    features = image_features(model, paths, args.cache_dir)  # [4000, 196, 112]
    encoded = encode_examples(model, examples)

    optimizer = torch.optim.AdamW(projector.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    order, step, losses = torch.randperm(len(examples), generator=generator), 0, []
    state = load_resume_point(args.out, args)
    if state is not None:
        projector.load_state_dict(state["projector"])
        optimizer.load_state_dict(state["optimizer"])
        order, step, losses = state["order"], state["step"], state["losses"]
        generator.set_state(state["generator"])

    projector.train()
    progress = tqdm(range(step, args.steps), initial=step, total=args.steps, desc="projector", unit="step")
    for step in progress:
        picks = [(order[(step * args.batch_size + i) % len(order)]).item() for i in range(args.batch_size)]
        batch_features = features[[image_row[examples[i].image] for i in picks]]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args.steps, args.lr, args.warmup)
        visual_keep = token_dropout(len(picks), batch_features.shape[1], args.token_dropout, args.min_keep, generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = answer_loss(model, projector, batch_features, [encoded[i] for i in picks], visual_keep)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if (step + 1) % args.save_every == 0 and step + 1 < args.steps:
            save_resume_point(args.out, args, projector=projector.state_dict(), optimizer=optimizer.state_dict(),
                              order=order, step=step + 1, losses=losses,
                              generator=generator.get_state())

    arguments = sys.argv[1:] if argv is None else argv
    command = "python -m covipal.training.train_projector " + " ".join(shlex.quote(a) for a in arguments)
    projector.save(args.out, metadata={
        "command": command, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "token_dropout": args.token_dropout, "min_keep": args.min_keep,
        "data": f"easy-vqa train split ({len(examples)} questions, {len(paths)} images)",
        "vision": "EfficientNet-Lite0 stage 5 at 224x224, frozen", "llm": "SmolLM2-135M-Instruct Q4_1, frozen",
        "final_loss_mean_last_50": round(sum(losses[-50:]) / len(losses[-50:]), 4),
    })
    clear_resume_point(args.out)
    print(f"projector written to {args.out}", file=sys.stderr)
    return 0


def console() -> NoReturn:
    """`python -m covipal.training.train_projector`."""
    run(main)


if __name__ == "__main__":
    console()
