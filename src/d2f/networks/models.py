"""The networks d2f trains: diffusers UNets loaded from safetensors with the schedule they were trained on,
and LoRA through peft. (The embedded teachers are in ``teachers.py``; exports and ``load_network`` in
``export.py``.)"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import read_json
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
    pipeline: str | None = None  # the diffusers pipeline class the UNet came in (model_index.json), if any


def unet_class(config: dict[str, Any], where: Path) -> type:
    import diffusers

    name = config.get("_class_name")
    if name not in UNET_CLASSES:
        raise ValueError(f"{where}: _class_name={name!r}; d2f trains {' and '.join(UNET_CLASSES)}")
    return getattr(diffusers, name)


def check_safetensors(folder: Path, weights: str, sharded: bool) -> None:
    """Refuse ``folder`` unless every weights file the loader will open is a real safetensors file.

    The one gate before diffusers or peft reads a folder. Either may ``torch.load`` a pickle: peft falls back
    to ``<weights>.bin`` when the safetensors file is missing, and diffusers (even with
    ``use_safetensors=True``) loads whatever shards a ``<weights>.safetensors.index.json`` names, ``.bin``
    included. So the index (when ``sharded`` loaders read one) must name only ``.safetensors`` shards inside
    ``folder``, and each file must parse as safetensors (a pickle renamed ``.safetensors`` does not).
    """
    from safetensors import SafetensorError, safe_open

    single, index = folder / f"{weights}.safetensors", folder / f"{weights}.safetensors.index.json"
    files = [single] if single.is_file() else []
    if sharded and index.is_file():  # diffusers prefers the index where both exist
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index}: weight_map must map tensor names to shard file names")
        files = []
        for shard in sorted(set(weight_map.values())):
            if not shard.endswith(".safetensors") or Path(shard).name != shard:
                raise ValueError(
                    f"{index} names the shard {shard!r}; d2f loads only .safetensors shards beside the index, "
                    "never a pickled .bin or .pt file (convert it once, in a process you trust)"
                )
            files.append(folder / shard)
    if not files:
        raise ValueError(
            f"{folder}: no {single.name}; d2f loads weights from safetensors only, never from a pickled .bin or "
            ".pt file (convert it once, in a process you trust)"
        )
    for file in files:
        try:
            with safe_open(str(file), "pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{file}: not a readable safetensors file ({e})") from e


# The weights file diffusers' models and transformers' models are saved under in a pipeline folder.
WEIGHTS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def check_pipeline_folder(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline folder, after the safetensors gate on every model in it
    (``models.check_safetensors``); components in ``skip`` are not loaded from the folder."""
    index = read_json(folder / "model_index.json")
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or entry[0] not in WEIGHTS:
            continue
        if (folder / name / "config.json").is_file():
            check_safetensors(folder / name, WEIGHTS[entry[0]], sharded=True)
    return index


def load_unet(folder: Path) -> torch.nn.Module:
    config_file = folder / "config.json"
    config = read_json(config_file)
    check_safetensors(folder, "diffusion_pytorch_model", sharded=True)
    # use_safetensors: diffusers itself must never fall back to a pickled .bin file either.
    unet = unet_class(config, config_file).from_pretrained(folder, use_safetensors=True)
    # A NaN weight would otherwise surface much later as a NaN loss or sample with no file to blame.
    for name, tensor in unet.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{folder}: the weight {name} holds NaN or inf")
    return unet


def diffusers_unet(folder: Path, spec: str, source: str) -> Network:
    """A diffusers UNet folder (or a pipeline folder holding ``unet/``) with its scheduler config beside it."""
    if (folder / "unet" / "config.json").exists():
        folder = folder / "unet"
    if not (folder / "config.json").exists():
        raise ValueError(f"pretrained={spec!r}: not a d2f export, a diffusers UNet folder or a pipeline folder")
    for candidate in (folder / "scheduler", folder.parent / "scheduler"):
        config = candidate / "scheduler_config.json"
        if config.exists():
            schedule = Schedule.from_diffusers(read_json(config))
            break
    else:
        raise ValueError(
            f"{folder}: no scheduler/scheduler_config.json beside or inside it; d2f needs the schedule the UNet "
            "was trained with"
        )
    if schedule.prediction_type is None:
        raise ValueError(f"pretrained={spec!r}: its scheduler config names no prediction_type")
    index = folder.parent / "model_index.json"
    pipeline = read_json(index).get("_class_name") if index.is_file() else None
    return Network(load_unet(folder), schedule, schedule.prediction_type, None, source, pipeline)


def check_sample_size(unet: torch.nn.Module, size: tuple[int, ...], source: str) -> None:
    """Refuse a sample size the UNet cannot take, before anything is computed or written.

    diffusers' ``UNet2DModel`` halves its input in every down block but the last and concatenates the skips
    on the way up, so each side must be a multiple of ``2 ** (blocks - 1)``; ``UNet2DConditionModel`` passes
    the skip sizes to its upsamplers and takes any size.
    """
    if type(unet).__name__ != "UNet2DModel":
        return
    factor = 2 ** (len(unet.config.block_out_channels) - 1)
    if any(side < 1 or side % factor for side in size):
        raise ValueError(
            f"{source}: {'x'.join(map(str, size))} samples do not fit this UNet2DModel, whose "
            f"{len(unet.config.block_out_channels)} down blocks need each side a positive multiple of {factor}"
        )


def add_lora(network: Network, rank: int, full_convs: bool | None, train_conv_in: bool = False) -> bool:
    """Inject LoRA adapters (B = 0, so the model is unchanged) and freeze everything else; returns
    ``full_convs`` as resolved.

    With ``full_convs`` the first and last convolutions stay fully trainable, as in the paper's best runs.
    ``None`` means that recipe, except for a UNet from a diffusers pipeline: its export must load with
    ``pipe.load_lora_weights``, and diffusers' LoRA format holds LoRA weights only. ``train_conv_in`` trains
    ``conv_in`` fully whatever ``full_convs`` says: a widened one has new weights that LoRA cannot reach.
    """
    from peft import inject_adapter_in_model

    full_convs = network.pipeline is None if full_convs is None else full_convs
    unet = network.unet
    inject_adapter_in_model(lora_config(rank), unet)
    for name, param in unet.named_parameters():
        full = (full_convs and name.startswith(FULL_CONVS)) or (train_conv_in and name.startswith("conv_in."))
        param.requires_grad_("lora_" in name or full)
    return full_convs


def lora_config(rank: int, modules_to_save: list[str] | None = None):
    """d2f's LoRA: attention projections and resnet convs; ``modules_to_save`` names fully trained modules."""
    from peft import LoraConfig

    return LoraConfig(
        r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True, modules_to_save=modules_to_save
    )


def trainable_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in unet.named_parameters() if p.requires_grad}
