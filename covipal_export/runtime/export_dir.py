"""Opening an export directory for the runtime: finding it, the manifest, the file checksums, the prompt processor."""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoTokenizer

from covipal.errors import CovipalError
from covipal.models.processing import PromptProcessor
from covipal_export import names
from covipal_export.manifest import Manifest, file_problems, load_manifest


def find_engine_dir(root: Path = names.DEFAULT_ROOT) -> Path:
    """The only export directory under `root`, or the newest one (said on stderr)."""
    found = sorted((p.parent for p in root.glob(f"*/{names.MANIFEST_FILE}")),
                   key=lambda d: (d / names.MANIFEST_FILE).stat().st_mtime)
    if not found:
        raise CovipalError(f"no export directory in {root}/: run `python export.py --model M --budget K` "
                           f"or pass --engine-dir")
    if len(found) > 1:
        print(f"using the newest of {len(found)} exports in {root}/: {found[-1]} (pass --engine-dir to choose)",
              file=sys.stderr)
    return found[-1]


def open_export(directory: str | Path, check_files: bool = True) -> Manifest:
    """The directory's manifest, after checking that every listed file is present and unchanged (sha256)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CovipalError(f"engine directory not found: {directory}")
    manifest = load_manifest(directory)
    problems = file_problems(directory, manifest) if check_files else []
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CovipalError(f"{directory} does not match its manifest: {'; '.join(problems[:3])}{more}; "
                           f"export it again with `python export.py`")
    return manifest


def prompt_processor(directory: str | Path, manifest: Manifest) -> PromptProcessor | None:
    """Tokenizer files + chat template + image preprocessing, from the directory alone (no model registry);
    None when the export has none (a random-weight model built without a tokenizer)."""
    spec = manifest.tokenizer
    if spec is None or manifest.preprocessing is None:
        return None
    tokenizer = AutoTokenizer.from_pretrained(Path(directory) / spec.directory)
    return PromptProcessor(tokenizer, spec.chat_template, spec.image_token, spec.num_image_tokens,
                           manifest.preprocessing, spec.add_special_tokens)
