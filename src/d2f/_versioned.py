"""d2f's own JSON documents: a format name, a version, and a closed set of keys, each of its type."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._files import read_json


@dataclass(frozen=True)
class Document:
    """One kind of document. ``types`` maps a key to the JSON types it may hold (``bool`` is never accepted
    as an ``int``); keys without an entry may hold anything."""

    format: str
    version: int
    required: frozenset[str]
    optional: frozenset[str] = frozenset()
    types: Mapping[str, tuple[type, ...]] = field(default_factory=dict)

    def new(self, **values: Any) -> dict[str, Any]:
        """A document of this kind holding ``values``, checked."""
        return self.check({"format": self.format, "version": self.version, **values}, f"{self.format} document")

    def check(self, data: Any, where: str) -> dict[str, Any]:
        """Refuse anything but a document of this format and version with exactly the known keys."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != self.format or data.get("version") != self.version:
            raise ValueError(
                f"{where}: format {data.get('format')!r} version {data.get('version')!r}; this d2f reads "
                f"{self.format!r} version {self.version}"
            )
        allowed = self.required | self.optional | {"format", "version"}
        for key in data:
            if key not in allowed:
                hint = difflib.get_close_matches(key, allowed, n=1)
                raise ValueError(f"{where}: unknown key {key!r}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
        missing = sorted(self.required - set(data))
        if missing:
            raise ValueError(f"{where}: missing keys {missing}")
        for key, allowed_types in self.types.items():
            value = data.get(key)
            is_bool = isinstance(value, bool) and bool not in allowed_types
            if key in data and (not isinstance(value, allowed_types) or is_bool):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed_types)
                raise ValueError(f"{where}: {key}={value!r} is a {type(value).__name__}; expected {names}")
        return dict(data)

    def read(self, file: Path) -> dict[str, Any]:
        """The checked document in ``file``."""
        return self.check(read_json(file), str(file))
