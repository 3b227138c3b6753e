"""``train``: the thin loop. Objectives d2f, fm (naive flow matching) and diffusion on a diffusers UNet,
full or LoRA, from one CPU to many GPUs through accelerate.

What the loop uses lives beside it: the run it is given (``setup.py``), the objectives
(``objectives.py``), the data order and every random draw (``draws.py``), conditioning (``conditioning.py``),
the guards against NaN and inf (``guards.py``), checkpoints, and what a run writes (``outputs.py``).
"""

from __future__ import annotations

import contextlib
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._extras import require
from ..deferred import deferred_checks
from .checkpoint import save_checkpoint
from .config import TrainConfig
from .draws import draws, positions
from .guards import check_trained, check_weights, nonfinite_report, read_step
from .lock import run_lock
from .objectives import objective_loss
from .outputs import stage, stage_record, write_outputs, write_summary
from .setup import Run, set_up


def train(config: TrainConfig, resume: str | None = None, progress: bool = True) -> dict[str, Any]:
    """Run ``config``; ``resume`` = ``"latest"`` or a checkpoint folder. Returns the metrics it writes.

    Writes to ``config.out``: ``config.json``, ``checkpoints/``, ``zero_shot.png`` (a pretrained teacher
    converted, before finetuning), ``samples.png``, ``loss.png``, ``metrics.json`` and ``export/``.
    """
    require("accelerate", "diffusers", "peft", "safetensors", extra="train", feature="d2f.train")
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState

    started = time.perf_counter()
    if config.mixed_precision == "fp16" and PartialState().device.type == "cpu":
        raise ValueError(
            "mixed_precision='fp16' is refused on the CPU: accelerate would silently train in fp32 there; "
            "use 'bf16' or 'no'"
        )
    # accelerate keeps one mixed-precision setting per process; a second run in the same process (a notebook,
    # the tests) may ask for another. The process group (PartialState) is kept.
    AcceleratorState._reset_state(reset_partial_state=False)
    if config.report_to == "tensorboard":
        require("tensorboard", extra="tensorboard", feature="report_to='tensorboard'")
    tracking = {"log_with": config.report_to, "project_dir": str(Path(config.out) / "logs")} if config.report_to else {}
    accelerator = Accelerator(mixed_precision=config.mixed_precision, **tracking)
    with run_lock(Path(config.out)) if accelerator.is_main_process else contextlib.nullcontext():
        return _train_locked(config, resume, progress, accelerator, started)


def _train_locked(config: TrainConfig, resume: str | None, progress: bool, accelerator, started: float) -> dict:
    stages: dict[str, dict] = {}  # seconds and peak memory of each stage, for metrics.json
    run, metrics, start, losses = set_up(config, resume, progress, accelerator, stages)
    main = accelerator.is_main_process
    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=not (progress and main))
    bar.set_description(f"d2f train {config.objective}")
    train_started = time.perf_counter()
    for step in bar:
        total = _step(run, step)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if config.report_to:
            accelerator.log({"loss": total, "lr": config.lr_at(step)}, step=step + 1)
        if run.validation is not None and (step + 1) % config.validation_every == 0:
            _validate(run, step + 1)
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            check_weights(config, step + 1, run.trainable, run.ema)
            if main:
                state = (run.trainable, run.ema, run.optimizer, config.seed, config.to_dict(), losses)
                save_checkpoint(Path(config.out), step + 1, *state)
    train_seconds = time.perf_counter() - train_started
    stages["train"] = stage_record(train_seconds)
    check_trained(config, start, losses)
    check_weights(config, config.max_steps, run.trainable, run.ema)
    accelerator.wait_for_everyone()

    if main:
        with ema_weights(run.trainable, run.ema), stage(stages, "outputs"):
            run.network.unet.eval()
            written = write_outputs(
                config, run.network, run.conditioning, run.data, run.validation, run.widened, accelerator.device
            )
        seconds = (train_seconds, started)
        metrics = write_summary(
            config,
            metrics | written | {"stages": stages},
            losses,
            start,
            seconds,
            accelerator.num_processes,
            accelerator.device,
        )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


def _step(run: Run, step: int) -> float:
    """One optimisation step: the micro-batches' gradients, the loss averaged over every process and read once,
    then (for a finite loss) the update and the EMA. Returns the loss."""
    config, accelerator = run.config, run.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    for group in run.prepared.param_groups:
        group["lr"] = config.lr_at(step)
    value = torch.zeros((), device=accelerator.device)
    with deferred_checks() as checks:  # the step's checks stay on the device until its loss is read
        for micro in range(config.grad_accum):
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(run.model), accelerator.autocast():
                where = positions(config, step, micro, rank, world)
                loss = _micro_batch_loss(
                    config, run.network, run.model, run.data, run.stream, run.conditioning, where, accelerator.device
                )
                accelerator.backward(loss / config.grad_accum)
            # The mean over all processes: every rank sees the same value (and stops together on a NaN).
            value = value + accelerator.reduce(loss.detach(), reduction="mean") / config.grad_accum
        total = read_step(checks, value, step, run.stream, config, world)
    if not math.isfinite(total) and config.on_nonfinite == "stop":
        raise FloatingPointError(nonfinite_report(config, step, run.stream, world, total))
    if math.isfinite(total):  # else --on-nonfinite skip: the step changes nothing
        if config.grad_clip:
            accelerator.clip_grad_norm_(list(run.trainable.values()), config.grad_clip)
        run.prepared.step()
        decay = min(config.ema_decay, (step + 2) / (step + 11))
        with torch.no_grad():
            for n, p in run.trainable.items():
                run.ema[n].lerp_(p.detach(), 1 - decay)
    run.prepared.zero_grad(set_to_none=True)
    return total


def _micro_batch_loss(config, network, model, data, stream, conditioning, where, device) -> torch.Tensor:
    """The loss of the samples at stream positions ``where``."""
    indices = stream.indices(where)
    shape = tuple(data.images.shape[1:])
    noise, times, drop = draws(config, where, shape, network.prediction_type, network.schedule, device)
    if data.noise is not None:  # reflow: each image keeps the noise it was sampled from
        noise = data.noise[indices]
    cond = conditioning.kwargs(data, indices, drop, device)
    concat = data.concat[indices].to(device) if data.concat is not None else None

    def run(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if concat is not None:
            z = torch.cat([z, concat.to(z.dtype)], dim=1)
        return model(z, k.to(device, torch.float32), **cond).sample

    clean, noise = data.images[indices].to(device), noise.to(device)
    dtype = next(network.unet.parameters()).dtype
    return objective_loss(config.objective, run, network.schedule, network.prediction_type, clean, noise, times, dtype)


def _validate(run: Run, step: int) -> None:
    """The validation prompts through the pipeline with the current weights, saved and logged."""
    config, unet = run.config, run.network.unet
    unet.eval()
    images = run.validation.save(Path(config.out) / "validation" / f"step-{step:08d}.png")
    unet.train()
    if config.report_to:
        tracker = run.accelerator.get_tracker(config.report_to)
        tracker.log_images({"validation": (images + 1) / 2}, step=step, dataformats="NCHW")


@contextlib.contextmanager
def ema_weights(trainable: dict[str, torch.nn.Parameter], ema: dict[str, torch.Tensor]):
    """Swap the EMA into the model for export and sampling, then put the training weights back."""
    saved = {n: p.detach().clone() for n, p in trainable.items()}
    with torch.no_grad():
        for n, p in trainable.items():
            p.copy_(ema[n])
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in trainable.items():
                p.copy_(saved[n])
