"""Validation images during training: the current weights sampled through the base pipeline itself (its VAE,
text encoders and CFG) with ``D2FScheduler``, on fixed prompts and a fixed seed, saved as one grid per check.

What users of diffusers' own training scripts expect from ``--validation_prompt``; here the pipeline also
checks the export path, since it is the loop a user runs after ``pipe.load_lora_weights``.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from ..figures import save_grid
from ..networks.export import ddim_config, model_folder
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
    cls = getattr(diffusers, network.pipeline, None) if isinstance(network.pipeline, str) else None
    if not isinstance(cls, type) or not issubclass(cls, diffusers.DiffusionPipeline):
        raise ValueError(
            f"validation_prompts: {network.source}'s model_index.json names _class_name={network.pipeline!r}, "
            "which is not a diffusers pipeline class"
        )
    return cls


class Validation:
    """Loads the pipeline once (without its UNet, which is the one being trained) and samples on demand: the
    run's ``validation_prompts``, ``sample_steps`` and ``guidance``, from the same seeded noise every time.

    It is loaded on the CPU when the run is set up, before the data is encoded, so a pipeline that cannot sample
    is refused before that work and before anything is written; :meth:`to` moves it to the training device once
    the encoding (which loads its own VAE and text encoders there) is done."""

    def __init__(self, network: Network, config: TrainConfig) -> None:
        from ..scheduler import D2FScheduler

        cls = pipeline_class(network)
        folder = model_folder(network.source)  # the pipeline, or its unet/ folder
        folder = folder if (folder / "model_index.json").is_file() else folder.parent
        # Flow objectives sample on the uniform FM grid (their best after finetuning), diffusion on DDIM's.
        grid = "ddim" if config.objective == "diffusion" else "uniform"
        scheduler_config = ddim_config(
            network.schedule, objectives.prediction_type(config.objective, network.prediction_type)
        )
        t_min = config.t_min(network.prediction_type, network.schedule)
        scheduler = D2FScheduler.from_config(scheduler_config, grid=grid, t_min=t_min)
        self.pipe = _load(cls, folder, network.unet, scheduler)
        self.pipe.set_progress_bar_config(disable=True)
        self.prompts, self.steps, self.guidance = (
            list(config.validation_prompts),
            config.sample_steps,
            config.guidance_for(config.pairs is None),  # a pipeline's reflow pairs hold no empty prompt
        )
        self.seed = config.seed + 3

    def to(self, device: torch.device) -> None:
        """The VAE and text encoders join the UNet on the training device."""
        self.pipe = self.pipe.to(device)

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


def _load(cls: type, folder: Path, unet: torch.nn.Module, scheduler) -> Any:
    """``cls.from_pretrained(folder)`` with the run's UNet and scheduler, after d2f's gates (safetensors only, no
    code from the folder, every component's folder there); whatever diffusers refuses, and what it loads but
    could not sample with (found at the first validation, hours in), is one line naming the folder and part."""
    passed = {"unet": unet, "scheduler": scheduler}  # not read from the folder
    # Without the safety checker where the class has one: a blacked-out validation image hides the training.
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        passed["safety_checker"] = None
    try:
        index = check_pipeline_folder(folder, skip=tuple(passed))
        _check_components(folder, index, set(passed))
        pipe = cls.from_pretrained(folder, use_safetensors=True, **passed)
        _check_loaded(pipe, cls, folder)
    # What diffusers and transformers raise for a folder they cannot read (a TypeError for a config value of the
    # wrong type, a KeyError or AttributeError for a missing entry): the user's files, not a bug in d2f.
    except (ValueError, OSError, ImportError, TypeError, KeyError, AttributeError) as e:
        component = _loading(e)
        where = f"{folder}" + (f" ({component}/)" if component else "")
        reason = " ".join(str(e).split())  # diffusers' messages span lines; the command line's error is one
        raise ValueError(f"validation_prompts: {where} cannot be loaded as a {cls.__name__}: {reason}") from e
    return pipe


def _check_components(folder: Path, index: dict[str, Any], passed: set[str]) -> None:
    """Refuse a component model_index.json names (and the run does not pass) whose folder is missing
    (transformers then builds an empty tokenizer, without a word), or whose class it takes from a Python file in
    its folder (diffusers would need ``trust_remote_code`` to run it; d2f runs no code from the files it reads)."""
    for name, entry in index.items():
        if name.startswith("_") or name in passed or not isinstance(entry, list) or None in entry or not entry:
            continue  # [null, null]: a component left out
        if not (folder / name).is_dir():
            raise ValueError(f"model_index.json names a {name} {entry!r}, but there is no {name}/ folder")
        code = folder / name / f"{entry[0]}.py"
        if code.is_file():
            raise ValueError(
                f"{code}: the pipeline's {name} is custom code (model_index.json names {entry!r}); d2f runs no "
                "code from model folders"
            )


def _check_loaded(pipe, cls: type, folder: Path) -> None:
    """Refuse a pipeline missing a part its class samples with, or whose tokenizer pads prompts to more tokens
    than its text encoder takes (a tokenizer_config.json without ``model_max_length``)."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER  # what transformers sets for no length

    parts = pipe.components
    missing = [name for name, part in parts.items() if part is None and name not in cls._optional_components]
    if missing:
        raise ValueError(f"{cls.__name__} samples with its {', '.join(missing)}, which model_index.json leaves out")
    for tokenizer, encoder in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        if parts.get(tokenizer) is None or parts.get(encoder) is None:
            continue
        length, limit = parts[tokenizer].model_max_length, parts[encoder].config.max_position_embeddings
        if not isinstance(length, int) or not 1 <= length <= limit:
            given = "sets no model_max_length" if length == VERY_LARGE_INTEGER else f"model_max_length={length!r}"
            raise ValueError(
                f"{folder / tokenizer}: {given}; prompts are padded to it, and {encoder} takes up to "
                f"max_position_embeddings={limit} tokens"
            )


def _loading(error: BaseException) -> str | None:
    """The component diffusers was loading when ``error`` was raised (the ``name`` of its ``load_sub_model``
    frame), so the message can point at its folder; None where the error came from elsewhere."""
    component, frame = None, error.__traceback__
    while frame is not None:
        if frame.tb_frame.f_code.co_name == "load_sub_model":
            component = frame.tb_frame.f_locals.get("name")
        frame = frame.tb_next
    return component if isinstance(component, str) else None
