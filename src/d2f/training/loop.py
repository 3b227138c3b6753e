"""``train``: the thin loop. Objectives d2f, fm (naive flow matching) and diffusion on a diffusers UNet,
full or LoRA, from one CPU to many GPUs through accelerate.

What the loop uses lives beside it: the objectives (``objectives.py``), the data order and every random
draw (``draws.py``), conditioning (``conditioning.py``), checkpoints, exports, and sampling.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._checks import NonFiniteError
from .._extras import require
from .._files import write_json
from ..deferred import DeferredChecks, deferred_checks
from .checkpoint import latest_checkpoint, load_checkpoint, read_state, resume_point, save_checkpoint
from .checkpoint import remove_interrupted as remove_interrupted_checkpoints
from .conditioning import Conditioning, SampleRequest
from .config import TrainConfig
from .data import Dataset, load_dataset
from .draws import DRAWS, PREVIOUS_DRAWS, Stream, draws, positions
from .encode import check_encoded, check_training_latents, encode
from .export import load_network, run_meta, write_export
from .export import remove_interrupted as remove_interrupted_export
from .images import save_loss_curve
from .lock import run_lock
from .models import Network, add_lora, check_sample_size, trainable_parameters
from .objectives import objective_loss
from .pairs import load_pairs
from .sampling import SHOWN_CHANNELS, sample_images, save_images, velocity_field, zero_shot_check
from .teacher import from_scratch
from .validation import Validation, pipeline_class
from .widen import widen_conv_in


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


def _network(config: TrainConfig) -> Network:
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


def _data(config: TrainConfig, network: Network, out: Path, accelerator, progress: bool) -> Dataset:
    channels = network.unet.config.out_channels  # the target's; a widened conv_in also takes the conditions
    if config.pairs is not None:
        return load_pairs(config.pairs, (channels, config.resolution, config.resolution))
    if network.pipeline is not None and Path(config.data).is_dir():
        return load_dataset(str(_encoded(config, network, out, accelerator, progress)), config.resolution, channels)
    if Path(config.data).suffix == ".safetensors" and Path(config.data).is_file():
        check_training_latents(config.data, network.source if network.pipeline else None, config.resolution)
    return load_dataset(config.data, config.resolution, channels, config.classes, config.cond_data)


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


def _encoded(config: TrainConfig, network: Network, out: Path, accelerator, progress: bool) -> Path:
    """A pipeline and a captioned image folder: the run encodes the images and captions once with the pipeline's
    own VAE and text encoders into ``<out>/latents.safetensors``, and reuses that file on resume only if the
    data and settings are unchanged (``encode.check_encoded``)."""
    cache = out / "latents.safetensors"
    settings = dict(
        caption_column=config.caption_column, flip=config.flip, seed=config.seed, cond_data=config.cond_data
    )
    if accelerator.is_main_process and not cache.is_file():
        out.mkdir(parents=True, exist_ok=True)
        encode(
            network.source,
            config.data,
            config.resolution,
            cache,
            progress=progress,
            device=accelerator.device,
            **settings,
        )
    accelerator.wait_for_everyone()
    check_encoded(cache, network.source, config.data, config.resolution, **settings)
    return cache


def _remove_interrupted(out: Path) -> None:
    """Temporary folders of a killed run (never read: checkpoints and exports are renamed into place)."""
    names = sorted([*remove_interrupted_checkpoints(out), *remove_interrupted_export(out / "export")])
    if names:
        print(
            f"d2f train: removed {len(names)} half-written folder(s) left by an interrupted run: {', '.join(names)}",
            file=sys.stderr,
        )


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


def _nonfinite_report(config, out: Path, step: int, stream: Stream, world: int, total: float) -> str:
    last = latest_checkpoint(out)
    return (
        f"non-finite loss {total} at step {step + 1}; batch indices (into the data set) "
        f"{_batch(step, stream, config, world)}; last good "
        f"checkpoint: {last if last is not None else 'none'}. Resume from it with a lower lr, or pass "
        "--on-nonfinite skip to skip such steps"
    )


def _read_step(checks: DeferredChecks, value: torch.Tensor, step: int, stream: Stream, config, world: int) -> float:
    """The step's mean loss, read with its deferred checks in one transfer: the step's only host
    synchronisation. A network output with NaN or inf makes the loss NaN (every rank's, through the mean, so
    all stop or skip together); other failed checks (NaN in the data, say) stop the run, naming the step."""
    try:
        (total,) = checks.read(value)
    except NonFiniteError as e:
        if e.tensor != "model_output":
            where = (
                f"d2f train: step {step + 1}, batch indices (into the data set) {_batch(step, stream, config, world)}"
            )
            raise NonFiniteError(f"{where}: {e.function}", e.tensor) from e
        total = math.nan
    return total


def _batch(step: int, stream: Stream, config, world: int) -> list[int]:
    per_step = config.batch_size * config.grad_accum * world
    return stream.indices(torch.arange(step * per_step, (step + 1) * per_step)).tolist()


def _check_weights(config, out: Path, step: int, trainable: dict, ema: dict) -> None:
    """Refuse to checkpoint or export weights holding NaN or inf: a finite loss is computed before the update,
    so an update that diverges (too high an lr) shows only here. Every rank checks its (identical) copy, so
    all stop together."""
    finite = torch.stack([torch.isfinite(v).all() for v in (*trainable.values(), *ema.values())])
    if not bool(finite.all()):
        names = [*trainable, *(f"ema.{n}" for n in ema)]
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        last = latest_checkpoint(out)
        raise FloatingPointError(
            f"the weights after step {step} hold NaN or inf ({bad[0]}"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + f") although the losses were finite: an update diverged (lr {config.resolved_lr:g}); nothing was "
            f"written for step {step}. Last good checkpoint: {last if last is not None else 'none'}; resume from it "
            "with a lower lr"
        )


def _train_locked(config: TrainConfig, resume: str | None, progress: bool, accelerator, started: float) -> dict:
    device, main = accelerator.device, accelerator.is_main_process
    out = Path(config.out)
    checkpoint = resume_point(out, resume)
    if checkpoint is not None:
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
    if main:
        _remove_interrupted(out)
    torch.manual_seed(config.seed)  # LoRA's A matrices and from-scratch weights
    network = _network(config)
    unet = network.unet.to(device)
    data = _data(config, network, out, accelerator, progress and main)
    widened = _widen(config, network, data)
    size = tuple(data.images.shape[-2:])  # images come at config.resolution, latents as stored
    source = f"resolution={config.resolution}" if size == (config.resolution,) * 2 else f"data={config.data!r}"
    check_sample_size(unet, size, source)
    conditioning = Conditioning.plan(config, network, data)
    if config.validation_prompts:
        pipeline_class(network)  # refused here, before anything is written
    metrics: dict[str, Any] = {"objective": config.objective, "pretrained": network.source}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.init and checkpoint is None:
            metrics.update(zero_shot_check(network, conditioning, data, config, out, device))

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
    trainable = trainable_parameters(unet)
    ema = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=config.resolved_lr, weight_decay=config.weight_decay)
    start, losses = 0, []
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, trainable, ema, optimizer)
        start, losses = state["step"], state["losses"]
    if main:  # only now: a broken checkpoint above must leave the run folder as it was
        write_json(out / "config.json", config.to_dict())
    validation = None
    if main and config.validation_prompts:
        validation = Validation(network, config, device)
    model, prepared_optimizer = accelerator.prepare(unet, optimizer)
    if config.report_to:  # only now: a refused run must leave no logs behind
        scalars = (bool, int, float, str)  # what a tracker's hyperparameter table takes
        flat = {k: v if isinstance(v, scalars) else str(v) for k, v in config.to_dict().items()}
        accelerator.init_trackers("d2f", config=flat)
    stream = Stream(len(data), config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index

    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=not (progress and main))
    bar.set_description(f"d2f train {config.objective}")
    train_started = time.perf_counter()
    for step in bar:
        for group in prepared_optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        value = torch.zeros((), device=device)
        with deferred_checks() as checks:  # the step's checks stay on the device until its loss is read
            for micro in range(config.grad_accum):
                sync = micro == config.grad_accum - 1
                with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                    where = positions(config, step, micro, rank, world)
                    loss = _micro_batch_loss(config, network, model, data, stream, conditioning, where, device)
                    accelerator.backward(loss / config.grad_accum)
                # The mean over all processes: every rank sees the same value (and stops together on a NaN).
                value = value + accelerator.reduce(loss.detach(), reduction="mean") / config.grad_accum
            total = _read_step(checks, value, step, stream, config, world)
        if not math.isfinite(total) and config.on_nonfinite == "stop":
            raise FloatingPointError(_nonfinite_report(config, out, step, stream, world, total))
        if math.isfinite(total):  # else --on-nonfinite skip: the step changes nothing
            if config.grad_clip:
                accelerator.clip_grad_norm_(list(trainable.values()), config.grad_clip)
            prepared_optimizer.step()
            decay = min(config.ema_decay, (step + 2) / (step + 11))
            with torch.no_grad():
                for n, p in trainable.items():
                    ema[n].lerp_(p.detach(), 1 - decay)
        prepared_optimizer.zero_grad(set_to_none=True)
        losses.append(total)
        bar.set_postfix(loss=f"{total:.4f}")
        if config.report_to:
            accelerator.log({"loss": total, "lr": config.lr_at(step)}, step=step + 1)
        if validation is not None and (step + 1) % config.validation_every == 0:
            unet.eval()
            png = out / "validation" / f"step-{step + 1:08d}.png"
            images = validation.save(png)
            unet.train()
            if config.report_to:
                tracker = accelerator.get_tracker(config.report_to)
                tracker.log_images({"validation": (images + 1) / 2}, step=step + 1, dataformats="NCHW")
        if config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            _check_weights(config, out, step + 1, trainable, ema)
            if main:
                save_checkpoint(out, step + 1, trainable, ema, optimizer, config.seed, config.to_dict(), losses)
    train_seconds = time.perf_counter() - train_started
    if start < config.max_steps and not any(math.isfinite(v) for v in losses[start:]):
        raise FloatingPointError(
            f"every step of this run ({start + 1} to {config.max_steps}) had a non-finite loss and was skipped "
            "(--on-nonfinite skip): the model did not train, so nothing is exported"
        )
    _check_weights(config, out, config.max_steps, trainable, ema)
    accelerator.wait_for_everyone()

    if main:
        with ema_weights(trainable, ema):
            unet.eval()
            if validation is not None:  # latents: the exported weights on the validation prompts, decoded
                validation.save(out / "samples.png")
                metrics["samples_png"] = "samples.png"
            elif data.images.shape[1] in SHOWN_CHANNELS:  # latents without a decoder are not sampled at all
                request = SampleRequest.make(conditioning, data, config.num_samples, size, device)
                t_min = config.t_min(network.prediction_type, network.schedule)
                field = velocity_field(network, config.objective, config.guidance, request, t_min)
                images = sample_images(field, config.objective, config.sample_steps, request, config.seed + 2, device)
                metrics["samples_png"] = save_images(images, out / "samples.png")
            write_export(
                out / "export",
                unet,
                network.schedule,
                run_meta(
                    config, network, conditioning.null_class, size[-1], data.concat, widened, data.labels is not None
                ),
            )
        save_loss_curve(losses, out / "loss.png", title=f"{config.objective} loss ({len(losses)} steps)")
        tail = [v for v in losses[-50:] if math.isfinite(v)]
        metrics.update(
            {
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
        )
        write_json(out / "metrics.json", metrics)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
