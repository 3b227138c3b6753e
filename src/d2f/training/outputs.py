"""What a run writes besides its checkpoints: the zero-shot check of the converted teacher, sample grids,
the export with its ``d2f.json``, the loss curve and ``metrics.json``."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .._files import write_json
from ..data.digit_captions import CAPTIONED_DIGITS
from ..data.images import Dataset
from ..evaluation.prompts import export_outputs
from ..figures import save_grid, save_loss_curve
from ..networks.export import write_export
from ..networks.models import Network
from ..networks.sampling import ddim_reference
from ..velocity import D2FVelocity
from . import objectives
from .conditioning import Conditioning, SampleRequest
from .config import TrainConfig
from .validation import Validation


def velocity_field(
    network: Network,
    objective: str,
    guidance: float = 1.0,
    request: SampleRequest | None = None,
    t_min: float | None = None,
) -> D2FVelocity:
    """The velocity field of ``network`` as ``objective`` trained it down to FM time ``t_min`` (a run's
    ``TrainConfig.t_min``; unset: a converted network's), guided with the request's null condition (the null
    class label, or the empty prompt's embeddings)."""
    if guidance != 1 and not (request and request.uncond):
        raise ValueError(
            f"guidance={guidance} needs a null condition: a class-conditional model with a null class, or text "
            "data with null_encoder_hidden_states"
        )
    return D2FVelocity(
        network.unet,
        network.schedule,
        objectives.prediction_type(objective, network.prediction_type),
        guidance_scale=guidance,
        uncond=request.uncond if guidance != 1 else None,
        concat=request.concat if request else None,
        align_input=objectives.aligned(objective),
        t_min=t_min,
    )


SHOWN_CHANNELS = (1, 3)  # grey or RGB pixels; latents cannot be shown without their decoder


def save_images(images: torch.Tensor, path: Path) -> str | None:
    """Images (grey or RGB) become a PNG grid; latents write nothing (None)."""
    if images.shape[1] not in SHOWN_CHANNELS:
        return None
    save_grid(images, path)
    return path.name


@torch.no_grad()
def zero_shot_check(
    network: Network, conditioning: Conditioning, data: Dataset, config: TrainConfig, out: Path, device
):
    """The converted teacher before any finetuning, at its own resolution: FM Euler on the DDIM grid, and
    the same steps of diffusers' DDIMScheduler for comparison (they agree to float rounding)."""
    unet = network.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    request = SampleRequest.make(conditioning, data, min(config.num_samples, 40), size, device)
    field = velocity_field(network, "diffusion", 1.0, request)  # converted, not yet finetuned
    noise = request.noise(unet.config.out_channels, config.seed + 1, device)
    x = field.sample(noise, field.grid("ddim", config.sample_steps), **request.cond)
    z = ddim_reference(
        unet,
        network.schedule,
        network.prediction_type,
        noise,
        config.sample_steps,
        request.cond,
        request.concat,
        set_alpha_to_one=True,
    )
    return {
        "zero_shot_png": save_images(x, out / "zero_shot.png"),
        "zero_shot_max_abs_diff_vs_ddim": float((x - z).abs().max()),
    }


@torch.no_grad()
def sample_images(field: D2FVelocity, objective: str, steps: int, request: SampleRequest, seed: int, device):
    """FM Euler on a uniform grid for flow objectives (the study's best grid after finetuning), DDIM's own
    grid for diffusion finetuning (its natural sampler)."""
    ts = field.grid("ddim" if objective == "diffusion" else "uniform", steps)
    return field.sample(request.noise(field.net.config.out_channels, seed, device), ts, **request.cond)


def run_meta(
    config: TrainConfig,
    network: Network,
    null_class: int | None,
    side: int,
    concat: torch.Tensor | None = None,
    widened: str | None = None,
    labeled: bool = True,
) -> dict[str, Any]:
    """``d2f.json`` of the export of a run of ``config`` that trained ``network`` on samples ``side`` wide,
    with ``concat`` conditions (their channels are recorded) through a conv_in widened by ``widened``'s
    initialisation (None: the pretrained UNet took them already)."""
    return {
        "labeled": labeled,  # trained on class labels (else on the null class: sample_export follows it)
        "cond_channels": 0 if concat is None else concat.shape[1],
        "cond_init": widened,
        "kind": "lora" if config.lora_rank else "full",
        "objective": config.objective,
        "prediction_type": objectives.prediction_type(config.objective, network.prediction_type),
        "align_input": objectives.aligned(config.objective),
        "null_class": null_class,
        "base": network.source if config.lora_rank else None,
        "lora_rank": config.lora_rank,
        "resolution": side,
        "t_min": config.t_min(network.prediction_type, network.schedule),
        "train_config": config.to_dict(),
        "pipeline": network.pipeline,
    }


def write_outputs(
    config: TrainConfig,
    network: Network,
    conditioning: Conditioning,
    data: Dataset,
    validation: Validation | None,
    widened: str | None,
    device,
) -> dict[str, Any]:
    """``samples.png`` (validation prompts through the pipeline, else FM samples of pixels; latents without a
    decoder are not sampled at all) and ``export/``, of the weights in the UNet now (the EMA)."""
    out, size = Path(config.out), tuple(data.images.shape[-2:])
    written: dict[str, Any] = {}
    if validation is not None:  # latents: the exported weights on the validation prompts, decoded
        validation.save(out / "samples.png")
        written["samples_png"] = "samples.png"
    elif data.images.shape[1] in SHOWN_CHANNELS:
        request = SampleRequest.make(conditioning, data, config.num_samples, size, device)
        t_min = config.t_min(network.prediction_type, network.schedule)
        guidance = config.guidance_for(bool(request.uncond))
        field = velocity_field(network, config.objective, guidance, request, t_min)
        images = sample_images(field, config.objective, config.sample_steps, request, config.seed + 2, device)
        written["samples_png"] = save_images(images, out / "samples.png")
    meta = run_meta(config, network, conditioning.null_class, size[-1], data.concat, widened, data.labels is not None)
    write_export(out / "export", network.unet, network.schedule, meta)
    if config.data == CAPTIONED_DIGITS:  # what the export draws through the pipeline, and how well it follows
        written |= export_outputs(
            out / "export",
            out,
            config.sample_steps,
            # guided where the run learnt the empty prompt (dropout); reflow pairs carry the guided map instead
            config.guidance_for(data.null_encoder_hidden_states is not None),
            config.seed + 2,
            config.resolution,
            device,
        )
    return written


@contextlib.contextmanager
def stage(stages: dict[str, dict[str, float | None]], name: str):
    """Record the block's seconds and the process's peak resident memory at its end (MiB; None where the
    platform does not report it) as ``stages[name]``, for ``metrics.json``."""
    started = time.perf_counter()
    yield
    stages[name] = stage_record(time.perf_counter() - started)


def stage_record(seconds: float) -> dict[str, float | None]:
    """One stage's entry in ``metrics.json``: its seconds and the process's peak memory at its end."""
    return {"seconds": round(seconds, 2), "peak_rss_mib": peak_rss_mib()}


def peak_rss_mib() -> float | None:
    """The process's peak resident memory so far, in MiB (``getrusage``: KiB on Linux, bytes on macOS)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def write_summary(
    config: TrainConfig,
    metrics: dict[str, Any],
    losses: list[float],
    start: int,
    seconds: tuple[float, float],
    world,
    device,
) -> dict[str, Any]:
    """``loss.png`` and ``metrics.json``: ``metrics`` plus the steps, the final loss (the mean of the last 50
    finite losses), where it ran and its time (``seconds``: the steps' seconds, and the ``perf_counter`` the
    run started at); returns what it wrote."""
    out = Path(config.out)
    train_seconds, started = seconds
    save_loss_curve(losses, out / "loss.png", title=f"{config.objective} loss ({len(losses)} steps)")
    tail = [v for v in losses[-50:] if math.isfinite(v)]
    metrics = {
        **metrics,
        "steps": config.max_steps,
        "steps_this_run": config.max_steps - start,
        "skipped_steps": [i + 1 for i, v in enumerate(losses) if not math.isfinite(v)],
        "final_loss": sum(tail) / max(1, len(tail)),
        "seconds_train": round(train_seconds, 2),
        "seconds_per_step": round(train_seconds / max(1, config.max_steps - start), 4),
        "seconds_total": round(time.perf_counter() - started, 2),
        "processes": world,
        "device": str(device),
    }
    write_json(out / "metrics.json", metrics)
    return metrics
