"""Reflow pairs: noise and the sample a model's ODE carries it to, stored for rectified-flow finetuning.

``d2f pairs`` writes them; ``d2f train --pairs PATH`` trains on them. A pairs file is a safetensors file
with ``noise`` and ``sample`` ``(N, C, H, W)`` float32, optional ``labels`` ``(N,)`` int64 (the class
each sample was drawn for), and metadata naming the format, its version and how the pairs were made.
Reflow trains the straight path between the *stored* noise and its sample, so each pair is one draw of a
coupling that the new model learns to follow in fewer steps (Liu et al., rectified flow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._files import output_path, write_safetensors
from .._versioned import Document
from ..networks.sampling import SamplingSettings, sample_export
from .images import Dataset

PAIRS = Document(
    "d2f.pairs",
    1,
    frozenset({"model", "steps", "solver", "grid", "shift", "guidance", "seed", "seconds"}),
    frozenset({"device"}),  # where the pairs were sampled; files made before it was recorded lack it
)
PAIRS_KEYS = {"noise", "sample", "labels"}


def generate_pairs(
    model: str,
    out: str | Path,
    num_pairs: int = 5000,
    settings: SamplingSettings | None = None,
    progress: bool = False,
) -> dict:
    """Sample ``num_pairs`` images from the export ``model`` and store them with their starting noise.

    Many ODE steps make the coupling close to the model's exact ODE map; ``settings`` are those of
    ``d2f sample`` (default: 50 Euler steps on the uniform grid). Returns the metadata written with the file.
    """
    settings = settings or SamplingSettings(steps=50, solver="euler", grid="uniform")
    if not isinstance(num_pairs, int) or isinstance(num_pairs, bool) or num_pairs < 1:
        raise ValueError(f"num_pairs={num_pairs!r} is not allowed: a positive integer")
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: a pairs file is written as .safetensors")
    out = output_path(out)
    started = time.perf_counter()
    images, labels, noise, _, settings = sample_export(model, settings, num_pairs, progress=progress)
    if not bool(torch.isfinite(images).all()):
        raise FloatingPointError(f"{model} produced non-finite samples; no pairs written")
    tensors = {"noise": noise.contiguous(), "sample": images.float().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    meta = {"model": str(model), **settings.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
    document = PAIRS.new(**meta)
    write_safetensors(out, tensors, metadata={"d2f": json.dumps(document)})
    return meta


def load_pairs(path: str | Path, shape: tuple[int, ...] | None = None) -> Dataset:
    """A pairs file as training data: ``images`` are the samples, ``noise`` their coupled noise; with ``shape``,
    refused unless each sample is of that ``(C, H, W)``."""
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
    PAIRS.check(document, f"pairs={str(path)!r}")
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
    if shape is not None and tuple(sample.shape[1:]) != tuple(shape):
        raise ValueError(
            f"pairs={str(path)!r} holds samples of shape {tuple(sample.shape[1:])}; the run needs {tuple(shape)}: "
            f"pass --resolution {sample.shape[-1]} for pairs of this model"
        )
    return Dataset(images=sample.float(), labels=labels, noise=noise.float())


__all__ = ["generate_pairs", "load_pairs"]
