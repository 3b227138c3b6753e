"""The recipe ``d2f teacher`` trains the embedded teachers with (their architecture: ``networks/teachers.py``)."""

from __future__ import annotations

from .config import TrainConfig

# Batch and default steps of each teacher's recipe; 32 and 64 px are sized to train in about 12 and 30 minutes
# on one CPU core.
RECIPES = {16: (64, 3000), 32: (32, 1000), 64: (32, 1500)}


def teacher_config(
    out: str, max_steps: int | None, seed: int, resolution: int = 16, prediction_type: str = "v_prediction"
) -> TrainConfig:
    """The teacher's recipe: diffusion on MNIST at ``resolution`` with SD's schedule, from scratch, predicting
    ``prediction_type`` (the shipped teachers: ``v_prediction``); ``max_steps`` None: the recipe's own."""
    if resolution not in RECIPES:
        raise ValueError(f"resolution={resolution!r} has no teacher recipe: one of {tuple(RECIPES)}")
    batch_size, default_steps = RECIPES[resolution]
    return TrainConfig(
        out=out,
        init="teacher-config",
        prediction_type=prediction_type,
        objective="diffusion",
        resolution=resolution,
        lora_rank=0,
        max_steps=default_steps if max_steps is None else max_steps,
        batch_size=batch_size,
        lr=2e-3,
        warmup_steps=100,
        ema_decay=0.999,
        cond_dropout=0.1,
        checkpoint_every=500,
        seed=seed,
        guidance=1.0,
    )
