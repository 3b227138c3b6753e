"""Files d2f writes appear whole or not at all, and files it reads fail with their own name.

A full disk, a kill or a crash mid-write must never leave a truncated ``metrics.json`` or a 0-byte PNG
that a later reader takes for a result: :func:`write_atomic` writes beside the target and renames, and
only a rename (atomic on POSIX) ever makes the target appear. Folders (checkpoints, exports) are built
the same way in a temporary sibling and renamed whole (``d2f.training.checkpoint``, ``d2f.networks.export``).

A writer killed between the two (SIGKILL, power loss) leaves its temporary sibling ``.NAME.tmp-PID``; the
next write of the same target removes it once that process is gone (:func:`write_atomic`), and a run
folder, which its lock keeps to one writer, is cleared of all of them when a run is set up in it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# write_atomic's temporary sibling of NAME: ".NAME.tmp-PID".
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


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
    _remove_dead_writers(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    payload = data.encode() if isinstance(data, str) else data
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        raise OSError(e.errno, f"{e.strerror} (nothing written)", str(path)) from e
    except BaseException:
        _discard(tmp)
        raise
    fsync_dir(path.parent)
    return path


@contextlib.contextmanager
def built_in_place(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary sibling ``.NAME.tmp-PID`` of ``folder`` to build it in; when the block ends
    without an error, the sibling replaces ``folder`` whole: an existing one is moved aside to ``.NAME.old-PID``
    first and removed after (a kill between the two renames leaves it there to be put back:
    ``d2f.networks.export.remove_interrupted``). On an error the sibling is removed and ``folder`` is as it was;
    an ``OSError`` names ``folder`` and says that nothing was written."""
    folder = Path(folder)
    tmp, old = (folder.parent / f".{folder.name}.{what}-{os.getpid()}" for what in ("tmp", "old"))
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"{e.strerror} (nothing written)", str(folder)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    fsync_dir(folder.parent)
    shutil.rmtree(old, ignore_errors=True)


def _discard(tmp: Path) -> None:
    # On a read-only file system even removing a file that was never made fails (EROFS); the error to report is
    # the write's, naming the target.
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def temporary_files(folder: Path) -> list[Path]:
    """The temporary files :func:`write_atomic` left in ``folder``, whoever wrote them, sorted."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if _TEMPORARY.match(p.name) and p.is_file())


def _remove_dead_writers(path: Path) -> None:
    """Remove the temporary siblings of ``path`` whose writer has died (one killed mid-write). A live one's stays:
    another process may be writing the same target right now, and its rename must still find its file."""
    for tmp in temporary_files(path.parent):
        match = _TEMPORARY.match(tmp.name)
        if match["name"] == path.name and not _alive(int(match["pid"])):
            tmp.unlink(missing_ok=True)
            print(
                f"d2f: removed {tmp.name}, a half-written {path.name} left by a process that died (pid {match['pid']})",
                file=sys.stderr,
            )


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists here (another user's counts; a reused pid reads as alive, which only
    keeps a leftover that could have gone)."""
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, OverflowError):
        return False
    except PermissionError:
        return True
    return True


def output_path(path: str | os.PathLike) -> Path:
    """``path`` with its folder made: called before long work, so a bad ``--out`` fails at once, not after it."""
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(21, "Is a directory; expected a file name", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    # An empty file where write_atomic will write: a read-only folder fails here, not after the work.
    probe = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        probe.touch()
    except OSError as e:
        raise OSError(e.errno, f"{e.strerror} (cannot write there)", str(path)) from e
    probe.unlink()
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
