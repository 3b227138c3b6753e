"""d2f's own JSON documents: a format name, a version, and a closed set of keys."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def check_document(
    data: Any, where: str, fmt: str, version: int, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    """Refuse anything but a ``fmt`` document of ``version`` with exactly the known keys."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
    if data.get("format") != fmt or data.get("version") != version:
        raise ValueError(
            f"{where}: format {data.get('format')!r} version {data.get('version')!r}; this d2f reads {fmt!r} "
            f"version {version}"
        )
    allowed = required | optional | {"format", "version"}
    for key in data:
        if key not in allowed:
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ValueError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    missing = sorted(required - set(data))
    if missing:
        raise ValueError(f"{where}: missing keys {missing}")
    return dict(data)


def read_document(
    file: Path, fmt: str, version: int, required: set[str], optional: frozenset[str] = frozenset()
) -> dict[str, Any]:
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable {fmt} file ({e})") from e
    return check_document(data, str(file), fmt, version, required, optional)
