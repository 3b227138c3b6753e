"""Pickle-free, atomic training checkpoints.

A checkpoint is a folder ``checkpoints/step-XXXXXXXX/`` holding

- ``trainable.safetensors``: the trainable weights (all of them for full finetuning, the LoRA and
  fully trained convs otherwise), by parameter name;
- ``ema.safetensors``: their exponential moving average;
- ``optimizer.safetensors``: AdamW's per-parameter state (``<name>.exp_avg``, ``<name>.exp_avg_sq``,
  ``<name>.step``);
- ``state.json``: format and version, the step, the seed, AdamW's hyper-parameters, the run's config and
  the loss history.

Data order and noise are functions of (seed, step, rank), so the step alone restores them. A checkpoint
is written into a temporary folder and renamed into place; a folder without a complete ``state.json``
is never picked up.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .._files import fsync_dir, temporary_files
from .._versioned import Document
from .draws import DRAWS
from .lock import LOCK_NAME

STATE_TYPES = {"step": (int,), "seed": (int,), "optimizer": (list,), "config": (dict,), "losses": (list,)}
STATE_TYPES["draws"] = (str,)  # optional: checkpoints written before the counter-based draws have none
STATE = Document("d2f.checkpoint", 1, frozenset(STATE_TYPES) - {"draws"}, frozenset({"draws"}), STATE_TYPES)
_NAME = re.compile(r"^step-(\d{8})$")


def checkpoint_root(out: Path) -> Path:
    return Path(out) / "checkpoints"


def save_checkpoint(
    out: Path,
    step: int,
    trainable: dict[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    seed: int,
    config: dict[str, Any],
    losses: list[float],
) -> Path:
    """Write the checkpoint of ``step`` whole or not at all: a failure (a full disk) removes the temporary
    folder and raises an ``OSError`` naming the checkpoint and the file that failed."""
    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    opt_tensors, groups = _optimizer_state(trainable, optimizer)
    state = STATE.new(step=step, seed=seed, optimizer=groups, config=config, losses=losses, draws=DRAWS)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, {"trainable": trainable, "ema": ema, "optimizer": opt_tensors}, state)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(e.errno, f"{e.strerror} (nothing written)", str(final)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    return final


def _optimizer_state(
    trainable: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer
) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """AdamW's per-parameter tensors by ``<name>.<field>``, and its groups' hyper-parameters."""
    index = {id(p): name for name, p in trainable.items()}
    opt_tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                opt_tensors[f"{index[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    return opt_tensors, groups


def _write_files(folder: Path, tensors: dict[str, dict[str, torch.Tensor]], state: dict[str, Any]) -> None:
    """``<name>.safetensors`` for each of ``tensors`` and ``state.json`` in ``folder``, all fsynced."""
    for name, group in tensors.items():
        _save(group, folder / f"{name}.safetensors")
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    for file in folder.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(folder)


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``safetensors.torch.save_file``, which streams from the tensors (a checkpoint of a full UNet and its AdamW
    state is GBs, so no copy is made in memory), with its I/O errors as the ``OSError`` they are: safetensors
    reports them as a ``SafetensorError`` whose text carries the OS error number."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    except SafetensorError as e:
        number = re.search(r"os error (\d+)", str(e))
        code = int(number.group(1)) if number else errno.EIO
        raise OSError(code, f"{os.strerror(code)} writing {path.name}", str(path)) from e


def remove_interrupted(out: Path) -> list[str]:
    """Remove the temporary folders of checkpoints whose writing was killed; returns their names."""
    leftovers = list(checkpoint_root(out).glob(".tmp-step-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def resume_point(out: Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from: ``resume`` is ``None`` (a new run), ``"latest"`` or a checkpoint
    folder.

    A new run owns its folder from the first byte it writes: it is refused where ``out`` holds an earlier run's
    file, so two runs' files (an ``export/`` beside another run's ``config.json``) never mix. The lock file and
    the temporary files of a killed writer are no run's: the run holding the lock removes them.
    """
    earlier = _earlier_run_files(out)
    if resume is None:
        if earlier:
            shown = ", ".join(earlier[:4]) + (f" and {len(earlier) - 4} more" if len(earlier) > 4 else "")
            hint = "pass --resume to continue it" if latest_checkpoint(out) is not None else "it has no checkpoint"
            raise ValueError(
                f"out={str(out)!r} holds files of an earlier run ({shown}); {hint}, or choose another --out "
                "(or remove the folder)"
            )
        return None
    checkpoint = latest_checkpoint(out) if resume == "latest" else Path(resume)
    if checkpoint is None:
        hint = "" if earlier else f"; {out} holds no earlier run's files: run it without --resume"
        raise ValueError(f"--resume: no complete checkpoint in {checkpoint_root(out)}{hint}")
    return checkpoint


def _earlier_run_files(out: Path) -> list[str]:
    """The names in ``out`` that an earlier run wrote: all but the lock file and write_atomic's temporary
    files (whose writer, under the lock, can only be a run that died)."""
    if not out.is_dir():
        return []
    temporary = {p.name for p in temporary_files(out)}
    return sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME and p.name not in temporary)


def latest_checkpoint(out: Path) -> Path | None:
    """The complete checkpoint with the highest step; temporary and incomplete folders are ignored."""
    root = checkpoint_root(out)
    if not root.is_dir():
        return None
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").is_file()
    )
    return steps[-1][1] if steps else None


def read_state(path: Path) -> dict[str, Any]:
    return STATE.read(Path(path) / "state.json")


def load_checkpoint(
    path: Path,
    trainable: dict[str, torch.nn.Parameter],
    ema: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
) -> dict[str, Any]:
    """Restore weights, EMA and optimizer in place; returns the state (step, seed, config)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    try:
        weights = load_file(str(path / "trainable.safetensors"))
        ema_weights = load_file(str(path / "ema.safetensors"))
        opt_tensors = load_file(str(path / "optimizer.safetensors"))
    except (OSError, SafetensorError) as e:
        raise ValueError(f"{path}: a checkpoint file is missing or broken: {e}") from e
    if set(weights) != set(trainable) or set(ema_weights) != set(trainable):
        raise ValueError(
            f"{path} holds weights for {len(weights)} tensors that do not match this run's {len(trainable)} "
            "trainable parameters (different model, LoRA rank or targets?)"
        )
    with torch.no_grad():
        for name, p in trainable.items():
            if weights[name].shape != p.shape:
                raise ValueError(f"{path}: {name} has shape {tuple(weights[name].shape)}, expected {tuple(p.shape)}")
            p.copy_(weights[name])
            ema[name].copy_(ema_weights[name])
    index = {id(p): name for name, p in trainable.items()}
    by_param: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in opt_tensors.items():
        name, field = key.rsplit(".", 1)
        by_param.setdefault(name, {})[field] = value
    opt_state = {"state": {}, "param_groups": []}
    position = 0
    for group, saved in zip(optimizer.param_groups, state["optimizer"]):
        ids = []
        for p in group["params"]:
            if index[id(p)] in by_param:
                opt_state["state"][position] = by_param[index[id(p)]]
            ids.append(position)
            position += 1
        opt_state["param_groups"].append({**saved, "params": ids})
    optimizer.load_state_dict(opt_state)
    return state
