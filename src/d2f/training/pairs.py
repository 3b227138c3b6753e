"""Reflow pairs: noise and the sample a model's ODE carries it to, stored for rectified-flow finetuning.

``d2f pairs`` writes them; ``d2f train --pairs PATH`` trains on them. A pairs file is a safetensors file
with ``noise`` and ``sample`` ``(N, C, H, W)`` float32, optional ``labels`` ``(N,)`` int64 (the class
each sample was drawn for), and metadata naming the format, its version and how the pairs were made.
Reflow trains the straight path between the *stored* noise and its sample, so each pair is one draw of a
coupling that the new model learns to follow in fewer steps (Liu et al., rectified flow).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from .._versioned import check_document
from .data import Dataset
from .sampling import sample_export

PAIRS_FORMAT, PAIRS_VERSION = "d2f.pairs", 1
PAIRS_META = {"model", "steps", "solver", "grid", "shift", "guidance", "seed", "seconds"}
PAIRS_KEYS = {"noise", "sample", "labels"}


def generate_pairs(
    model: str,
    out: str | Path,
    num_pairs: int = 5000,
    steps: int = 50,
    solver: str = "euler",
    grid: str = "uniform",
    shift: float = 3.0,
    guidance: float = 1.0,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Sample ``num_pairs`` images from the export ``model`` and store them with their starting noise.

    Many ODE steps make the coupling close to the model's exact ODE map; ``grid`` and ``solver`` are
    those of ``d2f sample``. Returns the metadata written with the file.
    """
    if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs!r} is not allowed: a positive integer")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: a pairs file is written as .safetensors")
    from safetensors.torch import save_file

    started = time.perf_counter()
    images, labels, noise, _ = sample_export(
        model, steps, solver, grid, shift, guidance, num_pairs, seed=seed, progress=progress
    )
    if not bool(torch.isfinite(images).all()):
        raise FloatingPointError(f"{model} produced non-finite samples; no pairs written")
    tensors = {"noise": noise.contiguous(), "sample": images.float().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    meta = {
        "model": str(model),
        "steps": steps,
        "solver": solver,
        "grid": grid,
        "shift": shift,
        "guidance": guidance,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
    }
    document = {"format": PAIRS_FORMAT, "version": PAIRS_VERSION, **meta}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"d2f": json.dumps(document)})
    os.replace(tmp, out)  # a reader never sees half a file
    return meta


def load_pairs(path: str | Path) -> Dataset:
    """A pairs file as training data: ``images`` are the samples, ``noise`` their coupled noise."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs={str(path)!r}: no such file (make one with `d2f pairs`)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        document = json.loads(metadata.get("d2f", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"pairs={str(path)!r}: not a d2f pairs file ({e})") from e
    check_document(document, f"pairs={str(path)!r}", PAIRS_FORMAT, PAIRS_VERSION, PAIRS_META)
    if not {"noise", "sample"} <= set(tensors) <= PAIRS_KEYS:
        raise ValueError(f"pairs={str(path)!r}: expected keys noise, sample (and labels); found {sorted(tensors)}")
    noise, sample, labels = tensors["noise"], tensors["sample"], tensors.get("labels")
    if noise.shape != sample.shape or sample.ndim != 4:
        raise ValueError(
            f"pairs={str(path)!r}: noise {tuple(noise.shape)} and sample {tuple(sample.shape)} must be the "
            "same (N, C, H, W)"
        )
    if labels is not None and (labels.shape != (sample.shape[0],) or labels.dtype != torch.int64):
        raise ValueError(f"pairs={str(path)!r}: labels must be int64 of shape ({sample.shape[0]},)")
    for name, value in (("noise", noise), ("sample", sample)):
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"pairs={str(path)!r}: {name} contains NaN or inf")
    return Dataset(images=sample.float(), labels=labels, noise=noise.float())


__all__ = ["generate_pairs", "load_pairs"]
