"""The embedded teacher: its architecture, where it ships, and the recipe ``d2f teacher`` retrains it with.

A 0.7M-parameter class-conditional ``UNet2DModel`` for 16x16 MNIST (10 classes and a null class), trained
with Stable Diffusion's ``scaled_linear`` schedule and ``v_prediction``; shipped as a d2f export in
``d2f/assets/teacher``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..schedule import Schedule
from .config import TrainConfig
from .models import Network

ARCHITECTURE: dict[str, Any] = {
    "sample_size": 16,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
    "num_class_embeds": 11,
    "norm_num_groups": 8,
}


def teacher_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "teacher"


def from_scratch(prediction_type: str) -> Network:
    """The teacher's architecture with fresh weights (``TrainConfig.init = "teacher-config"``)."""
    from diffusers import UNet2DModel

    return Network(
        unet=UNet2DModel(**ARCHITECTURE),
        schedule=Schedule.scaled_linear(prediction_type=prediction_type),
        prediction_type=prediction_type,
        null_class=ARCHITECTURE["num_class_embeds"] - 1,
        source="teacher-config",
    )


def teacher_config(out: str, max_steps: int, seed: int) -> TrainConfig:
    """The teacher's recipe: v-prediction diffusion on 16x16 MNIST with SD's schedule, from scratch."""
    return TrainConfig(
        out=out,
        init="teacher-config",
        prediction_type="v_prediction",
        objective="diffusion",
        resolution=16,
        lora_rank=0,
        max_steps=max_steps,
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        ema_decay=0.999,
        cond_dropout=0.1,
        checkpoint_every=500,
        seed=seed,
        guidance=1.0,
    )
