"""Validation images during training: the current weights sampled through the base pipeline itself (its VAE,
text encoders and CFG) with ``D2FScheduler``, on fixed prompts and a fixed seed, saved as one grid per check.

What users of diffusers' own training scripts expect from ``--validation_prompt``; here the pipeline also
checks the export path, since it is the loop a user runs after ``pipe.load_lora_weights``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from ..figures import save_grid
from ..networks.export import ddim_config
from ..networks.models import Network, check_pipeline_folder
from . import objectives
from .config import TrainConfig


def pipeline_class(network: Network) -> type:
    """The diffusers pipeline class that samples the validation images, or a ValueError saying why none can."""
    import diffusers

    if network.pipeline is None:
        raise ValueError(
            f"validation_prompts need a diffusers pipeline folder as pretrained (its VAE and text encoders sample "
            f"them); {network.source} is not one"
        )
    cls = getattr(diffusers, network.pipeline, None)
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise ValueError(
            f"validation_prompts: {network.source}'s model_index.json names _class_name={network.pipeline!r}, "
            "which is not a diffusers pipeline class"
        )
    return cls


class Validation:
    """Loads the pipeline once (without its UNet, which is the one being trained) and samples on demand: the
    run's ``validation_prompts``, ``sample_steps`` and ``guidance``, from the same seeded noise every time."""

    def __init__(self, network: Network, config: TrainConfig, device: torch.device) -> None:
        from ..scheduler import D2FScheduler

        folder = Path(network.source)  # the pipeline, or its unet/ folder
        folder = folder if (folder / "model_index.json").is_file() else folder.parent
        check_pipeline_folder(folder, skip=("unet",))
        # Flow objectives sample on the uniform FM grid (their best after finetuning), diffusion on DDIM's.
        grid = "ddim" if config.objective == "diffusion" else "uniform"
        scheduler_config = ddim_config(
            network.schedule, objectives.prediction_type(config.objective, network.prediction_type)
        )
        t_min = config.t_min(network.prediction_type, network.schedule)
        scheduler = D2FScheduler.from_config(scheduler_config, grid=grid, t_min=t_min)
        cls = pipeline_class(network)
        # Without the safety checker where the class has one: a blacked-out validation image hides the training.
        extra = {"safety_checker": None} if "safety_checker" in inspect.signature(cls.__init__).parameters else {}
        pipe = cls.from_pretrained(folder, unet=network.unet, scheduler=scheduler, use_safetensors=True, **extra)
        self.pipe = pipe.to(device)  # the VAE and text encoders join the UNet on the training device
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.steps, self.guidance = list(config.validation_prompts), config.sample_steps, config.guidance
        self.seed = config.seed + 3

    @torch.no_grad()
    def images(self) -> torch.Tensor:
        """One image per prompt, in [-1, 1], from the noise of ``torch.Generator().manual_seed(seed)``."""
        generator = torch.Generator().manual_seed(self.seed)
        out = self.pipe(
            self.prompts,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance,
            generator=generator,
            output_type="pt",
        )
        return out.images.float().cpu() * 2 - 1

    def save(self, path: Path) -> torch.Tensor:
        """The images as one row of a grid at ``path``; returns them."""
        images = self.images()
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, columns=len(self.prompts), upscale=1)
        return images
