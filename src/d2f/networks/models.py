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

    name = config.get("_class_name") if isinstance(config, dict) else None
    if name not in UNET_CLASSES:
        raise ValueError(f"{where}: _class_name={name!r}; d2f trains {' and '.join(UNET_CLASSES)}")
    return getattr(diffusers, name)


def check_safetensors(folder: Path, weights: str, sharded: bool) -> list[Path]:
    """Refuse ``folder`` unless every weights file the loader will open is a real safetensors file; returns
    those files.

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
        document = read_json(index)
        weight_map = document.get("weight_map") if isinstance(document, dict) else None
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
    return files


# The weights file diffusers' models and transformers' models are saved under in a pipeline folder.
WEIGHTS = {"diffusers": "diffusion_pytorch_model", "transformers": "model"}


def check_pipeline_folder(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """``model_index.json`` of a diffusers pipeline folder, after the safetensors gate on every model in it
    (``models.check_safetensors``); components in ``skip`` are not loaded from the folder.

    Every component folder is gated whatever library ``model_index.json`` names for it: a loader may pick the
    class by the component's name (``d2f encode`` reads ``vae/`` with diffusers even where it is listed as
    ``["some_lib", ...]``), so a library string d2f does not know must not let a pickled shard through.
    """
    index = read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise ValueError(f"{folder / 'model_index.json'}: expected a JSON object")
    for name, entry in index.items():
        if name.startswith("_") or name in skip or not isinstance(entry, list) or not (folder / name).is_dir():
            continue
        for weights in _component_weights(folder / name, entry[0] if entry else None):
            check_safetensors(folder / name, weights, sharded=True)
    return index


def _component_weights(component: Path, library: Any) -> list[str]:
    """The weights names of ``WEIGHTS`` a loader may read in ``component``: its library's own (a model has a
    ``config.json``), and any other the folder holds a file of that d2f's loaders open (``use_safetensors``:
    ``<weights>.safetensors`` or its index), since the library string does not decide which loader reads it."""
    own = WEIGHTS.get(library) if isinstance(library, str) and (component / "config.json").is_file() else None
    readable = (".safetensors", ".safetensors.index.json")
    return [
        weights
        for weights in WEIGHTS.values()
        if weights == own or any((component / f"{weights}{suffix}").is_file() for suffix in readable)
    ]


def check_finite_weights(model: torch.nn.Module, folder: Path) -> None:
    """Refuse a model with a NaN or inf weight, naming its folder and the tensor: it would otherwise surface
    much later as a NaN loss, sample or latents file with no file to blame."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{folder}: the weight {name} holds NaN or inf")


def check_float_weights(model: torch.nn.Module, files: list[Path]) -> None:
    """Refuse a weights file holding an integer or boolean tensor for one of the model's (floating-point)
    parameters: the loaders cast it silently, so a quantised or mangled file would become garbage weights.
    Only the safetensors headers are read. A file's names may lack the model's prefix (transformers saves
    ``embeddings.*`` for ``text_model.embeddings.*``), so a name matches any dotted tail of a parameter's."""
    from safetensors import safe_open

    tails = set()
    for name, _ in model.named_parameters():
        parts = name.split(".")
        tails.update(".".join(parts[i:]) for i in range(len(parts)))
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                dtype = f.get_slice(key).get_dtype()
                if key in tails and not dtype.startswith(("F", "BF")):
                    raise ValueError(
                        f"{file}: the weight {key} is {dtype}; {type(model).__name__} weights are floating-point"
                    )


# What diffusers' and transformers' loaders raise on a folder they cannot read: a config or weights file that
# does not parse, or does not fit the class it names.
LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, NotImplementedError)


def load_pretrained(cls: type, folder: Path, **options: Any) -> Any:
    """``cls.from_pretrained(folder, **options)`` from local files only; the loader's error becomes a
    ``ValueError`` naming the folder (its own messages often name neither the file nor the component)."""
    try:
        return cls.from_pretrained(folder, local_files_only=True, **options)
    except LOAD_ERRORS as e:
        lines = str(e).strip().splitlines()
        reason = f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__
        raise ValueError(f"{folder}: no {cls.__name__} loads from it ({reason})") from e


def load_model(cls: type, folder: Path, weights: str, **options: Any) -> torch.nn.Module:
    """A diffusers or transformers model from ``folder`` through the safetensors gate (``weights``: the name
    its files are saved under), refused unless every parameter comes from those files as a finite
    floating-point tensor: the loaders initialise a missing one at random and cast an integer one silently."""
    files = check_safetensors(folder, weights, sharded=True)
    model, info = load_pretrained(cls, folder, use_safetensors=True, output_loading_info=True, **options)
    missing = sorted(info["missing_keys"])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(
            f"{folder}: the weight(s) {', '.join(missing[:3])}{more} of its {cls.__name__} are in none of its "
            f"{weights} files; the loader would initialise them at random"
        )
    check_float_weights(model, files)
    check_finite_weights(model, folder)
    return model


def load_unet(folder: Path) -> torch.nn.Module:
    config_file = folder / "config.json"
    config = read_json(config_file)
    check_safetensors(folder, "diffusion_pytorch_model", sharded=True)
    # use_safetensors: diffusers itself must never fall back to a pickled .bin file either.
    unet = unet_class(config, config_file).from_pretrained(folder, use_safetensors=True)
    check_finite_weights(unet, folder)
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
