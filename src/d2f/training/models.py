"""Loading the network to train: the embedded teacher, a d2f export, a diffusers UNet folder, or the
teacher's architecture from scratch; LoRA through peft."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..schedule import Schedule

# The embedded teacher's architecture (d2f/assets/teacher): 16x16 MNIST, 10 classes + 1 null class.
TEACHER_ARCH: dict[str, Any] = {
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
# LoRA targets: attention projections and the resnet blocks' convolutions.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
FULL_CONVS = ("conv_in.", "conv_out.")
UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


def teacher_path() -> Path:
    return Path(__file__).resolve().parent.parent / "assets" / "teacher"


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


def _diffusers_schedule(folder: Path) -> Schedule:
    for candidate in (folder / "scheduler", folder.parent / "scheduler"):
        config = candidate / "scheduler_config.json"
        if config.exists():
            return Schedule.from_diffusers(json.loads(config.read_text()))
    raise ValueError(
        f"{folder}: no scheduler/scheduler_config.json beside or inside it; d2f needs the schedule the UNet was "
        "trained with"
    )


def from_scratch(prediction_type: str) -> Network:
    from diffusers import UNet2DModel

    arch = dict(TEACHER_ARCH)
    return Network(
        unet=UNet2DModel(**arch),
        schedule=Schedule.scaled_linear(prediction_type=prediction_type),
        prediction_type=prediction_type,
        null_class=arch["num_class_embeds"] - 1,
        source="teacher-config",
    )


def load_network(spec: str) -> Network:
    """``teacher``, a d2f export folder (full finetune), a diffusers UNet folder, or a pipeline folder."""
    from .export import read_export

    folder = teacher_path() if spec == "teacher" else Path(spec)
    source = spec if spec == "teacher" else str(folder.resolve())  # LoRA exports name their base by it
    if (folder / "d2f.json").exists():
        export = read_export(folder)
        if export.meta["kind"] != "full" or not export.meta["align_input"]:
            raise ValueError(
                f"pretrained={spec!r} is a {export.meta['kind']} export of a {export.meta['objective']!r} run; "
                "finetuning starts from a full export of a diffusion or d2f model, or a diffusers UNet"
            )
        return Network(
            load_unet(folder / "unet"),
            export.schedule,
            export.meta["prediction_type"],
            export.meta["null_class"],
            source,
        )
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"
    if not (folder / "config.json").exists():
        raise ValueError(f"pretrained={spec!r}: not a d2f export, a diffusers UNet folder or a pipeline folder")
    schedule = _diffusers_schedule(folder)
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
