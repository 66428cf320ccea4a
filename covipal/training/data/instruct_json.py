"""LLaVA-Instruct style JSON: a list of records with an image path and a conversation.

    [{"image": "coco/000001.jpg",
      "conversations": [{"from": "human", "value": "<image>\\nWhat is on the table?"},
                        {"from": "gpt", "value": "A red apple."}, ...]}, ...]

Every (human, gpt) pair of a record becomes one single-turn example about the record's image; the
`<image>` placeholder is removed from the question (the prompt template places the image itself).
Image paths are relative to `image_root` (default: the JSON file's directory).
"""

from __future__ import annotations

import json
from pathlib import Path

from covipal.errors import CovipalError
from covipal.training.data.easy_vqa import VQAExample

IMAGE_PLACEHOLDER = "<image>"


def load_instruct_json(path: str | Path, image_root: str | Path | None = None) -> list[VQAExample]:
    """The (image, question, answer) examples of a LLaVA-Instruct style JSON file."""
    path = Path(path)
    if not path.is_file():
        raise CovipalError(f"no such data file: {path}")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CovipalError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise CovipalError(f"{path}: expected a list of records with 'image' and 'conversations'")
    root = Path(image_root) if image_root is not None else path.parent
    examples = []
    for number, record in enumerate(records):
        if not isinstance(record, dict) or "image" not in record or "conversations" not in record:
            raise CovipalError(f"{path}: record {number} needs 'image' and 'conversations'")
        image = root / record["image"]
        if not image.is_file():
            raise CovipalError(f"{path}: record {number}: image {image} not found (set the image root)")
        turns = record["conversations"]
        for human, gpt in zip(turns[0::2], turns[1::2]):
            if human.get("from") != "human" or gpt.get("from") != "gpt":
                raise CovipalError(f"{path}: record {number}: conversations must alternate 'human' and 'gpt'")
            question = human["value"].replace(IMAGE_PLACEHOLDER, "").strip()
            examples.append(VQAExample(image, question, gpt["value"].strip()))
    if not examples:
        raise CovipalError(f"{path} holds no (human, gpt) turns")
    return examples
