"""Opening an export directory for the runtime: the manifest, the file checksums, the prompt processor."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from covipal.errors import CovipalError
from covipal.models.processing import PromptProcessor
from covipal_export.manifest import Manifest, file_problems, load_manifest


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


def prompt_processor(directory: str | Path, manifest: Manifest) -> PromptProcessor:
    """Tokenizer files + chat template + image preprocessing, from the directory alone (no model registry)."""
    spec = manifest.tokenizer
    if spec is None or manifest.preprocessing is None:
        raise CovipalError(f"{directory}: the manifest has no tokenizer or image preprocessing, so the runtime cannot "
                           f"build prompts; export a model that has a processor")
    tokenizer = AutoTokenizer.from_pretrained(Path(directory) / spec.directory)
    return PromptProcessor(tokenizer, spec.chat_template, spec.image_token, spec.num_image_tokens,
                           manifest.preprocessing, spec.add_special_tokens)
