"""Validation images during training: the current weights sampled through the base pipeline itself (its VAE,
text encoders and CFG) with ``D2FScheduler``, on fixed prompts and a fixed seed, saved as one grid per check.

What users of diffusers' own training scripts expect from ``--validation_prompt``; here the pipeline also
checks the export path, since it is the loop a user runs after ``pipe.load_lora_weights``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..schedule import Schedule
from . import objectives
from .export import ddim_config
from .images import save_grid
from .models import check_pipeline_folder


class Validation:
    """Loads the pipeline once (without its UNet, which is the one being trained) and samples on demand."""

    def __init__(self, pipeline_folder: str, schedule: Schedule, prediction_type: str, objective: str, unet):
        from diffusers import DiffusionPipeline

        from ..scheduler import D2FScheduler

        folder = Path(pipeline_folder)  # the pipeline, or its unet/ folder
        folder = folder if (folder / "model_index.json").is_file() else folder.parent
        check_pipeline_folder(folder, skip=("unet",))
        # Flow objectives sample on the uniform FM grid (their best after finetuning), diffusion on DDIM's.
        grid = "ddim" if objective == "diffusion" else "uniform"
        config = ddim_config(schedule, objectives.prediction_type(objective, prediction_type))
        scheduler = D2FScheduler.from_config(config, grid=grid)
        self.pipe = DiffusionPipeline.from_pretrained(
            folder, unet=unet, scheduler=scheduler, use_safetensors=True, safety_checker=None
        )
        self.pipe.set_progress_bar_config(disable=True)

    @torch.no_grad()
    def images(self, prompts: tuple[str, ...], steps: int, guidance: float, seed: int) -> torch.Tensor:
        """One image per prompt, in [-1, 1], from the noise of ``torch.Generator().manual_seed(seed)``."""
        generator = torch.Generator().manual_seed(seed)
        out = self.pipe(
            list(prompts), num_inference_steps=steps, guidance_scale=guidance, generator=generator, output_type="pt"
        )
        return out.images.float().cpu() * 2 - 1

    def save(self, prompts, steps: int, guidance: float, seed: int, path: Path) -> torch.Tensor:
        images = self.images(prompts, steps, guidance, seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, columns=len(prompts), upscale=1)
        return images
