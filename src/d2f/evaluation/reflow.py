"""E3, reflow: few-step sampling from the converted teacher by rectified-flow finetuning with Diff2Flow.

1. ``d2f pairs``: the converted teacher carries ``num_pairs`` noises to digits with FM Euler (many steps
   on a uniform grid), classes 0..9 in turn.
2. ``d2f train --pairs``: full finetuning with the d2f objective on the straight paths between each stored
   noise and its digit, fresh pairs and fresh t every batch.
3. FID (16 px, the evaluation classifier) of the teacher and of the reflowed model at 1, 2, 4 (and 25) FM
   Euler steps on a uniform grid, same noise and labels for both, plus the teacher's DDIM at the same
   step counts for reference.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.images import mnist
from ..figures import save_grid
from ..networks.export import load
from ..networks.sampling import SamplingSettings, ddim_reference
from .classifier import load_classifier
from .experiments import full_finetune
from .metrics import features, score

E3_STEPS = (1, 2, 4, 25)


def train_reflow(out: str, num_pairs: int, pair_steps: int, max_steps: int, seed: int):
    """Steps 1 and 2: the pairs file and the reflow run under ``out``; returns the run's config, its metrics and
    the pairs' metadata (the export is ``config.out/export``)."""
    from ..data.pairs import generate_pairs
    from ..training.loop import train

    pairs = Path(out) / "pairs.safetensors"
    settings = SamplingSettings(pair_steps, "euler", "uniform", seed=seed + 7)
    pair_meta = generate_pairs("teacher", pairs, num_pairs, settings)
    config = full_finetune(str(Path(out) / "reflow"), "d2f", max_steps, seed, pairs=str(pairs), sample_steps=4)
    return config, train(config, progress=False), pair_meta


def reflow(
    out: str = "runs/e3",
    num_pairs: int = 5000,
    pair_steps: int = 50,
    max_steps: int = 1000,
    num_samples: int = 1000,
    seed: int = 0,
    grid_png: Path | None = None,
) -> dict:
    """E3. Returns ``{"steps": {"1": {"teacher": cell, "teacher_ddim": cell, "reflow": cell}, ...}, ...}``."""
    started = time.perf_counter()
    config, metrics, pair_meta = train_reflow(out, num_pairs, pair_steps, max_steps, seed)

    classifier = load_classifier()
    real = features(classifier, mnist(16).images)
    noise = torch.randn(num_samples, 1, 16, 16, generator=torch.Generator().manual_seed(seed + 200))
    labels = torch.arange(num_samples) % 10
    teacher, reflowed = load("teacher"), load(str(Path(config.out) / "export"))
    results: dict = {"steps": {}}
    shown = []
    for n in E3_STEPS:
        images = {
            "teacher": teacher.sample(noise, teacher.grid("uniform", n), class_labels=labels),
            "teacher_ddim": ddim_reference(
                teacher.net, teacher.schedule, teacher.prediction_type, noise, n, {"class_labels": labels}
            ),
            "reflow": reflowed.sample(noise, reflowed.grid("uniform", n), class_labels=labels),
        }
        results["steps"][str(n)] = {name: score(classifier, real, x, labels) for name, x in images.items()}
        shown += [images["teacher"][:10], images["reflow"][:10]]
    if grid_png is not None:  # rows: teacher then reflow, at 1, 2, 4 and 25 steps
        save_grid(torch.cat(shown), grid_png)
    results.update(
        {
            "pairs": {"num_pairs": num_pairs, **pair_meta},
            "train": {k: metrics[k] for k in ("steps", "final_loss", "seconds_train")},
            "train_config": config.to_dict(),
            "num_samples": num_samples,
            "seed": seed,
            "sampler": "FM Euler on each model's uniform grid from its t_min (the teacher's timestep 999, the reflow "
            "model's 0; teacher_ddim: diffusers' DDIM, the teacher's rule)",
            "reference": "FID in the evaluation classifier's features against the 5000 real digits at 16px",
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return results
