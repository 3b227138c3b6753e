"""The recipes d2f trains what it ships with: the embedded teachers (``d2f teacher``; their architecture:
``networks/teachers.py``) and the miniature Stable Diffusion (``d2f miniature``; ``networks/miniature.py``)."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import torch

from .._files import output_path, write_json
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
    return TrainConfig.teacher_task(
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


# The miniature Stable Diffusion (``networks/miniature.py``): its VAE and UNet steps, and the UNet's batch and lr.
MINIATURE = {"resolution": 64, "vae_steps": 1200, "vae_batch_size": 8, "unet_steps": 2000, "unet_batch_size": 64}


def train_miniature(
    out: str | os.PathLike, vae_steps: int | None = None, unet_steps: int | None = None, seed: int = 0, progress=True
) -> dict[str, Any]:
    """Train the miniature Stable Diffusion into ``<out>/pipeline`` (``d2f miniature``) and record the recipe,
    each stage's report and seconds in ``<out>/recipe.json``.

    1. The tokenizer of the captions' words and the seeded, frozen text encoder.
    2. The VAE on the 64 px digits (every tenth image held out for its reconstruction error), its
       ``scaling_factor`` set from the latents (``training/vae.py``).
    3. A pipeline folder with the trained VAE and a fresh UNet (``<out>/untrained``), and the captioned digits
       at 64 px (``<out>/digits64``).
    4. ``d2f train`` on that pipeline and folder: the UNet from scratch as a diffusion model with SD 1.5's
       schedule, epsilon prediction and caption dropout 0.1 (``<out>/unet``); its export's UNet goes into the
       final pipeline.

    ``d2f miniature`` then scores the pipeline's prompt following (``evaluation/prompts.py``).
    """
    from diffusers import UNet2DConditionModel

    from ..data.digit_captions import captioned_digits, words, write_digit_folder
    from ..networks.miniature import components, tokenizer, write_pipeline
    from .loop import train
    from .vae import train_vae

    recipe = {**MINIATURE, "seed": seed}
    recipe.update({k: v for k, v in (("vae_steps", vae_steps), ("unet_steps", unet_steps)) if v is not None})
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(17, "holds files already; give a new folder", str(out))
    output_path(out / "recipe.json")
    started, seconds = time.perf_counter(), {}
    tok = tokenizer(words())
    parts = components(len(tok), seed)
    images = captioned_digits(recipe["resolution"], seed).images.repeat(1, 3, 1, 1)
    held_out = torch.arange(len(images)) % 10 == 9
    vae = train_vae(
        parts["vae"],
        images[~held_out],
        images[held_out],
        recipe["vae_steps"],
        recipe["vae_batch_size"],
        seed=seed,
        progress=progress,
    )
    seconds["vae"] = time.perf_counter() - started
    base = write_pipeline(out / "untrained", tokenizer=tok, **parts)
    folder = write_digit_folder(out / f"digits{recipe['resolution']}", recipe["resolution"], seed)
    config = miniature_unet_config(out, base, folder, recipe)
    unet = train(config, progress=progress)
    seconds["unet"] = time.perf_counter() - started - seconds["vae"]
    parts["unet"] = UNet2DConditionModel.from_pretrained(out / "unet" / "export" / "unet")
    write_pipeline(out / "pipeline", tokenizer=tok, **parts)
    seconds["all"] = time.perf_counter() - started
    report = {"recipe": recipe, "vae": vae, "unet": unet, "unet_config": dataclasses.asdict(config), "seconds": seconds}
    write_json(out / "recipe.json", report)
    return report


def miniature_unet_config(out: Path, base: Path, folder: Path, recipe: dict[str, Any]) -> TrainConfig:
    """Step 4 of :func:`train_miniature`: the UNet's training run."""
    return TrainConfig(
        out=str(out / "unet"),
        pretrained=str(base),
        data=str(folder),
        resolution=recipe["resolution"],
        objective="diffusion",
        lora_rank=0,
        max_steps=recipe["unet_steps"],
        batch_size=recipe["unet_batch_size"],
        lr=1e-3,
        warmup_steps=100,
        ema_decay=0.999,
        cond_dropout=0.1,
        checkpoint_every=500,
        seed=recipe["seed"],
        guidance=3.0,
    )
