"""The export folder of a training run: writing it, reading it, and loading it back, as a velocity field
(``d2f.load``) or as the network a new run starts from (``load_network``).

Layout (format ``d2f.export``, version 1)::

    d2f.json            what the model is: kind (full | lora), prediction_type, align_input, null_class,
                        base (lora only), objective, resolution (the side of the samples it trained on: pixels,
                        or latent pixels for latents), t_min (the lowest FM time its training drew, where its
                        grids start), the training config
    schedule.json       the d2f Schedule (float64 alphas_cumprod)
    scheduler/          converted models: a d2f.D2FScheduler config of the same schedule, with
                        flow_finetuned for flow objectives
                        (``D2FScheduler.from_pretrained(export / "scheduler", solver="auto")``)
    unet/               kind=full: the finetuned UNet (diffusers save_pretrained, safetensors;
                        ``UNet2DModel.from_pretrained(export / "unet")``)
    adapter/            kind=lora: a standard peft adapter (adapter_config.json, adapter_model.safetensors)
                        for the base model named in d2f.json; conv_in / conv_out, when trained fully,
                        are its ``modules_to_save``. Load it with
                        ``PeftModel.from_pretrained(base_unet, export / "adapter")``
    pytorch_lora_weights.safetensors
                        kind=lora of a UNet from a diffusers pipeline (d2f.json names it in ``pipeline``), with
                        no fully trained convs: the same adapter in diffusers' LoRA format, written by the
                        pipeline class's own ``save_lora_weights``, so ``pipe.load_lora_weights(export)`` loads
                        it. (diffusers' format holds LoRA weights only: with fully trained convs it would lose
                        them, so it is not written then.)

Everything is safetensors or JSON; nothing pickled is written or read.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._checks import check_choice, describe
from .._extras import require
from .._files import built_in_place, read_json
from .._versioned import Document
from ..parametrization import DIFFUSERS_PREDICTION_TYPES, PREDICTION_TYPES
from ..schedule import Schedule
from ..training.config import OBJECTIVES, TrainConfig
from .miniature import pipeline_path
from .models import FULL_CONVS, Network, check_safetensors, diffusers_unet, load_unet, lora_config
from .teachers import teacher_path
from .widen import widen_conv_in

META_TYPES = {
    "kind": (str,),
    "objective": (str,),
    "prediction_type": (str,),
    "align_input": (bool,),
    "null_class": (int, type(None)),
    "base": (str, type(None)),
    "lora_rank": (int,),
    "resolution": (int,),
    "train_config": (dict,),
}
# Optional: exports written before them have none (no pipeline, no condition).
OPTIONAL = {
    "pipeline": (str, type(None)),
    "cond_channels": (int,),
    "cond_init": (str, type(None)),
    "labeled": (bool,),
    "t_min": (float, int),
}
META_TYPES.update(OPTIONAL)
EXPORT = Document("d2f.export", 1, frozenset(META_TYPES) - set(OPTIONAL), frozenset(OPTIONAL), META_TYPES)
KINDS = ("full", "lora")


@dataclass
class Export:
    path: Path
    meta: dict[str, Any]
    schedule: Schedule


def ddim_config(schedule: Schedule, prediction_type: str) -> dict[str, Any]:
    """A diffusers DDIMScheduler config of ``schedule`` (SD's step rule: leading spacing, offset 1)."""
    check_choice("prediction_type", prediction_type, DIFFUSERS_PREDICTION_TYPES)
    return {
        "_class_name": "DDIMScheduler",
        **schedule.diffusers_config(),
        "prediction_type": prediction_type,
        "clip_sample": False,
        "set_alpha_to_one": False,
        "steps_offset": 1,
        "timestep_spacing": "leading",
    }


def flow_finetuned(meta: dict[str, Any]) -> bool:
    """Whether an export's network was trained on a flow objective (Diff2Flow, naive FM, reflow), the
    right-hand column of ``d2f.auto_sampler``'s table; the teacher and diffusion finetunes are not."""
    return meta["objective"] != "diffusion"


def trained_t_min(export: Export) -> float:
    """Where sampling an export starts: the ``t_min`` it records, or for an export written before that was
    recorded, what its training config drew (the same rule)."""
    meta = export.meta
    if "t_min" in meta:
        return float(meta["t_min"])
    return TrainConfig.from_dict(meta["train_config"]).t_min(meta["prediction_type"], export.schedule)


def write_export(folder: Path, unet: torch.nn.Module, schedule: Schedule, meta: dict[str, Any]) -> None:
    """Write atomically: everything goes to a temporary sibling folder, renamed into place at the end
    (:func:`~d2f._files.built_in_place`)."""
    with built_in_place(folder) as tmp:
        if meta["kind"] == "lora":
            from peft.utils import get_peft_model_state_dict
            from safetensors.torch import save_file

            adapter = tmp / "adapter"
            adapter.mkdir()
            state = dict(get_peft_model_state_dict(unet))
            full = sorted(
                {n.split(".")[0] for n, p in unet.named_parameters() if n.startswith(FULL_CONVS) and p.requires_grad}
            )
            state.update({k: v for k, v in unet.state_dict().items() if k.split(".")[0] in full})
            # peft's own layout: keys under base_model.model., fully trained modules as modules_to_save.
            state = {f"base_model.model.{k}": v.detach().contiguous().cpu() for k, v in state.items()}
            save_file(state, str(adapter / "adapter_model.safetensors"))
            lora_config(meta["lora_rank"], full or None).save_pretrained(str(adapter))
            if meta.get("pipeline") and not full:
                save_diffusers_lora(tmp, unet, meta["pipeline"])
        else:
            unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        (tmp / "schedule.json").write_text(json.dumps(schedule.to_dict()))
        if meta["align_input"]:
            from ..scheduler import D2FScheduler

            config = ddim_config(schedule, meta["prediction_type"])
            scheduler = D2FScheduler.from_config(config, flow_finetuned=flow_finetuned(meta), t_min=meta["t_min"])
            scheduler.save_pretrained(str(tmp / "scheduler"))
        (tmp / "d2f.json").write_text(json.dumps(EXPORT.new(**meta), indent=1))


def save_diffusers_lora(folder: Path, unet: torch.nn.Module, pipeline: str) -> None:
    """The UNet's LoRA in diffusers' format, with ``pipeline``'s own ``save_lora_weights`` (what diffusers'
    LoRA training scripts call), for ``pipe.load_lora_weights(folder)``."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    saver = getattr(getattr(diffusers, pipeline, None), "save_lora_weights", None)
    if saver is None:
        raise ValueError(f"pipeline={pipeline!r}: diffusers has no LoRA loader for it (no save_lora_weights)")
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    saver(str(folder), unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in layers.items()})


def remove_interrupted(folder: Path) -> list[str]:
    """Clear what a run killed inside :func:`write_export` left beside the export ``folder``: an old export
    moved aside but not yet replaced is put back; temporary folders are removed. Returns their names."""
    folder = Path(folder)
    for old in sorted(folder.parent.glob(f".{folder.name}.old-*")):  # killed between the two renames
        if not folder.exists():
            old.rename(folder)
            print(f"d2f train: restored {folder} from {old.name} (an interrupted export)", file=sys.stderr)
    leftovers = [*folder.parent.glob(f".{folder.name}.tmp-*"), *folder.parent.glob(f".{folder.name}.old-*")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    return [p.name for p in leftovers]


def read_export(folder: Path) -> Export:
    folder = Path(folder)
    where = folder / "d2f.json"
    meta = EXPORT.read(where)
    check_meta(meta, where)
    try:
        TrainConfig.from_dict(meta["train_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: train_config: {e}") from e
    schedule = Schedule.from_dict(read_json(folder / "schedule.json"))
    return Export(folder, meta, schedule)


# The lowest value each count of d2f.json can take: a sample is at least one pixel wide; a null class indexes a
# class embedding.
META_MINIMUM = {"resolution": 1, "lora_rank": 0, "cond_channels": 0, "null_class": 0}


def check_meta(meta: dict[str, Any], where: Path) -> None:
    """``d2f.json``'s values, beyond the types its document checks: named choices and counts in range, so that a
    doctored file is refused naming it, not as a shape error (or an embedding's index error) mid-sampling."""
    for key, allowed in (("kind", KINDS), ("prediction_type", PREDICTION_TYPES), ("objective", OBJECTIVES)):
        if meta[key] not in allowed:
            raise ValueError(f"{where}: {key}={meta[key]!r} is not one of {allowed}")
    for key, low in META_MINIMUM.items():
        if meta.get(key) is not None and meta[key] < low:
            raise ValueError(f"{where}: {key}={meta[key]!r} must be at least {low}")
    if meta["kind"] == "lora" and meta["base"] is None:
        raise ValueError(f"{where}: a LoRA export must name its base model")


# The models d2f ships, by the names a run's ``pretrained`` and a LoRA export's ``base`` give them.
SHIPPED = {"teacher": teacher_path, "miniature": pipeline_path}


def model_folder(spec: str) -> Path:
    """The folder ``spec`` names: a shipped model's (:data:`SHIPPED`) or the path itself."""
    return SHIPPED[spec]() if spec in SHIPPED else Path(spec)


def read_model(model: str | os.PathLike, name: str = "model") -> Export:
    """The export ``model`` names: ``"teacher"`` (the embedded one) or an export folder; anything else is refused
    as the argument ``name``, before a missing ``d2f.json`` is reported as an unreadable file."""
    folder = model_folder(str(model))
    if not (folder / "d2f.json").is_file():
        raise ValueError(f"{name}={str(model)!r}: no d2f.json there, so it is not a d2f export")
    return read_export(folder)


def check_unet(unet: torch.nn.Module, meta: dict[str, Any], where: Path) -> None:
    """``d2f.json`` against the UNet it describes: its input is the sample's channels plus ``cond_channels``, and
    its null class one of its class embeddings."""
    config, cond = unet.config, meta.get("cond_channels", 0)
    if config.in_channels != config.out_channels + cond:
        raise ValueError(
            f"{where}: cond_channels={cond}, but its UNet takes {config.in_channels} input channel(s) for "
            f"{config.out_channels} output channel(s), so {config.in_channels - config.out_channels} condition "
            "channel(s)"
        )
    embeddings = getattr(config, "num_class_embeds", None)
    if meta["null_class"] is not None and (embeddings is None or meta["null_class"] >= embeddings):
        raise ValueError(
            f"{where}: null_class={meta['null_class']}, but its UNet has {embeddings or 'no'} class embedding(s)"
        )


def load(
    path: str | os.PathLike,
    guidance_scale: float = 1.0,
    device: str | torch.device | None = None,
    concat: torch.Tensor | None = None,
):
    """A d2f export (or ``"teacher"``, the embedded one) as a ready ``D2FVelocity`` in eval mode.

    With ``guidance_scale != 1`` the unconditional branch uses the export's null class label. An export trained
    with conditions (``cond_channels`` in ``d2f.json``) samples with ``concat``, one condition per sample of
    that many channels (``D2FVelocity(concat=...)``); without them it is refused.
    """
    from ..velocity import D2FVelocity

    require("diffusers", "safetensors", "peft", extra="train", feature="d2f.load")
    export = read_model(path, "path")
    folder, meta = export.path, export.meta
    cond_channels = meta.get("cond_channels", 0)
    if concat is not None and not (isinstance(concat, torch.Tensor) and concat.ndim == 4):
        raise ValueError(f"concat must be a (B, C, H, W) tensor, got {describe(concat)}")
    if (0 if concat is None else concat.shape[1]) != cond_channels:
        raise ValueError(
            f"concat={describe(concat)}: {folder} was trained with "
            + (
                f"a {cond_channels}-channel condition per sample; pass it (d2f sample and d2f eval --task dense: "
                "--cond-data)"
                if cond_channels
                else "no condition"
            )
        )
    if meta["kind"] == "full":
        unet = load_unet(folder / "unet")
    else:
        from peft import PeftModel

        adapter = folder / "adapter"
        check_safetensors(adapter, "adapter_model", sharded=False)
        # The standard peft call, as a user would make it; it restores modules_to_save (conv_in/conv_out) too,
        # a widened conv_in included once the base has its shape.
        base = load_network(meta["base"]).unet
        if meta.get("cond_init"):
            widen_conv_in(base, meta["cond_channels"], "zero")
        unet = PeftModel.from_pretrained(base, str(adapter)).get_base_model()
    check_unet(unet, meta, folder / "d2f.json")
    unet = unet.eval().requires_grad_(False)
    if device is not None:
        unet = unet.to(device)
    uncond = None
    if guidance_scale != 1:
        if meta["null_class"] is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs a null class, and {folder} has none")
        uncond = {"class_labels": torch.tensor([meta["null_class"]], device=device)}
    return D2FVelocity(
        unet,
        export.schedule,
        meta["prediction_type"],
        guidance_scale=guidance_scale,
        uncond=uncond,
        concat=concat if concat is None or device is None else concat.to(device),
        align_input=meta["align_input"],
        t_min=trained_t_min(export),
    )


def load_network(spec: str) -> Network:
    """What a run starts from: ``teacher`` (the embedded teacher), ``miniature`` (the shipped miniature Stable
    Diffusion pipeline), a d2f export folder (full finetune of a diffusion or d2f model), a diffusers UNet folder,
    or a pipeline folder."""
    folder = model_folder(spec)
    source = spec if spec in SHIPPED else str(folder.resolve())  # LoRA exports name their base by it
    if not (folder / "d2f.json").exists():
        return diffusers_unet(folder, spec, source)
    export = read_export(folder)
    if export.meta["kind"] != "full" or not export.meta["align_input"]:
        raise ValueError(
            f"pretrained={spec!r} is a {export.meta['kind']} export of a {export.meta['objective']!r} run; "
            "finetuning starts from a full export of a diffusion or d2f model, or a diffusers UNet"
        )
    meta = export.meta
    return Network(load_unet(folder / "unet"), export.schedule, meta["prediction_type"], meta["null_class"], source)
