"""One run per output folder: an OS file lock that the kernel drops when its holder dies.

Only the main process takes it, so a data-parallel run never refuses itself; a SIGKILLed run leaves the
lock file behind but not the lock, so nothing stale ever needs removing by hand.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

LOCK_NAME = ".d2f.lock"


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``out/.d2f.lock`` for the duration, or refuse at once."""
    try:
        import fcntl
    except ImportError:  # not POSIX (Windows): d2f cannot guard the folder there
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise ValueError(
                f"out={str(out)!r} is in use by another d2f run (pid {holder}); wait for it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


__all__ = ["LOCK_NAME", "run_lock"]
