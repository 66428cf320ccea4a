"""Which pruning an export holds: the strategy to put in ppm.onnx, and its manifest entry.

    --ppm CKPT                 the trained PPM
    a model's bundled PPM      mini-llava's trained PPM (covipal/checkpoints/mini-llava-ppm), unless a
                               training-free --strategy is asked for
    random-weight models       a seeded, randomly initialised PPM (like the model), so the ppm path is exercised
    otherwise                  text-sim, training-free (said in the output and the manifest)
`knorm` needs decoder internals and `random` draws from PyTorch's generator: neither fits a graph.
The PPM itself is built by `covipal_export.runtime.reference.build_ppm`, as the torch backend rebuilds it.
"""

from __future__ import annotations

from dataclasses import asdict
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
}
EXPORTABLE_STRATEGIES = tuple(name for name in STRATEGY_NAMES if name not in NOT_EXPORTABLE)
FALLBACK_STRATEGY = "text-sim"


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
                   position_policy: str, seed: int) -> tuple[Strategy, PruningSpec]:
    """The strategy to export (checked by `check_strategy`) and its manifest entry."""
    checkpoint = ppm_checkpoint(model.info.name, strategy, ppm)
    if checkpoint is not None:
        spec = PPMSpec(checkpoint=str(checkpoint.resolve()), seed=None, config={})  # config: read below
        note = f"trained PPM from {checkpoint}" + ("" if ppm is not None else f" (bundled with {model.info.name})")
    elif strategy in (None, "ppm") and model.info.random_weights:
        config = default_ppm_config(model.hidden_size, model.num_visual_tokens)
        spec = PPMSpec(checkpoint=None, seed=seed, config=asdict(config))
        note = f"randomly initialised PPM (seed {seed}): the model has random weights too"
    elif strategy == "ppm":
        raise CovipalError(f"strategy 'ppm' needs a trained PPM for {model.info.name}: pass --ppm CKPT")
    else:
        name = strategy or FALLBACK_STRATEGY
        note = f"training-free strategy {name}" + ("" if strategy else " (no --ppm given; pass --ppm CKPT for the PPM)")
        return make_strategy(name), PruningSpec(name, None, budget, position_policy, note)
    module = build_ppm(spec, model)
    spec.config = asdict(module.config)
    return make_strategy("ppm", ppm=module), PruningSpec("ppm", spec, budget, position_policy, note)
