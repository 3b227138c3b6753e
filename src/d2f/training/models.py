"""The networks d2f trains: diffusers UNets loaded from safetensors with the schedule they were trained on,
and LoRA through peft. (The embedded teacher is in ``teacher.py``; exports and ``load_network`` in
``export.py``.)"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..schedule import Schedule

# LoRA targets: attention projections and the resnet blocks' convolutions.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
FULL_CONVS = ("conv_in.", "conv_out.")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class Network:
    """A network to train or sample, with what it takes to convert it."""

    unet: torch.nn.Module
    schedule: Schedule
    prediction_type: str
    null_class: int | None  # the label that means "no class" (conditioning dropout), if any
    source: str


def unet_class(config: dict[str, Any], where: Path) -> type:
    import diffusers

    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{where}: _class_name={name!r}; d2f trains {' and '.join(UNET_CLASSES)}")
    return getattr(diffusers, name)


def load_unet(folder: Path) -> torch.nn.Module:
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    weights = [
        folder / "diffusion_pytorch_model.safetensors",
        folder / "diffusion_pytorch_model.safetensors.index.json",
    ]
    if not any(w.is_file() for w in weights):
        raise ValueError(
            f"{folder}: no diffusion_pytorch_model.safetensors; d2f loads weights from safetensors only, never "
            "from a pickled .bin or .pt file (convert it once, in a process you trust)"
        )
    # use_safetensors: diffusers itself must never fall back to a pickled .bin file either.
    return unet_class(config, config_file).from_pretrained(folder, use_safetensors=True)


def diffusers_unet(folder: Path, spec: str, source: str) -> Network:
    """A diffusers UNet folder (or a pipeline folder holding ``unet/``) with its scheduler config beside it."""
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"
    if not (folder / "config.json").exists():
        raise ValueError(f"pretrained={spec!r}: not a d2f export, a diffusers UNet folder or a pipeline folder")
    for candidate in (folder / "scheduler", folder.parent / "scheduler"):
        config = candidate / "scheduler_config.json"
        if config.exists():
            schedule = Schedule.from_diffusers(json.loads(config.read_text()))
            break
    else:
        raise ValueError(
            f"{folder}: no scheduler/scheduler_config.json beside or inside it; d2f needs the schedule the UNet "
            "was trained with"
        )
    if schedule.prediction_type is None:
        raise ValueError(f"pretrained={spec!r}: its scheduler config names no prediction_type")
    return Network(load_unet(folder), schedule, schedule.prediction_type, None, source)


def add_lora(unet: torch.nn.Module, rank: int, full_convs: bool) -> None:
    """Inject LoRA adapters (B = 0, so the model is unchanged) and freeze everything else.

    With ``full_convs`` the first and last convolutions stay fully trainable, as in the paper's best runs.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(rank), unet)
    for name, param in unet.named_parameters():
        param.requires_grad_("lora_" in name or (full_convs and name.startswith(FULL_CONVS)))


def lora_config(rank: int, modules_to_save: list[str] | None = None):
    """d2f's LoRA: attention projections and resnet convs; ``modules_to_save`` names fully trained modules."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True, modules_to_save=modules_to_save
    )


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}
