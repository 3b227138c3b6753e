"""Files d2f writes appear whole or not at all, and files it reads fail with their own name.

A full disk, a kill or a crash mid-write must never leave a truncated ``metrics.json`` or a 0-byte PNG
that a later reader takes for a result: :func:`write_atomic` writes beside the target and renames, and
only a rename (atomic on POSIX) ever makes the target appear. Folders (checkpoints, exports) are built
the same way in a temporary sibling and renamed whole (``d2f.training.checkpoint``, ``d2f.networks.export``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a crash after it cannot bring the old entry back)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path``: to a temporary sibling first, fsynced, then renamed over ``path``.

    On any failure (``ENOSPC``, a signal) the temporary file is removed and ``path`` is as it was; an
    ``OSError`` names ``path``, not the temporary file, and says that nothing was written. The folder must
    exist (:func:`output_path` makes it before the work that produces ``data``).
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{e.strerror} (nothing written)", str(path)) from e
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def output_path(path: str | os.PathLike) -> Path:
    """``path`` with its folder made: called before long work, so a bad ``--out`` fails at once, not after it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory; expected a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: str | os.PathLike, document: Any) -> Path:
    return write_atomic(path, json.dumps(document, indent=1))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value in ``path``; a missing or malformed file raises a ``ValueError`` naming it."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from e


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file written as :func:`write_atomic` writes (a reader never sees half of one)."""
    from safetensors.torch import save

    return write_atomic(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))
