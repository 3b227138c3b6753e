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

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from .._files import fsync_dir
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
    from safetensors.torch import save_file

    root = checkpoint_root(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    index = {id(p): name for name, p in trainable.items()}
    opt_tensors, groups = {}, []
    for group in optimizer.param_groups:
        groups.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            for key, value in optimizer.state.get(p, {}).items():
                opt_tensors[f"{index[id(p)]}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in ema.items()}, str(tmp / "ema.safetensors"))
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    state = STATE.new(step=step, seed=seed, optimizer=groups, config=config, losses=losses, draws=DRAWS)
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for file in tmp.iterdir():
        with open(file, "rb") as f:
            os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    fsync_dir(root)
    return final


def remove_interrupted(out: Path) -> list[str]:
    """Remove the temporary folders of checkpoints whose writing was killed; returns their names."""
    leftovers = list(checkpoint_root(out).glob(".tmp-step-*"))
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def resume_point(out: Path, resume: str | None) -> Path | None:
    """The checkpoint a run resumes from: ``resume`` is ``None`` (a new run), ``"latest"`` or a checkpoint
    folder.

    A new run owns its folder from the first byte it writes: it is refused where ``out`` holds anything but
    the lock file, so two runs' files (an ``export/`` beside another run's ``config.json``) never mix.
    """
    if resume is None:
        earlier = sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) if out.is_dir() else []
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
        raise ValueError(f"--resume: no complete checkpoint in {checkpoint_root(out)}")
    return checkpoint


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
