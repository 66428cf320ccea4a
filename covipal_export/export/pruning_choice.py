"""Which pruning an export holds: the strategy to put in ppm.onnx, and its manifest entry.

    --ppm CKPT                 the trained PPM
    a model's bundled PPM      mini-llava's trained PPM (covipal/checkpoints/mini-llava-ppm), unless a
                               training-free --strategy is asked for
    --random-weights           (benchmarks) a seeded, randomly initialised PPM like the model, so the PPM's cost
                               is what is measured; also `--strategy ppm` on any random-weight model
    otherwise                  the training-free rule that measured best among the exportable ones
                               (`TRAINING_FREE_DEFAULT`); the output and the manifest's note say which and why
`knorm` needs decoder internals, `random` draws from PyTorch's generator, and `cdpruner` and `dart` pick
tokens one after another (a data-dependent loop): none of them fits the pruning graph's one TopK.
The PPM itself is built by `covipal_export.runtime.reference.build_ppm`, as the torch backend rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from covipal.errors import CovipalError
from covipal.modeling_ppm import default_ppm_config
from covipal.models import VisionLanguageModel, bundled_ppm
from covipal.strategies import STRATEGY_NAMES, Strategy, make_strategy
from covipal_export.manifest import PPMSpec, PruningSpec
from covipal_export.runtime.reference import build_ppm

NOT_EXPORTABLE = {
    "knorm": "needs the decoder's internals (keys at an early layer), which the pruning graph does not have",
    "random": "draws from PyTorch's random generator, which an ONNX graph cannot reproduce",
    "cdpruner": "picks tokens one at a time (greedy DPP, a loop as long as the budget), which the pruning graph's "
                "single TopK cannot hold",
    "dart": "picks each pivot's tokens after the previous pivot's (a data-dependent loop), which the pruning "
            "graph's single TopK cannot hold",
}
EXPORTABLE_STRATEGIES = tuple(name for name in STRATEGY_NAMES if name not in NOT_EXPORTABLE)


@dataclass(frozen=True)
class MeasuredDefault:
    """The training-free rule an export uses without a trained PPM, and the measurement that chose it."""

    strategy: str
    evidence: str  # one sentence, printed by export.py and written into the manifest's pruning note


TRAINING_FREE_DEFAULT = MeasuredDefault(
    "uniform",
    "on mini-llava's easy-VQA test questions uniform scored 86.4/83.7/68.5 % at 64/32/16 tokens "
    "(1,000 questions), the best training-free rule that exports; text-sim scored 83.7/64.5/55.1, and "
    "cdpruner and dart, which do not export, 86.0/83.0/68.4 and 83.0/76.9/69.5 (docs/TRAINING.md)",
)


def check_strategy(strategy: str | None, ppm: str | Path | None) -> None:
    """Refuse, before any model is loaded, what cannot be exported."""
    if strategy is not None and strategy not in STRATEGY_NAMES:
        raise CovipalError(f"unknown strategy {strategy!r}; choose one of: {', '.join(EXPORTABLE_STRATEGIES)}")
    if strategy in NOT_EXPORTABLE:
        raise CovipalError(f"strategy {strategy!r} cannot be exported: it {NOT_EXPORTABLE[strategy]}; "
                           f"choose one of: {', '.join(EXPORTABLE_STRATEGIES)}")
    if ppm is not None and strategy not in (None, "ppm"):
        raise CovipalError(f"--ppm is only used by --strategy ppm, not {strategy!r}")
    if ppm is not None and not Path(ppm).is_dir():
        raise CovipalError(f"no PPM checkpoint at {ppm}")


def ppm_checkpoint(model_name: str, strategy: str | None, ppm: str | Path | None) -> Path | None:
    """The trained PPM an export uses: `ppm` if given, else the bundled PPM unless another strategy is asked for."""
    if ppm is not None:
        return Path(ppm)
    return bundled_ppm(model_name) if strategy in (None, "ppm") else None


def choose_pruning(model: VisionLanguageModel, strategy: str | None, ppm: str | Path | None, budget: int,
                   position_policy: str, seed: int, random_ppm: bool = False) -> tuple[Strategy, PruningSpec]:
    """The strategy to export (checked by `check_strategy`) and its manifest entry.

    random_ppm: without --ppm or --strategy, export a seeded random PPM (export.py --random-weights, for
    benchmarks) instead of the measured training-free default.
    """
    checkpoint = ppm_checkpoint(model.info.name, strategy, ppm)
    if checkpoint is not None:
        spec = PPMSpec(checkpoint=str(checkpoint.resolve()), seed=None, config={})  # config: read below
        note = f"trained PPM from {checkpoint}" + ("" if ppm is not None else f" (bundled with {model.info.name})")
    elif model.info.random_weights and (strategy == "ppm" or (strategy is None and random_ppm)):
        config = default_ppm_config(model.hidden_size, model.num_visual_tokens)
        spec = PPMSpec(checkpoint=None, seed=seed, config=asdict(config))
        note = f"randomly initialised PPM (seed {seed}): the model has random weights too"
    elif strategy == "ppm":
        raise CovipalError(f"strategy 'ppm' needs a trained PPM for {model.info.name}: pass --ppm CKPT")
    elif strategy is not None:
        return make_strategy(strategy), PruningSpec(strategy, None, budget, position_policy,
                                                    f"training-free strategy {strategy}")
    else:
        default = TRAINING_FREE_DEFAULT
        note = (f"training-free strategy {default.strategy}, the default without a trained PPM (pass --ppm CKPT, "
                f"e.g. from python -m covipal.train): {default.evidence}")
        return make_strategy(default.strategy), PruningSpec(default.strategy, None, budget, position_policy, note)
    module = build_ppm(spec, model)
    spec.config = asdict(module.config)
    return make_strategy("ppm", ppm=module), PruningSpec("ppm", spec, budget, position_policy, note)
