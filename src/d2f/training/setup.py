"""What a run sets up before its first step (:func:`set_up`), in order, each refused by name before anything is
written: the checkpoint it resumes, the network it starts from, the validation pipeline, the data (a captioned
folder encoded once by the pipeline's own encoders), a ``conv_in`` widened for the data's conditions, which weights
train, the optimizer and accelerate's wrapping of both."""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import temporary_files, write_json
from ..data.datasets import load_dataset
from ..data.digit_captions import CAPTIONED_DIGITS, write_digit_folder
from ..data.encode import check_encoded, check_training_latents, encode, latent_side
from ..data.images import Dataset
from ..data.pairs import load_pairs
from ..networks.export import load_network
from ..networks.export import remove_interrupted as remove_interrupted_export
from ..networks.models import Network, add_lora, check_sample_size, trainable_parameters
from ..networks.teachers import from_scratch
from ..networks.widen import widen_conv_in
from .checkpoint import load_checkpoint, read_state, resume_point
from .checkpoint import remove_interrupted as remove_interrupted_checkpoints
from .conditioning import Conditioning
from .config import TrainConfig
from .draws import DRAWS, PREVIOUS_DRAWS, Stream
from .outputs import stage, zero_shot_check
from .validation import Validation, pipeline_class


@dataclass
class Run:
    """A run as :func:`set_up` leaves it for its steps."""

    config: TrainConfig
    accelerator: Any
    network: Network
    model: torch.nn.Module  # the UNet as accelerate prepared it (data-parallel)
    optimizer: torch.optim.Optimizer  # what checkpoints save
    prepared: Any  # the optimizer as accelerate prepared it, which steps
    data: Dataset
    conditioning: Conditioning
    stream: Stream
    trainable: dict[str, torch.nn.Parameter]
    ema: dict[str, torch.Tensor]
    validation: Validation | None
    widened: str | None  # conv_in's initialisation where the run widened it


def set_up(
    config: TrainConfig, resume: str | None, progress: bool, accelerator, stages: dict[str, dict]
) -> tuple[Run, dict, int, list]:
    """Everything before the first step, its stages timed into ``stages`` (``outputs.stage``); returns the run,
    the metrics so far, its first step and the losses of the steps before it (a resumed run's)."""
    device, main = accelerator.device, accelerator.is_main_process
    out = Path(config.out)
    _check_out(config)
    checkpoint = _checkpoint_to_resume(config, resume)
    if main:
        _remove_interrupted(out)
    torch.manual_seed(config.seed)  # LoRA's A matrices and from-scratch weights
    with stage(stages, "model"):
        network = _network(config)
        network.unet.to(device)
        validation = _validation(config, network, main)
    with stage(stages, "data"):  # written and encoded first where it has to be
        data = _data(config, network, accelerator, progress and main)
    widened = _widen(config, network, data)
    _check_size(config, network, data)
    conditioning = Conditioning.plan(config, network, data)
    metrics: dict[str, Any] = {"objective": config.objective, "pretrained": network.source}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.init and checkpoint is None:
            with stage(stages, "zero_shot_check"):
                metrics.update(zero_shot_check(network, conditioning, data, config, out, device))

    trainable = _trainable(config, network, widened)
    ema = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.resolved_lr, weight_decay=config.weight_decay)
    start, losses = 0, []
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trainable, ema, optimizer)
        start, losses = state["step"], state["losses"]
    if main:  # only now: a broken checkpoint above must leave the run folder as it was
        write_json(out / "config.json", config.to_dict())
    if validation is not None:
        validation.to(device)
    model, prepared = accelerator.prepare(network.unet, optimizer)
    if config.report_to:  # only now: a refused run must leave no logs behind
        scalars = (bool, int, float, str)  # what a tracker's hyperparameter table takes
        flat = {k: v if isinstance(v, scalars) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("d2f", config=flat)
    stream = Stream(len(data), config.seed)
    run = Run(
        config,
        accelerator,
        network,
        model,
        optimizer,
        prepared,
        data,
        conditioning,
        stream,
        trainable,
        ema,
        validation,
        widened,
    )
    return run, metrics, start, losses


def _checkpoint_to_resume(config: TrainConfig, resume: str | None) -> Path | None:
    """The checkpoint ``resume`` names (None: a new run), refused unless this config and this d2f's draws
    continue the run that wrote it."""
    checkpoint = resume_point(Path(config.out), resume)
    if checkpoint is None:
        return None
    saved = read_state(checkpoint)
    config.check_resumable(TrainConfig.from_dict(saved["config"]), str(checkpoint))
    if saved.get("draws", PREVIOUS_DRAWS) != DRAWS:
        raise ValueError(
            f"--resume: {checkpoint} was trained with draws from {saved.get('draws', PREVIOUS_DRAWS)}; this d2f "
            f"draws with {DRAWS}, so the resumed run would not be the run it continues. Finish it with the "
            "d2f that started it, or start a new run"
        )
    if saved["step"] > config.max_steps:
        raise ValueError(
            f"max_steps={config.max_steps} is below the step of the checkpoint resumed from ({checkpoint}, "
            f"step {saved['step']}); pass --max-steps {saved['step']} or more"
        )
    return checkpoint


def _check_out(config: TrainConfig) -> None:
    """Refuse an ``out`` inside a data folder (the run's own images, ``zero_shot.png`` and ``samples.png``, would
    be read as data by its resume or the next run), and a file where the run writes a folder of its own (found at
    the first validation otherwise, hours in)."""
    out = Path(config.out)
    for flag in ("data", "cond_data"):
        value = getattr(config, flag)
        if value is not None and Path(value).is_dir() and out.resolve().is_relative_to(Path(value).resolve()):
            raise ValueError(
                f"out={config.out!r} lies inside {flag}={value!r}; the run would write into the data it reads: "
                "choose an --out outside it"
            )
    for name, used in (("validation", config.validation_prompts), ("logs", config.report_to)):
        if used and (out / name).exists() and not (out / name).is_dir():
            raise ValueError(f"{out / name} is a file; the run writes its {name} into a folder of that name")


def _remove_interrupted(out: Path) -> None:
    """Temporary folders and files of a killed run (never read: checkpoints and exports are renamed into place,
    files by ``write_atomic``). Under the run's lock no other process writes here, so every temporary file is a
    dead writer's, whatever its pid (a restarted container gives out the same pids again)."""
    names = sorted([*remove_interrupted_checkpoints(out), *remove_interrupted_export(out / "export")])
    if names:
        print(
            f"d2f train: removed {len(names)} half-written folder(s) left by an interrupted run: {', '.join(names)}",
            file=sys.stderr,
        )
    files = [*temporary_files(out), *temporary_files(out / "validation")]
    for file in files:
        file.unlink(missing_ok=True)
    if files:
        shown = ", ".join(str(f.relative_to(out)) for f in files)
        print(
            f"d2f train: removed {len(files)} half-written file(s) left by an interrupted run: {shown}", file=sys.stderr
        )


def _validation(config: TrainConfig, network: Network, main: bool) -> Validation | None:
    """The validation pipeline, loaded (on the CPU) before the data: whatever keeps it from loading is refused
    before an encode of hours and before anything is written. Only the main process samples; the others refuse
    a model that has no pipeline with it."""
    if not config.validation_prompts:
        return None
    if not main:
        pipeline_class(network)
        return None
    return Validation(network, config)


def _network(config: TrainConfig) -> Network:
    """The network the run starts from, on a zero-terminal-SNR schedule when the config asks for one."""
    if config.init:
        network = from_scratch(config.prediction_type or "v_prediction", config.resolution)
    else:
        network = load_network(config.pretrained)
    if not config.zero_terminal_snr:
        return network
    if network.prediction_type != "v_prediction":
        raise ValueError(
            f"zero_terminal_snr=True needs a v_prediction model: {network.source} predicts "
            f"{network.prediction_type!r}, which has no velocity at the pure-noise end of a zero-SNR schedule"
        )
    return dataclasses.replace(network, schedule=network.schedule.with_zero_terminal_snr())


def _data(config: TrainConfig, network: Network, accelerator, progress: bool) -> Dataset:
    """The run's data set: reflow pairs, a captioned folder encoded by the pipeline (:func:`_encoded`), or what
    ``load_dataset`` reads (a latents file ``d2f encode`` wrote is checked against the pipeline first)."""
    channels = network.unet.config.out_channels  # the target's; a widened conv_in also takes the conditions
    if config.pairs is not None:  # a pipeline's pairs are latents
        side = latent_side(network.source, config.resolution) if network.pipeline else config.resolution
        return load_pairs(config.pairs, (channels, side, side), network.source if network.pipeline else None)
    digits = config.data == CAPTIONED_DIGITS
    if digits or (network.pipeline is not None and Path(config.data).is_dir()):
        folder = _digit_folder(config, network, accelerator) if digits else Path(config.data)
        return load_dataset(str(_encoded(config, folder, network, accelerator, progress)), config.resolution, channels)
    if Path(config.data).suffix == ".safetensors" and Path(config.data).is_file():
        check_training_latents(config.data, network.source if network.pipeline else None, config.resolution)
    return load_dataset(config.data, config.resolution, channels, config.classes, config.cond_data)


def _digit_folder(config: TrainConfig, network: Network, accelerator) -> Path:
    """``data="captioned-digits"``: the shipped digits with their captions, written once at the run's resolution
    into ``<out>/captioned-digits`` (``data/digit_captions.py``), for a pipeline to encode."""
    if network.pipeline is None:
        raise ValueError(
            f"data={config.data!r} is a captioned image folder, which needs a text-to-image pipeline as pretrained "
            f"(the shipped one: 'miniature'); {network.source} is not one: give it data 'mnist' or 'digits'"
        )
    folder = Path(config.out) / CAPTIONED_DIGITS
    if accelerator.is_main_process and not folder.is_dir():
        write_digit_folder(folder, config.resolution, config.seed)
    accelerator.wait_for_everyone()
    return folder


def _encoded(config: TrainConfig, folder: Path, network: Network, accelerator, progress: bool) -> Path:
    """A pipeline and a captioned image ``folder``: the run encodes the images and captions once with the
    pipeline's own VAE and text encoders into ``<out>/latents.safetensors``, and reuses that file on resume only if
    the data and settings are unchanged (``encode.check_encoded``)."""
    out = Path(config.out)
    cache = out / "latents.safetensors"
    settings = dict(
        caption_column=config.caption_column, flip=config.flip, seed=config.seed, cond_data=config.cond_data
    )
    if accelerator.is_main_process and not cache.is_file():
        out.mkdir(parents=True, exist_ok=True)
        encode(
            network.source,
            folder,
            config.resolution,
            cache,
            progress=progress,
            device=accelerator.device,
            **settings,
        )
    accelerator.wait_for_everyone()
    check_encoded(cache, network.source, folder, config.resolution, **settings)
    return cache


def _widen(config: TrainConfig, network: Network, data: Dataset) -> str | None:
    """Widen the UNet's conv_in for the data's concat channels if it does not take them yet; returns the
    initialisation used (None: nothing widened). A UNet widened before (an image-to-X export finetuned
    further) takes its conditions as they are; any other width is refused by name."""
    takes, target = network.unet.config.in_channels, data.images.shape[1]
    cond = 0 if data.concat is None else data.concat.shape[1]
    if takes == target + cond:
        return None
    if cond and takes == target:
        widen_conv_in(network.unet, cond, config.cond_init)
        return config.cond_init
    given = f"{target} target channel(s) and " + (f"{cond} condition channel(s)" if cond else "no conditions")
    hint = (
        f"; it was widened for {takes - target}-channel conditions: pass them with --cond-data"
        if takes > target
        else ""
    )
    raise ValueError(f"pretrained={config.pretrained!r} takes {takes} input channels, but the data gives {given}{hint}")


def _check_size(config: TrainConfig, network: Network, data: Dataset) -> tuple[int, ...]:
    """The samples' height and width, refused unless the UNet takes them: images come at ``config.resolution``,
    latents as stored."""
    size = tuple(data.images.shape[-2:])
    source = f"resolution={config.resolution}" if size == (config.resolution,) * 2 else f"data={config.data!r}"
    check_sample_size(network.unet, size, source)
    return size


def _trainable(config: TrainConfig, network: Network, widened: str | None) -> dict[str, torch.nn.Parameter]:
    """What trains: LoRA adapters (and the convs they train fully, ``conv_in`` whenever it was widened) or the
    whole UNet; with gradient checkpointing where the config asks for it and the UNet supports it."""
    unet = network.unet
    if config.gradient_checkpointing:
        if not getattr(unet, "_supports_gradient_checkpointing", False):
            raise ValueError(
                f"gradient_checkpointing=True: {type(unet).__name__} does not support it in this diffusers "
                "(UNet2DModel has it from diffusers 0.32 on); drop --gradient-checkpointing or upgrade diffusers"
            )
        unet.enable_gradient_checkpointing()
    if config.lora_rank:
        add_lora(network, config.lora_rank, config.lora_full_convs, train_conv_in=widened is not None)
    else:
        unet.requires_grad_(True)
    unet.train()
    return trainable_parameters(unet)
