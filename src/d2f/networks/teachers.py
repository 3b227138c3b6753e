"""The teachers: their architecture and where they ship (``training/recipes.py`` holds the recipe ``d2f teacher``
trains them with).

The embedded teacher is a 0.7M-parameter class-conditional ``UNet2DModel`` for 16x16 MNIST (10 classes and a
null class), trained with Stable Diffusion's ``scaled_linear`` schedule and ``v_prediction``; shipped as a d2f
export in ``d2f/assets/teacher``. Its epsilon twin (``d2f/assets/teacher-epsilon``, ``d2f teacher
--prediction-type epsilon``) is what SD 1.x users have: an epsilon network on SD's schedule. E4 at 32 and
64 px (:mod:`d2f.evaluation.terminal_snr`) needs teachers at those sizes: the same design with one more
down/up level per doubling, so the attention level stays at 8x8. Their first levels are narrow (8-16
channels), as the full-resolution convolutions dominate the CPU time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..schedule import Schedule
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
# Channels per level; measured on one CPU core at batch 32: 0.74 s/step at 32 px, 1.19 s/step at 64 px.
WIDER_CHANNELS = {32: (16, 32, 64), 64: (8, 16, 32, 64)}
TEACHER_RESOLUTIONS = (16, *WIDER_CHANNELS)


def architecture(resolution: int = 16) -> dict[str, Any]:
    """The ``UNet2DModel`` settings of the teacher for ``resolution`` px digits (16: the embedded teacher's)."""
    if resolution not in TEACHER_RESOLUTIONS:
        raise ValueError(f"resolution={resolution!r} has no teacher architecture: one of {TEACHER_RESOLUTIONS}")
    if resolution == 16:
        return dict(ARCHITECTURE)
    channels = WIDER_CHANNELS[resolution]
    plain = ("DownBlock2D",) * (len(channels) - 1)
    return {
        **ARCHITECTURE,
        "sample_size": resolution,
        "block_out_channels": channels,
        "down_block_types": (*plain, "AttnDownBlock2D"),
        "up_block_types": ("AttnUpBlock2D", *("UpBlock2D",) * (len(channels) - 1)),
    }


def teacher_path(resolution: int = 16, prediction_type: str = "v_prediction") -> Path:
    """Where the teacher for ``resolution`` ships: ``d2f/assets/teacher`` (16 px), ``teacher32``, ``teacher64``;
    ``teacher-epsilon``, the 16 px recipe with ``prediction_type="epsilon"`` (SD 1.x's), for the grids and
    samplers of epsilon models (``docs/results.md``, E5)."""
    shipped = {(r, "v_prediction"): "teacher" if r == 16 else f"teacher{r}" for r in TEACHER_RESOLUTIONS}
    shipped[16, "epsilon"] = "teacher-epsilon"
    if (resolution, prediction_type) not in shipped:
        raise ValueError(
            f"resolution={resolution!r} with prediction_type={prediction_type!r} has no shipped teacher: one of "
            f"{sorted(shipped)}"
        )
    return Path(__file__).resolve().parent.parent / "assets" / shipped[resolution, prediction_type]


def from_scratch(prediction_type: str, resolution: int = 16) -> Network:
    """The teacher's architecture for ``resolution`` with fresh weights (``TrainConfig.init = "teacher-config"``)."""
    from diffusers import UNet2DModel

    settings = architecture(resolution)
    return Network(
        unet=UNet2DModel(**settings),
        schedule=Schedule.scaled_linear(prediction_type=prediction_type),
        prediction_type=prediction_type,
        null_class=settings["num_class_embeds"] - 1,
        source="teacher-config",
    )
