"""d2f's own JSON documents: a format name, a version, and a closed set of keys."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def check_document(
    data: Any,
    where: str,
    fmt: str,
    version: int,
    required: set[str],
    optional: frozenset[str] = frozenset(),
    types: Mapping[str, tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    """Refuse anything but a ``fmt`` document of ``version`` with exactly the known keys, each of its type.

    ``types`` maps a key to the JSON types it may hold (``bool`` is never accepted as an ``int``).
    """
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
    for key, allowed in (types or {}).items():
        value = data.get(key)
        if key in data and (not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed)):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise ValueError(f"{where}: {key}={value!r} is a {type(value).__name__}; expected {names}")
    return dict(data)


def read_document(
    file: Path,
    fmt: str,
    version: int,
    required: set[str],
    optional: frozenset[str] = frozenset(),
    types: Mapping[str, tuple[type, ...]] | None = None,
) -> dict[str, Any]:
    try:
        data = json.loads(Path(file).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: not a readable {fmt} file ({e})") from e
    return check_document(data, str(file), fmt, version, required, optional, types)
