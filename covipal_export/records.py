"""Dataclasses as JSON files: a compact writer and a strict reader, for the manifest and the engine metadata.

    write_record(record, path)     indented JSON that keeps short values (a tensor spec, a shape) on one line
    read_record(cls, path)         parse and check against `cls`'s annotations: an unknown, a missing or a
                                   mistyped key is a CovipalError naming the key and the file (one line); a
                                   field with a default may be absent (files written before it existed)
    from_json(cls, data, path)     the same check on data already parsed
"""

from __future__ import annotations

import json
import types
from dataclasses import MISSING, asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from covipal.errors import CovipalError

T = TypeVar("T")


def write_record(record: Any, path: Path) -> Path:
    """Write dataclass `record` to `path` as JSON."""
    path = Path(path)
    path.write_text(_to_json(asdict(record)) + "\n")
    return path


def read_json(path: Path) -> Any:
    """Parsed JSON of `path`; a missing file or bad JSON is a CovipalError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CovipalError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CovipalError(f"{path} is not valid JSON: {exc}") from None


def read_record(cls: type[T], path: Path) -> T:
    """Dataclass `cls` from the JSON file `path`, checked strictly."""
    return from_json(cls, read_json(path), Path(path))


def from_json(cls: type[T], data: Any, path: Path, key: str = "") -> T:
    """Build dataclass `cls` from parsed JSON, checking keys and types against its annotations."""
    if not isinstance(data, dict):
        raise CovipalError(f"{path}: {key!r} must be an object" if key else f"{path} must hold a JSON object")
    hints = get_type_hints(cls)
    required = [f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING]
    for name in data:
        if name not in hints:
            raise CovipalError(f"{path}: unknown key {_join(key, name)!r}")
    for name in required:
        if name not in data:
            raise CovipalError(f"{path}: missing key {_join(key, name)!r}")
    return cls(**{name: _convert(hints[name], value, _join(key, name), path) for name, value in data.items()})


def _to_json(value: Any, indent: str = "") -> str:
    compact = json.dumps(value)
    if len(compact) + len(indent) <= 110 or not isinstance(value, (dict, list)) or not value:
        return compact
    inner = indent + "  "
    if isinstance(value, dict):
        items = [f"{inner}{json.dumps(key)}: {_to_json(item, inner)}" for key, item in value.items()]
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    return "[\n" + ",\n".join(f"{inner}{_to_json(item, inner)}" for item in value) + f"\n{indent}]"


def _convert(annotation: Any, value: Any, key: str, path: Path) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if is_dataclass(annotation):
        return from_json(annotation, value, path, key)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:  # X | None: X's own error says what is wrong
            return _convert(options[0], value, key, path)
        for option in options:
            try:
                return _convert(option, value, key, path)
            except CovipalError:
                continue
    elif origin is Literal:
        if value in args:
            return value
    elif origin in (list, tuple) and isinstance(value, list):
        items = args if origin is tuple and Ellipsis not in args else (args[0],) * len(value)
        if len(items) == len(value):
            converted = [_convert(a, v, f"{key}[{i}]", path) for i, (a, v) in enumerate(zip(items, value))]
            return converted if origin is list else tuple(converted)
    elif origin is dict and isinstance(value, dict):
        return {k: _convert(args[1], v, _join(key, k), path) for k, v in value.items()}
    elif annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    elif annotation in (int, str, bool) and type(value) is annotation:
        return value
    raise CovipalError(f"{path}: {key!r} has an unexpected value {value!r} (expected {_describe(annotation)})")


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _describe(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
