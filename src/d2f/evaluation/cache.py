"""What an experiment keeps between runs, so that a stopped one resumes where it stopped: results cached in files
beside the settings they were made with, and training runs finished before."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def cached(file: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The result cached in ``file`` (None: none yet), refused if it was made with other ``settings``: a rerun with
    other steps, calls or seeds must not pass off an old result as its own."""
    if not file.is_file():
        return None
    result = json.loads(file.read_text())
    if result.get("settings") != settings:
        raise ValueError(
            f"{file} holds a result made with settings {result.get('settings')}, not {settings}: remove "
            f"{file.parent} or choose another out"
        )
    return result


def trained_before(run: Path, config) -> bool:
    """Whether ``run`` holds a finished run of ``config`` (its scoring stopped before it was written); a finished run
    of other settings is refused, a run stopped part way (no checkpoints) is removed to be started again."""
    if not (run / "metrics.json").is_file():
        shutil.rmtree(run, ignore_errors=True)
        return False
    kept = json.loads((run / "config.json").read_text())
    changed = {k: (kept.get(k), v) for k, v in config.to_dict().items() if k != "out" and kept.get(k) != v}
    if changed:
        raise ValueError(f"{run} holds a run with other settings ({changed}): remove it or choose another out")
    return True
