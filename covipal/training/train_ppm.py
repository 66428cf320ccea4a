"""`python -m covipal.train --model M --data easy-vqa --stage 1|2 --out CKPT`: train the PPM, base model frozen.

Stage 1: the PPM regresses per-token labels of the frozen model, normalised per sample: MSE plus an
optional ListNet ranking term. `--labels attention` (default): the attention the question pays each
visual token at a guide layer (covipal.training.attention_labels); `--labels answer-gradient`: how much the
answer's likelihood gains from each visual token, the slope of the stage-2 loss at the unpruned model
(covipal.training.gradient_labels); `--labels ppm --teacher-ppm DIR`: the scores of a trained PPM (to distil it into
a smaller one). Stage 2 (end to end): the PPM's scores enter every decoder layer as a key bias
(covipal.training.soft_pruning) at a budget drawn per step, and the loss is the answer's cross-entropy, plus an
optional KL to the unpruned model's answer distribution. Stage 2 usually starts from a stage-1
checkpoint (`--init`).

Data: `easy-vqa` (its train split) or a LLaVA-Instruct style JSON file (`--image-root` for its images).
Model: a registered name; a LLaVA alias (llava-1.5-7b, llava-1.5-13b) reads its checkpoint from `--model-path`
(a directory in the Hugging Face layout) or the Hugging Face cache, so one's own checkpoint gets its own PPM.
The frozen visual tokens (and for stage 1 the labels) of the training examples are computed once and
cached on disk. Deterministic for a seed; `OUT/train_state.pt` makes an interrupted run resume; the
checkpoint is the PPM's format with the command, data, seed and final loss in its metadata.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import torch
import torch.nn.functional as F
from tqdm import tqdm

from covipal.budget import ALL, parse_budgets
from covipal.cli import ArgumentParser, positive_int, quiet_libraries, run
from covipal.errors import CovipalError
from covipal.modeling_ppm import PruningModule, default_ppm_config, weights_sha256
from covipal.models import MODEL_NAMES
from covipal.models.base import VisionLanguageModel
from covipal.models.processing import load_image
from covipal.pruning import prune_prompt
from covipal.training.attention_labels import default_guide_layer, visual_attention_labels
from covipal.training.batching import answer_ids, pad_answered, pad_left, prompt_text
from covipal.training.cache import DEFAULT_CACHE, cache_file, load_cached, save_cached
from covipal.training.data import easy_vqa
from covipal.training.data.easy_vqa import VQAExample
from covipal.training.gradient_labels import answer_gradient_labels
from covipal.training.resume import clear_resume_point, load_resume_point, save_resume_point
from covipal.training.schedule import learning_rate
from covipal.training.soft_pruning import answer_loss, soft_key_bias


@dataclass
class TrainingSet:
    """Token ids per example and the frozen model's outputs they need, computed once."""

    examples: list[VQAExample]
    prompts: list[list[int]]  # prompt ids, image slots expanded to N
    answers: list[list[int]]  # the answer's ids as it continues the prompt, ending with EOS
    visual: torch.Tensor  # [num_images, N, D] fp16, frozen visual tokens
    image_row: list[int]  # example -> row of `visual`
    labels: torch.Tensor | None  # [num_examples, N] attention labels at the guide layer (stage 1)


def load_examples(data: str, image_root: Path | None, limit: int | None, seed: int) -> list[VQAExample]:
    """A seeded subset of `limit` training examples from easy-VQA's train split or a LLaVA-Instruct JSON."""
    if data == "easy-vqa":
        examples = easy_vqa.load_split("train")
    else:
        from covipal.training.data.instruct_json import load_instruct_json

        examples = load_instruct_json(data, image_root)
    return easy_vqa.sample(examples, limit, seed)


TEACHERS = ("attention", "answer-gradient", "ppm")


@dataclass
class TeacherPPM:
    """A trained PPM whose scores are the labels (`--labels ppm`), read once."""

    path: Path
    module: PruningModule
    weights_sha256: str  # keys the label cache and goes into the student's metadata

    @classmethod
    def load(cls, path: Path) -> "TeacherPPM":
        return cls(path, PruningModule.load(path), weights_sha256(path))


def build_training_set(model: VisionLanguageModel, examples: list[VQAExample], teacher: str | None,
                       guide_layer: int, cache_dir: Path, batch_size: int = 16,
                       teacher_ppm: TeacherPPM | None = None) -> TrainingSet:
    """Tokenize the examples; visual tokens (and `teacher`'s labels, if any) from the disk cache or computed.

    teacher: "attention" (covipal.training.attention_labels at `guide_layer`), "answer-gradient"
    (covipal.training.gradient_labels), "ppm" (the scores of `teacher_ppm`) or None (stage 2 needs
    no labels).
    """
    processor = model.require_processor()
    prompts = [processor.tokenize(e.question) for e in examples]
    answers = [answer_ids(model, e.answer) for e in examples]
    paths = list(dict.fromkeys(e.image for e in examples))
    row_of = {path: i for i, path in enumerate(paths)}
    image_row = [row_of[e.image] for e in examples]

    def cached(kind: str, lines: list[str]) -> Path:
        return cache_file(cache_dir, f"{kind}-{model.info.name}", [model.info.name, model.info.source, *lines])

    visual_cache = cached("visual", [str(p) for p in paths])
    visual = load_cached(visual_cache)
    if visual is None:
        preprocess = processor.image_preprocessing
        chunks = []
        for start in tqdm(range(0, len(paths), batch_size), desc="visual tokens", unit="batch", file=sys.stderr):
            images = paths[start : start + batch_size]
            pixels = torch.stack([torch.from_numpy(preprocess(load_image(p))) for p in images])
            with torch.no_grad():
                chunks.append(model.encode_images(pixels).half())  # [b, N, D]
        visual = save_cached(torch.cat(chunks), visual_cache)  # [num_images, N, D]
    if teacher is None:
        return TrainingSet(examples, prompts, answers, visual, image_row, None)

    if teacher == "attention":
        kind, lines = f"labels{guide_layer}", [f"{e.image}\t{e.question}" for e in examples]
    elif teacher == "ppm":
        kind, lines = "ppm-labels", [teacher_ppm.weights_sha256, *(f"{e.image}\t{e.question}" for e in examples)]
    else:
        kind, lines = "answer-gradient", [f"{e.image}\t{e.question}\t{e.answer}" for e in examples]
    labels_cache = cached(kind, lines)
    cached_labels = load_cached(labels_cache)
    if cached_labels is not None:
        return TrainingSet(examples, prompts, answers, visual, image_row, cached_labels)
    labels = []
    description = {"attention": f"labels (attention at layer {guide_layer})", "ppm": "labels (teacher PPM scores)",
                   "answer-gradient": "labels (answer gradient)"}[teacher]
    for start in tqdm(range(0, len(examples), batch_size), desc=description, unit="batch", file=sys.stderr):
        rows = range(start, min(start + batch_size, len(examples)))
        tokens = visual[[image_row[i] for i in rows]].float()  # [b, N, D]
        if teacher == "attention":
            input_ids, attention_mask = pad_left(model, [prompts[i] for i in rows])
            with torch.no_grad():
                full = prune_prompt(model.embed_prompt(input_ids), input_ids, attention_mask, tokens,
                                    model.image_token_id, None, ALL)
                labels.append(visual_attention_labels(model, full.inputs_embeds, input_ids, attention_mask,
                                                      [guide_layer])[guide_layer])
        elif teacher == "ppm":
            text_embeds, text_mask = prompt_text(model, [prompts[i] for i in rows])
            with torch.no_grad():
                labels.append(teacher_ppm.module(tokens, text_embeds, text_mask))  # [b, N]
        else:
            input_ids, attention_mask, lengths = pad_answered(model, [prompts[i] for i in rows],
                                                              [answers[i] for i in rows])
            with torch.autocast("cpu", dtype=torch.bfloat16):  # 3-4x faster on CPU; correlation 0.99 with float32
                labels.append(answer_gradient_labels(model, input_ids, attention_mask, lengths, tokens))
    labels = save_cached(torch.cat(labels), labels_cache)  # [num_examples, N]
    return TrainingSet(examples, prompts, answers, visual, image_row, labels)


TARGETS = ("zscore", "normal-rank")


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Per-row zero mean, unit variance."""
    return (x - x.mean(-1, keepdim=True)) / x.std(-1, keepdim=True).clamp(min=1e-6)


def normal_ranks(x: torch.Tensor) -> torch.Tensor:
    """Per-row ranks mapped onto standard-normal quantiles: the order of `x` without its outliers."""
    ranks = x.argsort(-1).argsort(-1).double()  # [B, N], 0 = smallest
    return torch.special.ndtri((ranks + 0.5) / x.shape[-1]).to(x.dtype)


def stage1_loss(scores: torch.Tensor, labels: torch.Tensor, rank_weight: float, target: str = "zscore") -> torch.Tensor:
    """MSE of the scores to the per-row normalised labels, plus ListNet (cross-entropy of the two softmaxes)."""
    goal = standardize(labels) if target == "zscore" else normal_ranks(labels)  # [B, N]
    loss = F.mse_loss(scores, goal)
    if rank_weight > 0:
        loss = loss + rank_weight * -(goal.softmax(-1) * scores.log_softmax(-1)).sum(-1).mean()
    return loss


def stage2_loss(model: VisionLanguageModel, data: TrainingSet, rows: list[int], visual: torch.Tensor,
                scores: torch.Tensor, budget: int, temperature: float, kl_weight: float) -> torch.Tensor:
    """Answer cross-entropy (+ KL to the unpruned model) with the scores [B, N] of the visual tokens [B, N, D]
    as soft key biases in every layer."""
    input_ids, attention_mask, lengths = pad_answered(model, [data.prompts[i] for i in rows],
                                                      [data.answers[i] for i in rows])  # [B, L]
    return answer_loss(model, input_ids, attention_mask, lengths, visual, soft_key_bias(scores, budget, temperature),
                       kl_weight)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m covipal.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="mini-llava", choices=MODEL_NAMES, metavar="NAME",
                        help=f"registered model: {', '.join(MODEL_NAMES)} (default: %(default)s)")
    parser.add_argument("--model-path", type=Path, default=None,
                        help="local checkpoint directory (Hugging Face layout) for a LLaVA alias, e.g. one's own "
                             "fine-tuned LLaVA-1.5-7B (default: the Hugging Face cache)")
    parser.add_argument("--data", default="easy-vqa",
                        help="'easy-vqa' (train split) or a LLaVA-Instruct style JSON file")
    parser.add_argument("--image-root", type=Path, default=None,
                        help="directory the JSON's image paths are relative to (default: the JSON file's directory)")
    parser.add_argument("--stage", type=int, choices=(1, 2), required=True,
                        help="1: regress attention labels; 2: soft pruning with the language-model loss")
    parser.add_argument("--out", type=Path, required=True, help="directory for the PPM checkpoint")
    parser.add_argument("--init", type=Path, default=None, help="start from this PPM checkpoint (e.g. stage 1's)")
    parser.add_argument("--dim", type=positive_int, default=256, help="internal width of a new PPM (ignored with "
                        "--init) (default: %(default)s)")
    parser.add_argument("--blocks", type=positive_int, default=2, help="blocks of a new PPM (ignored with --init) "
                        "(default: %(default)s)")
    parser.add_argument("--labels", choices=TEACHERS, default="attention",
                        help="stage 1 teacher: 'attention' (attention the question pays each visual token at the guide "
                             "layer) or 'answer-gradient' (gradient of the answer's likelihood with respect to each "
                             "visual token's key bias; uses the answers) or 'ppm' (the scores of --teacher-ppm, to "
                             "distil a trained PPM into a smaller one) (default: %(default)s)")
    parser.add_argument("--teacher-ppm", type=Path, default=None, metavar="DIR",
                        help="with --labels ppm: the PPM checkpoint whose scores are the labels")
    parser.add_argument("--guide-layer", type=int, default=None,
                        help="stage 1, attention labels: decoder layer whose attention is the label (default: the "
                             "middle layer)")
    parser.add_argument("--limit", type=positive_int, default=4000, help="training examples, a seeded subset "
                        "(default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=None,
                        help="optimizer steps (default: 600 for stage 1, 300 for stage 2)")
    parser.add_argument("--batch-size", type=positive_int, default=None, help="default: 32 for stage 1, 8 for stage 2")
    parser.add_argument("--lr", type=float, default=None,
                        help="peak learning rate (default: 1e-3 stage 1, 2e-4 stage 2)")
    parser.add_argument("--warmup", type=positive_int, default=20, help="warm-up steps (default: %(default)s)")
    parser.add_argument("--target", choices=TARGETS, default="zscore",
                        help="stage 1: what the scores regress, per sample: the labels' z-scores, or their ranks "
                             "mapped to normal quantiles (robust to a few extreme labels) (default: %(default)s)")
    parser.add_argument("--rank-weight", type=float, default=1.0, help="stage 1: weight of the ListNet ranking term")
    parser.add_argument("--budgets", default="16,32,64", help="stage 2: budgets the soft mask mimics, one per step in "
                        "turn (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.25, help="stage 2: softness of the key bias "
                        "(in units of the scores' spread; default: %(default)s)")
    parser.add_argument("--kl-weight", type=float, default=0.0, help="stage 2: weight of the KL to the unpruned model")
    parser.add_argument("--seed", type=int, default=0, help="seed for the data subset, initialisation and order")
    parser.add_argument("--save-every", type=positive_int, default=50, help="resume point every N steps")
    parser.add_argument("--label-batch-size", type=positive_int, default=16,
                        help="stage 1: examples per pass of the frozen model while labelling (lower it for a large "
                             "model: answer-gradient labels keep every layer's activations) (default: %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="cache of visual tokens and labels "
                        "(default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    budgets = parse_budgets(args.budgets, allow_all=False)
    if (args.labels == "ppm") != (args.teacher_ppm is not None):
        raise CovipalError("--labels ppm and --teacher-ppm DIR go together")
    # read the teacher before the model loads, so that a bad --teacher-ppm fails at once
    teacher_ppm = None if args.teacher_ppm is None else TeacherPPM.load(args.teacher_ppm)
    stage = args.stage
    steps = args.steps or (600 if stage == 1 else 300)
    batch_size = args.batch_size or (32 if stage == 1 else 8)
    lr = args.lr or (1e-3 if stage == 1 else 2e-4)
    quiet_libraries()
    from covipal.models import load_model

    model = load_model(args.model, path=args.model_path)
    model.requires_grad_(False)
    guide_layer = default_guide_layer(model) if args.guide_layer is None else args.guide_layer
    if stage == 2 and max(budgets) >= model.num_visual_tokens:
        raise CovipalError(f"--budgets must be below the model's {model.num_visual_tokens} visual tokens "
                           f"(a budget that keeps every token leaves nothing to learn), got {args.budgets}")
    torch.manual_seed(args.seed)
    if args.init is not None:
        ppm = PruningModule.load(args.init)
    else:
        ppm = PruningModule(default_ppm_config(model.hidden_size, model.num_visual_tokens, args.dim, args.blocks))
    examples = load_examples(args.data, args.image_root, args.limit, args.seed)
    data = build_training_set(model, examples, args.labels if stage == 1 else None, guide_layer, args.cache_dir,
                              batch_size=args.label_batch_size, teacher_ppm=teacher_ppm)

    optimizer = torch.optim.AdamW(ppm.parameters(), lr=lr, weight_decay=0.01)
    generator = torch.Generator().manual_seed(args.seed)
    order, step, losses = torch.randperm(len(examples), generator=generator), 0, []
    state = load_resume_point(args.out, args)
    if state is not None:
        ppm.load_state_dict(state["ppm"])
        optimizer.load_state_dict(state["optimizer"])
        order, step, losses = state["order"], state["step"], state["losses"]

    ppm.train()
    progress = tqdm(range(step, steps), initial=step, total=steps, desc=f"PPM stage {stage}", unit="step")
    for step in progress:
        rows = [order[(step * batch_size + i) % len(order)].item() for i in range(batch_size)]
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps, lr, args.warmup)
        text_embeds, text_mask = prompt_text(model, [data.prompts[i] for i in rows])
        visual = data.visual[[data.image_row[i] for i in rows]].float()  # [B, N, D]
        scores = ppm(visual, text_embeds, text_mask)  # [B, N]
        if stage == 1:
            loss = stage1_loss(scores, data.labels[rows], args.rank_weight, args.target)
        else:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = stage2_loss(model, data, rows, visual, scores, budgets[step % len(budgets)], args.temperature,
                                   args.kl_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        if (step + 1) % args.save_every == 0 and step + 1 < steps:
            save_resume_point(args.out, args, ppm=ppm.state_dict(), optimizer=optimizer.state_dict(), order=order,
                              step=step + 1, losses=losses)

    arguments = sys.argv[1:] if argv is None else argv
    command = "python -m covipal.train " + " ".join(shlex.quote(a) for a in arguments)
    data_name = "easy-vqa train split" if args.data == "easy-vqa" else f"LLaVA-Instruct JSON {args.data}"
    ppm.eval().save(args.out, metadata={
        "command": command, "model": args.model, "model_source": model.info.source, "stage": stage,
        "init": str(args.init) if args.init else None,
        "labels": args.labels if stage == 1 else None,
        "teacher_ppm": ({"path": str(teacher_ppm.path), "weights_sha256": teacher_ppm.weights_sha256}
                        if stage == 1 and teacher_ppm is not None else None),
        "guide_layer": guide_layer if stage == 1 and args.labels == "attention" else None,
        "seed": args.seed, "steps": steps,
        "batch_size": batch_size, "lr": lr, "data": f"{data_name}, seeded subset of {len(examples)} examples",
        "budgets": budgets if stage == 2 else None, "temperature": args.temperature if stage == 2 else None,
        "kl_weight": args.kl_weight if stage == 2 else None, "rank_weight": args.rank_weight if stage == 1 else None,
        "target": args.target if stage == 1 else None,
        "loss_first_20": round(sum(losses[:20]) / len(losses[:20]), 4),
        "loss_last_20": round(sum(losses[-20:]) / len(losses[-20:]), 4),
    })
    clear_resume_point(args.out)
    print(f"PPM written to {args.out}", file=sys.stderr)
    return 0


def console() -> NoReturn:
    """The `covipal-train` command (also `python -m covipal.train`)."""
    run(main)


if __name__ == "__main__":
    console()
