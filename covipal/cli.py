"""Shared command-line plumbing: one-line errors with exit status 2, quiet library logs."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, NoReturn

from covipal.errors import CovipalError


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error contract: one `error: ...` line on stderr, exit 2."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1], got {value}")
    return value


def quiet_libraries() -> None:
    """Silence transformers' advisory warnings (e.g. the missing-torchvision fallback) in CLIs."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def run(main: Callable[[], int | None]) -> NoReturn:
    """Run a CLI's main: CovipalError -> `error: ...` and exit 2; anything else is a bug (traceback)."""
    try:
        code = main()
    except CovipalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    raise SystemExit(code or 0)
