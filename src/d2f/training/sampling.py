"""Sampling an export: the shared core of ``d2f sample`` and ``d2f eval``."""

from __future__ import annotations

from pathlib import Path

import torch

from ..grids import ddim_grid, shift_grid, uniform_grid
from ..time_samplers import valid_range
from ..velocity import D2FVelocity
from .export import load, read_export
from .models import teacher_path

SAMPLE_GRIDS = ("ddim", "uniform", "shift")


def export_grid(field: D2FVelocity, grid: str, steps: int, shift: float = 3.0) -> torch.Tensor:
    """``ddim``: the DDIM-equivalent grid (leading, offset 1, ending at t = 1); ``uniform`` and ``shift``
    start where the prediction type has a velocity (``t = 1e-3`` for epsilon, else 0)."""
    t_start = valid_range(field.prediction_type)[0]
    if grid == "ddim":
        if not field.align_input:
            raise ValueError("grid='ddim' needs a converted model; a naive-FM export samples on grid='uniform'")
        return ddim_grid(field.schedule, steps, "leading", steps_offset=1, set_alpha_to_one=True)
    if grid == "uniform":
        return uniform_grid(steps, t_start, 1.0)
    if grid == "shift":
        return shift_grid(steps, shift, t_start, 1.0)
    raise ValueError(f"grid={grid!r} is not supported; allowed: {', '.join(map(repr, SAMPLE_GRIDS))}")


def sample_export(
    model: str,
    steps: int,
    solver: str = "euler",
    grid: str = "uniform",
    shift: float = 3.0,
    guidance: float = 1.0,
    num_samples: int = 40,
    resolution: int | None = None,
    seed: int = 0,
    batch_size: int = 250,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, dict]:
    """``num_samples`` images from an export (classes in turn when class-conditional), in batches.

    Returns ``(images, labels or None, the noise they started from, the export's metadata)``; images are
    at ``resolution`` (default: the export's training resolution). The noise is one draw of
    ``torch.Generator().manual_seed(seed)``.
    """
    field = load(model, guidance_scale=guidance)
    meta = read_export(teacher_path() if model == "teacher" else Path(model)).meta
    ts = export_grid(field, grid, steps, shift)
    resolution = resolution or meta["resolution"]
    channels = field.net.config.out_channels
    noise = torch.randn(num_samples, channels, resolution, resolution, generator=torch.Generator().manual_seed(seed))
    labels = None if meta["null_class"] is None else torch.arange(num_samples) % meta["null_class"]
    images = []
    for start in range(0, num_samples, batch_size):
        cond = {} if labels is None else {"class_labels": labels[start : start + batch_size]}
        images.append(field.sample(noise[start : start + batch_size], ts, solver=solver, progress=progress, **cond))
    return torch.cat(images), labels, noise, meta
