"""Reading the JSON files of a checkpoint or a tokenizer, with errors that name the file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvzoo.errors import KvzooError


def read_json_object(path: Path, error: type[KvzooError] = KvzooError) -> dict[str, Any]:
    """The JSON object in `path`; `error` naming the file when it cannot be read, is not JSON or holds
    something other than an object."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise error(f"{path}: cannot be read as UTF-8 text ({e})") from e
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value
