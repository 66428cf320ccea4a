"""Resume points for the training commands: `OUT/train_state.pt`, tied to the exact command-line arguments."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from covipal.errors import CovipalError

STATE_FILE = "train_state.pt"


def run_arguments(args: argparse.Namespace) -> dict[str, str]:
    """The arguments a resume point must have been written with."""
    return {k: str(v) for k, v in vars(args).items()}


def load_resume_point(out: Path, args: argparse.Namespace) -> dict | None:
    """The state saved by an interrupted run of the same command in `out`, or None."""
    path = out / STATE_FILE
    if not path.is_file():
        return None
    state = torch.load(path, weights_only=False)
    if state["args"] != run_arguments(args):
        raise CovipalError(f"{path} was written with other arguments; remove it or use them: {state['args']}")
    print(f"resuming at step {state['step']} from {path}", file=sys.stderr)
    return state


def save_resume_point(out: Path, args: argparse.Namespace, **state) -> None:
    """Write the state atomically (a kill never leaves half a file)."""
    out.mkdir(parents=True, exist_ok=True)
    temporary = out / (STATE_FILE + ".tmp")
    torch.save({"args": run_arguments(args), **state}, temporary)
    temporary.replace(out / STATE_FILE)


def clear_resume_point(out: Path) -> None:
    (out / STATE_FILE).unlink(missing_ok=True)
