"""``train``: the thin loop. Objectives d2f, fm (naive flow matching) and diffusion on a diffusers UNet,
full or LoRA, from one CPU to many GPUs through accelerate."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .._extras import require
from ..loss import NonFiniteError, fm_loss
from ..path import interpolate, network_input
from ..time_samplers import sample_t
from ..velocity import D2FVelocity
from .checkpoint import checkpoint_root, latest_checkpoint, load_checkpoint, read_state, save_checkpoint
from .config import TrainConfig
from .data import Dataset, load_dataset
from .export import ddim_reference, write_export
from .images import save_grid, save_loss_curve
from .lock import run_lock
from .models import Network, add_lora, from_scratch, load_network, trainable_parameters
from .pairs import load_pairs
from .sampling import export_grid

# Settings that may change between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = {"out", "max_steps", "checkpoint_every", "sample_steps", "num_samples", "guidance", "on_nonfinite"}


def _seed(*parts: Any) -> int:
    """A seed from ints and strings that is the same in every process (Python's str hash is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


class Stream:
    """The data order: epoch ``e`` is ``randperm(N)`` seeded by ``(seed, e)``; position ``p`` of the global
    stream is sample ``perm_{p // N}[p % N]``. Every rank, step and micro-batch finds its samples from the
    step number alone, so resuming needs no sampler state."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        epochs, offsets = positions // self.size, positions % self.size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(_seed(self.seed, "epoch", epoch))
                self._perms = {epoch: torch.randperm(self.size, generator=g)}  # keep one epoch in memory
            mask = epochs == epoch
            out[mask] = self._perms[epoch][offsets[mask]]
        return out


@dataclass
class Conditioning:
    """What the network is conditioned on, and how conditioning dropout replaces it."""

    null_class: int | None  # class labels are fed when this is set
    text: bool  # encoder_hidden_states are fed

    @staticmethod
    def plan(config: TrainConfig, network: Network, data: Dataset) -> Conditioning:
        unet = network.unet
        num_classes = getattr(unet.config, "num_class_embeds", None)
        null_class = None
        if num_classes:
            if network.null_class is None:
                raise ValueError(
                    f"{network.source} takes class labels but names no null class; d2f trains class-conditional "
                    "UNets that reserve their last label as the null class (as the embedded teacher does)"
                )
            null_class = network.null_class
            if data.labels is not None and int(data.labels.max()) >= null_class:
                raise ValueError(
                    f"data={config.data!r} has labels up to {int(data.labels.max())}; the model takes labels "
                    f"< {null_class} (label {null_class} is its null class)"
                )
        text = type(unet).__name__ == "UNet2DConditionModel"
        if text and data.encoder_hidden_states is None:
            raise ValueError(f"{network.source} is a UNet2DConditionModel: the data must carry encoder_hidden_states")
        if text and config.cond_dropout > 0 and data.null_encoder_hidden_states is None:
            raise ValueError("cond_dropout > 0 needs null_encoder_hidden_states in the latents file")
        return Conditioning(null_class, text)

    def kwargs(self, data: Dataset, indices: torch.Tensor, drop: torch.Tensor, device) -> dict[str, torch.Tensor]:
        cond: dict[str, torch.Tensor] = {}
        if self.null_class is not None:
            if data.labels is None:
                labels = torch.full(indices.shape, self.null_class)  # unlabeled data: unconditional finetuning
            else:
                labels = torch.where(drop, self.null_class, data.labels[indices])
            cond["class_labels"] = labels.to(device)
        if self.text:
            states = data.encoder_hidden_states[indices].clone()
            if bool(drop.any()):
                states[drop] = data.null_encoder_hidden_states.to(states.dtype)
            cond["encoder_hidden_states"] = states.to(device)
        return cond


def _draws(config: TrainConfig, positions: torch.Tensor, shape: tuple[int, ...], loss_type: str, schedule):
    """Noise, t (or integer timestep k) and the dropout coin of each sample, from its position in the global
    stream alone: a data-parallel run draws exactly what one process with the whole batch would."""
    noise, times, drop = [], [], []
    for p in positions.tolist():
        g = torch.Generator().manual_seed(_seed(config.seed, "sample", p))
        noise.append(torch.randn(shape, generator=g))
        drop.append(bool(torch.rand((), generator=g) < config.cond_dropout))
        if config.objective == "diffusion":
            times.append(torch.randint(0, schedule.num_train_timesteps, (1,), generator=g))
        else:
            times.append(sample_t(config.resolved_t_sampler, 1, g, loss_type, schedule))
    return torch.stack(noise), torch.cat(times), torch.tensor(drop)


def _objective_loss(config, network, model, data, stream, conditioning, step, micro, rank, world, device):
    """One micro-batch's loss: ``batch_size`` samples of this rank at this step and micro-step."""
    bs = config.batch_size
    first = ((step * config.grad_accum + micro) * world + rank) * bs
    positions = torch.arange(first, first + bs)
    indices = stream.indices(positions)
    schedule, ptype = network.schedule, network.prediction_type
    loss_type = ptype if config.objective != "fm" else "velocity"
    noise, times, drop = _draws(config, positions, tuple(data.images.shape[1:]), loss_type, schedule)
    if data.noise is not None:  # reflow: each image keeps the noise it was sampled from
        noise = data.noise[indices]
    cond = conditioning.kwargs(data, indices, drop, device)
    clean, noise = data.images[indices].to(device), noise.to(device)
    concat = data.concat[indices].to(device) if data.concat is not None else None
    dtype = next(network.unet.parameters()).dtype

    def run(z: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        if concat is not None:
            z = torch.cat([z, concat.to(z.dtype)], dim=1)
        return model(z, k.to(device, torch.float32), **cond).sample

    if config.objective == "diffusion":
        ac = torch.from_numpy(schedule.alphas_cumprod[times.numpy()]).to(device, torch.float32).view(-1, 1, 1, 1)
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        target = {"epsilon": noise, "sample": clean, "v_prediction": alpha * noise - sigma * clean}[ptype]
        out = run((alpha * clean + sigma * noise).to(dtype), times)
        return torch.nn.functional.mse_loss(out.float(), target)
    t = times.to(device)
    if config.objective == "d2f":
        out = run(network_input(clean, noise, t, dtype=dtype), schedule.timestep(t))
    else:  # naive FM: unscaled interpolant, raw t as the timestep, output read as the velocity
        out = run(interpolate(clean, noise, t).to(dtype), t)
    return fm_loss(out, clean, noise, t, loss_type)


def _training_data(config: TrainConfig, channels: int) -> Dataset:
    if config.pairs is None:
        return load_dataset(config.data, config.resolution, channels, config.classes)
    data = load_pairs(config.pairs)
    shape = tuple(data.images.shape[1:])
    if shape != (channels, config.resolution, config.resolution):
        raise ValueError(
            f"pairs={config.pairs!r} holds samples of shape {shape}; the run needs ({channels}, "
            f"{config.resolution}, {config.resolution}): pass --resolution {shape[-1]} for pairs of this model"
        )
    return data


def _lr(config: TrainConfig, step: int) -> float:
    lr = config.resolved_lr
    return lr * min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else lr


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


def velocity_field(
    network: Network, objective: str, guidance: float, conditioning: Conditioning, concat: torch.Tensor | None = None
) -> D2FVelocity:
    uncond = None
    if guidance != 1:
        if conditioning.null_class is None:
            raise ValueError(f"guidance={guidance} needs a class-conditional model with a null class")
        uncond = {"class_labels": torch.tensor([conditioning.null_class])}
    return D2FVelocity(
        network.unet,
        network.schedule,
        "velocity" if objective == "fm" else network.prediction_type,
        guidance_scale=guidance,
        uncond=uncond,
        concat=concat,
        align_input=objective != "fm",
    )


@dataclass
class SampleRequest:
    """What to sample: ``n`` draws at ``size``, with conditions taken from the data (classes in turn, the
    first text embeddings and concat channels)."""

    n: int
    size: tuple[int, int]
    cond: dict[str, torch.Tensor]
    concat: torch.Tensor | None

    @staticmethod
    def make(conditioning: Conditioning, data: Dataset, n: int, size: tuple[int, int], device) -> SampleRequest:
        pick = torch.arange(n) % len(data)
        cond: dict[str, torch.Tensor] = {}
        if conditioning.null_class is not None:
            classes = data.labels.unique() if data.labels is not None else torch.tensor([conditioning.null_class])
            cond["class_labels"] = classes[torch.arange(n) % classes.numel()].to(device)
        if conditioning.text:
            cond["encoder_hidden_states"] = data.encoder_hidden_states[pick].to(device)
        concat = data.concat[pick].to(device) if data.concat is not None else None
        if concat is not None:
            size = tuple(concat.shape[-2:])
        return SampleRequest(n, size, cond, concat)


def _noise(request: SampleRequest, channels: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(request.n, channels, *request.size, generator=g).to(device)


def _save_images(images: torch.Tensor, path: Path) -> str | None:
    """Images (1 or 3 channels) become a PNG grid; latents cannot be shown without their decoder."""
    if images.shape[1] not in (1, 3):
        return None
    save_grid(images, path)
    return path.name


@torch.no_grad()
def _zero_shot(network, conditioning, data, config, out: Path, device) -> dict:
    """The converted teacher before any finetuning, at its own resolution: FM Euler on the DDIM grid, and
    the same steps of diffusers' DDIMScheduler for comparison (they agree to float rounding)."""
    unet = network.unet
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    request = SampleRequest.make(conditioning, data, min(config.num_samples, 40), size, device)
    field = velocity_field(network, "d2f", 1.0, conditioning, request.concat)
    noise = _noise(request, unet.config.out_channels, config.seed + 1, device)
    x = field.sample(noise, export_grid(field, "ddim", config.sample_steps), **request.cond)
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
        "zero_shot_png": _save_images(x, out / "zero_shot.png"),
        "zero_shot_max_abs_diff_vs_ddim": float((x - z).abs().max()),
    }


@torch.no_grad()
def sample_images(field: D2FVelocity, objective: str, steps: int, request: SampleRequest, seed: int, device):
    """FM Euler on a uniform grid for flow objectives (the study's best grid after finetuning), DDIM's own
    grid for diffusion finetuning (its natural sampler)."""
    ts = export_grid(field, "ddim" if objective == "diffusion" else "uniform", steps)
    return field.sample(_noise(request, field.net.config.out_channels, seed, device), ts, **request.cond)


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
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    out = Path(config.out)
    with run_lock(out) if accelerator.is_main_process else contextlib.nullcontext():
        return _train_locked(config, resume, progress, accelerator, started)


def _remove_leftovers(out: Path) -> None:
    """Temporary folders of a killed run (never read: checkpoints and exports are renamed into place)."""
    export = out / "export"
    for old in sorted(out.glob(".export.old-*")):  # killed between the two renames of write_export
        if not export.exists():
            old.rename(export)
            print(f"d2f train: restored {export} from {old.name} (an interrupted export)", file=sys.stderr)
    leftovers = [*checkpoint_root(out).glob(".tmp-step-*"), *out.glob(".export.tmp-*"), *out.glob(".export.old-*")]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)
    if leftovers:
        names = ", ".join(sorted(p.name for p in leftovers))
        print(
            f"d2f train: removed {len(leftovers)} half-written folder(s) left by an interrupted run: {names}",
            file=sys.stderr,
        )


def _nonfinite_report(config, out: Path, step: int, stream: Stream, world: int, total: float) -> str:
    per_step = config.batch_size * config.grad_accum * world
    indices = stream.indices(torch.arange(step * per_step, (step + 1) * per_step)).tolist()
    last = latest_checkpoint(out)
    return (
        f"non-finite loss {total} at step {step + 1}; batch indices (into the data set) {indices}; last good "
        f"checkpoint: {last if last is not None else 'none'}. Resume from it with a lower lr, or pass "
        "--on-nonfinite skip to skip such steps"
    )


def _train_locked(config: TrainConfig, resume: str | None, progress: bool, accelerator, started: float) -> dict:
    device, main = accelerator.device, accelerator.is_main_process
    out = Path(config.out)
    checkpoint = None
    if resume is not None:
        checkpoint = latest_checkpoint(out) if resume == "latest" else Path(resume)
        if checkpoint is None:
            raise ValueError(f"--resume: no complete checkpoint in {checkpoint_root(out)}")
        saved = TrainConfig.from_dict(read_state(checkpoint)["config"])
        changed = sorted(
            k for k, v in config.to_dict().items() if saved.to_dict()[k] != v and k not in RESUMABLE_CHANGES
        )
        if changed:
            raise ValueError(f"--resume: {checkpoint} was written with different {', '.join(changed)}")
    elif latest_checkpoint(out) is not None:
        raise ValueError(
            f"out={str(out)!r} holds checkpoints of an earlier run: pass --resume, or choose another --out"
        )

    if main:
        _remove_leftovers(out)
    torch.manual_seed(config.seed)  # LoRA's A matrices and from-scratch weights
    network = from_scratch(config.prediction_type or "v_prediction") if config.init else load_network(config.pretrained)
    if config.zero_terminal_snr:
        if network.prediction_type != "v_prediction":
            raise ValueError(
                f"zero_terminal_snr=True needs a v_prediction model: {network.source} predicts "
                f"{network.prediction_type!r}, which has no velocity at the pure-noise end of a zero-SNR schedule"
            )
        network = dataclasses.replace(network, schedule=network.schedule.with_zero_terminal_snr())
    unet = network.unet.to(device)
    data = _training_data(config, unet.config.in_channels)
    conditioning = Conditioning.plan(config, network, data)
    metrics: dict[str, Any] = {"objective": config.objective, "pretrained": network.source}
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not config.init and checkpoint is None:
            metrics.update(_zero_shot(network, conditioning, data, config, out, device))

    if config.lora_rank:
        add_lora(unet, config.lora_rank, config.lora_full_convs)
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
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1))
    model, prepared_optimizer = accelerator.prepare(unet, optimizer)
    stream = Stream(len(data), config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index

    bar = tqdm(range(start, config.max_steps), initial=start, total=config.max_steps, disable=not (progress and main))
    bar.set_description(f"d2f train {config.objective}")
    train_started = time.perf_counter()
    for step in bar:
        for group in prepared_optimizer.param_groups:
            group["lr"] = _lr(config, step)
        total = 0.0
        for micro in range(config.grad_accum):
            sync = micro == config.grad_accum - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model), accelerator.autocast():
                try:
                    loss = _objective_loss(
                        config, network, model, data, stream, conditioning, step, micro, rank, world, device
                    )
                    value = loss.detach()
                except NonFiniteError as e:
                    if e.tensor != "model_output":
                        raise
                    # The network diverged. A zero loss over every trainable weight still joins the other
                    # ranks' gradient all-reduce, and the NaN value below makes them all stop (or skip) together.
                    loss = sum((p * 0).sum() for p in trainable.values())
                    value = torch.tensor(math.nan, device=device)
                accelerator.backward(loss / config.grad_accum)
            # The mean over all processes: every rank sees the same value (and stops together on a NaN).
            total += float(accelerator.reduce(value, reduction="mean")) / config.grad_accum
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
        if main and config.checkpoint_every and (step + 1) % config.checkpoint_every == 0:
            save_checkpoint(out, step + 1, trainable, ema, optimizer, config.seed, config.to_dict(), losses)
    train_seconds = time.perf_counter() - train_started
    accelerator.wait_for_everyone()

    if main:
        with ema_weights(trainable, ema):
            unet.eval()
            size = tuple(data.images.shape[-2:])  # images are at config.resolution; latents as stored
            request = SampleRequest.make(conditioning, data, config.num_samples, size, device)
            field = velocity_field(network, config.objective, config.guidance, conditioning, request.concat)
            images = sample_images(field, config.objective, config.sample_steps, request, config.seed + 2, device)
            metrics["samples_png"] = _save_images(images, out / "samples.png")
            meta = {
                "kind": "lora" if config.lora_rank else "full",
                "objective": config.objective,
                "prediction_type": field.prediction_type,
                "align_input": field.align_input,
                "null_class": conditioning.null_class,
                "base": network.source if config.lora_rank else None,
                "lora_rank": config.lora_rank,
                "resolution": config.resolution,
                "train_config": config.to_dict(),
            }
            write_export(out / "export", unet, network.schedule, meta, lora=bool(config.lora_rank))
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
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics
