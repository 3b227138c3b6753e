"""Sampling exports: the sampling settings, diffusers' own scheduler loops (the DDIM baseline), and
``sample_export`` behind ``d2f sample``, ``d2f eval`` and ``d2f pairs``."""

from __future__ import annotations

import inspect
import numbers
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._backend import device_or_default
from .._checks import check_choice, check_positive_int
from .._files import output_path
from ..auto_sampler import AUTO, auto_sampler
from ..figures import image_format, save_grid
from ..grids import GRIDS
from ..schedule import Schedule
from ..solvers import SOLVERS
from ..velocity import D2FVelocity
from .export import ddim_config, flow_finetuned, load, model_folder, read_model
from .models import check_sample_size


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample: ``steps`` of ``solver`` on the grid ``grid`` (``shift`` for the shift grid), with
    classifier-free ``guidance`` (1 = none), from the noise of ``torch.Generator().manual_seed(seed)``.

    ``solver="auto"`` (the default) takes ``steps`` as network calls and picks the sampler that E5 measured
    best for that many calls and this kind of model (``d2f.auto_sampler``); a ``grid`` named with it is kept.
    ``grid="auto"`` is the table's grid with ``solver="auto"``, else ``uniform``. :meth:`resolve` names both.
    ``device``: where the network runs (unset: CUDA when available). The noise is drawn on the CPU, so a seed
    starts from the same noise on any device; the images differ between devices by float rounding only.
    """

    steps: int = 25
    solver: str = AUTO
    grid: str = AUTO
    shift: float = 3.0
    guidance: float = 1.0
    seed: int = 0
    device: str | None = None

    def __post_init__(self) -> None:
        check_positive_int("steps", self.steps)
        seed = self.seed
        # torch.Generator.manual_seed's range; beyond it torch's error names no argument.
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not -(2**63) <= seed < 2**64:
            raise ValueError(f"seed={self.seed!r} must be an integer torch can seed with, in [-2**63, 2**64)")
        if not (self.device is None or isinstance(self.device, str)):
            raise ValueError(f"device={self.device!r} must be a device name such as 'cuda:1', or None")
        device_or_default(self.device)
        check_choice("solver", self.solver, (*SOLVERS, AUTO))
        check_choice("grid", self.grid, (*GRIDS, AUTO))

    def resolve(self, flow_finetuned: bool) -> SamplingSettings:
        """These settings with ``auto`` replaced, for a model finetuned as a flow or not (``export.flow_finetuned``)."""
        if self.solver != AUTO:
            return replace(self, grid="uniform" if self.grid == AUTO else self.grid)
        solver, grid, steps = auto_sampler(self.steps, flow_finetuned)
        return replace(self, solver=solver, grid=grid if self.grid == AUTO else self.grid, steps=steps)

    def grid_for(self, field: D2FVelocity) -> torch.Tensor:
        if AUTO in (self.solver, self.grid):
            raise ValueError(f"solver={self.solver!r}, grid={self.grid!r}: resolve() the settings for the model first")
        return field.grid(self.grid, self.steps, self.shift)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def ddim_reference(
    unet: torch.nn.Module,
    schedule: Schedule,
    prediction_type: str,
    noise: torch.Tensor,
    steps: int,
    cond: dict[str, torch.Tensor],
    concat: torch.Tensor | None = None,
    **rule: Any,
) -> torch.Tensor:
    """diffusers' own DDIMScheduler loop on ``schedule`` (``rule`` overrides the step rule of ``ddim_config``),
    the baseline that converted sampling is checked against."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config({**ddim_config(schedule, prediction_type), **rule})
    return scheduler_loop(unet, scheduler, noise, steps, cond, concat)


@torch.no_grad()
def scheduler_loop(
    unet: torch.nn.Module,
    scheduler,
    noise: torch.Tensor,
    steps: int,
    cond: dict[str, torch.Tensor],
    concat: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The sampling loop of diffusers' pipelines with any of its schedulers, ``steps`` as ``set_timesteps``
    takes them: the noise times ``init_noise_sigma``, then per timestep ``scale_model_input``, the network and
    ``step`` (with ``generator`` where it takes one, as pipelines pass it). Returns the final latent."""
    scheduler.set_timesteps(steps)
    z = noise * scheduler.init_noise_sigma
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    extra = {"generator": generator} if generator is not None and takes_generator else {}
    for k in scheduler.timesteps:
        z_in = scheduler.scale_model_input(z, k)
        z_in = z_in if concat is None else torch.cat([z_in, concat.to(z.dtype)], dim=1)
        k_in = k.to(noise.device, torch.float32).expand(noise.shape[0])  # a float tensor: never truncated
        z = scheduler.step(unet(z_in, k_in, **cond).sample, k, z, **extra).prev_sample
    return z


def load_for(model: str, settings: SamplingSettings, concat: torch.Tensor | None = None) -> D2FVelocity:
    """The export ``model`` loaded to sample with ``settings`` (their guidance, on their device), taking
    conditions shaped like ``concat`` when it was trained with them."""
    device = device_or_default(settings.device)
    return load(model, settings.guidance, device, concat=None if concat is None else concat[:1])


class ExportSamples(NamedTuple):
    images: torch.Tensor
    labels: torch.Tensor | None  # None for an unconditional export
    noise: torch.Tensor  # what the images started from
    meta: dict  # the export's metadata
    settings: SamplingSettings  # as resolved for the export (no "auto") and run (the device it ran on)


def export_labels(meta: dict, n: int) -> torch.Tensor | None:
    """The class labels ``n`` samples of an export get: none for an unconditional model; the classes in turn
    for one trained on labeled data; the null class for a class-conditional model trained on unlabeled data
    (image-to-X runs), as its training fed it (``Conditioning.kwargs``). Exports written before ``labeled``
    was recorded were all trained on labels."""
    if meta["null_class"] is None:
        return None
    if not meta.get("labeled", True):
        return torch.full((n,), meta["null_class"])
    return torch.arange(n) % meta["null_class"]


def text_unet_error(model: str, meta: dict) -> ValueError:
    """The error for an export of a text-conditioned UNet (a Stable Diffusion pipeline's), which ``d2f sample``,
    ``eval`` and ``pairs`` cannot give text embeddings: how to sample it instead (the README's recipe)."""
    pipeline = meta.get("pipeline") or "<its diffusers pipeline class>"
    what = f"model={model!r} is an export of a {pipeline}'s UNet2DConditionModel, which takes text embeddings"
    if meta.get("cond_channels"):
        return ValueError(
            f"{what} and conditions; d2f sample, eval and pairs give no text embeddings: d2f eval --task dense "
            "samples it (with the empty prompt, its conditions through the pipeline's VAE)"
        )
    base = str(base_folder(meta))
    if (Path(model) / "pytorch_lora_weights.safetensors").is_file():
        loading = f"pipe = {pipeline}.from_pretrained({base!r}); pipe.load_lora_weights({model!r})"
    else:
        loading = f"pipe = {pipeline}.from_pretrained({base!r}, unet=d2f.load({model!r}).net)"
    return ValueError(
        f"{what}; d2f sample, eval and pairs give none: sample it through the pipeline with D2FScheduler (see the "
        f"README): {loading}; pipe.scheduler = D2FScheduler.from_pretrained({model!r}, subfolder='scheduler')"
    )


def base_folder(meta: dict) -> Path:
    """The folder of the model an export of a pipeline's UNet was trained from: a LoRA's base, a full run's
    ``pretrained`` (a shipped name resolved)."""
    return model_folder(meta["base"] if meta["kind"] == "lora" else meta["train_config"]["pretrained"])


def export_pipeline(model: str | os.PathLike, solver: str = "auto", device: str | torch.device | None = None):
    """An export of a text-to-image pipeline's UNet loaded as a user loads it (the recipe of
    :func:`text_unet_error`): the base pipeline offline from its folder without a safety checker, the LoRA through
    ``pipe.load_lora_weights`` (a full export: its ``unet/`` in place of the base's), and ``D2FScheduler`` from the
    export's ``scheduler/`` with ``solver``; progress bars off."""
    import diffusers

    from ..scheduler import D2FScheduler
    from .models import load_unet

    meta = read_model(model).meta
    pipeline = meta.get("pipeline")
    if pipeline is None or meta.get("cond_channels"):
        raise ValueError(f"model={str(model)!r} is not an export of a text-to-image pipeline's UNet")
    cls = getattr(diffusers, pipeline)
    base = base_folder(meta)
    parts = {"unet": load_unet(Path(model) / "unet")} if meta["kind"] == "full" else {}
    if "safety_checker" in inspect.signature(cls.__init__).parameters:
        parts["safety_checker"] = None
    pipe = cls.from_pretrained(base, local_files_only=True, use_safetensors=True, **parts)
    if meta["kind"] == "lora":
        pipe.load_lora_weights(str(model))
    pipe.scheduler = D2FScheduler.from_pretrained(str(model), subfolder="scheduler", solver=solver)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device_or_default(device))


def check_inputs(field: D2FVelocity, model: str, meta: dict, shared: dict | None) -> None:
    """Refuse a network that needs text embeddings ``shared`` does not give, before it is called."""
    takes_text = "encoder_hidden_states" in inspect.signature(field.net.forward).parameters
    if takes_text and "encoder_hidden_states" not in (shared or {}):
        raise text_unet_error(model, meta)


def check_memory(num_samples: int, channels: int, size: tuple[int, int], source: str) -> None:
    """Refuse samples whose noise and results (float32, on the CPU) alone exceed this machine's memory, where
    torch would fail drawing them with an allocator error that names no argument; ``source`` names what set
    their size."""
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):  # no sysconf (Windows): torch's own error, if any, stands
        return
    need = 2 * 4 * num_samples * channels * size[0] * size[1]
    if need > total:
        raise ValueError(
            f"num_samples={num_samples} at {source} ({size[0]}x{size[1]}): their noise and samples alone need "
            f"{need / 2**30:.1f} GiB, more than this machine's {total / 2**30:.1f} GiB"
        )


def sample_export(
    model: str,
    settings: SamplingSettings,
    num_samples: int = 40,
    resolution: int | None = None,
    batch_size: int = 250,
    progress: bool = False,
    concat: torch.Tensor | None = None,
    shared: dict[str, torch.Tensor] | None = None,
    loaded: D2FVelocity | None = None,
) -> ExportSamples:
    """``num_samples`` images from an export (classes in turn when class-conditional), in batches, at
    ``resolution`` (default: the export's training resolution), with ``settings`` resolved for the export.
    An export trained with conditions takes one per sample in ``concat`` (``(num_samples, C, H, W)``, the
    resolution then being theirs). ``shared``: network kwargs of batch 1 given to every sample (a text UNet's
    ``encoder_hidden_states``). ``loaded``: ``model`` as :func:`load_for` loads it, for a caller that samples
    it several times (an ensemble); else it is loaded here."""
    check_positive_int("num_samples", num_samples)
    if resolution is not None:
        check_positive_int("resolution", resolution)
    meta = read_model(model).meta
    cond_channels = meta.get("cond_channels", 0)
    if concat is not None and (concat.ndim != 4 or concat.shape[:2] != (num_samples, cond_channels)):
        raise ValueError(
            f"concat has shape {tuple(concat.shape)}; it needs one condition per sample, {num_samples}, of the "
            f"{cond_channels} channel(s) {model} was trained with"
        )
    device = device_or_default(settings.device)
    field = loaded or load_for(model, settings, concat)
    check_inputs(field, model, meta, shared)
    settings = settings.resolve(flow_finetuned(meta))
    ts = settings.grid_for(field)
    resolution = resolution or meta["resolution"]
    size = (resolution, resolution) if concat is None else tuple(concat.shape[-2:])
    source = f"resolution={resolution}" if concat is None else "concat"
    check_sample_size(field.net, size, source)
    channels = field.net.config.out_channels
    check_memory(num_samples, channels, size, source)
    generator = torch.Generator().manual_seed(settings.seed)
    noise = torch.randn(num_samples, channels, *size, generator=generator)
    labels = export_labels(meta, num_samples)
    images = []
    for start in range(0, num_samples, batch_size):
        batch = noise[start : start + batch_size].to(device)
        cond = {} if labels is None else {"class_labels": labels[start : start + batch_size].to(device)}
        cond |= {key: value.to(device).expand(len(batch), *value.shape[1:]) for key, value in (shared or {}).items()}
        if concat is not None:
            field.concat = concat[start : start + batch_size].to(device)
        images.append(field.sample(batch, ts, solver=settings.solver, progress=progress, **cond).cpu())
    return ExportSamples(torch.cat(images), labels, noise, meta, replace(settings, device=str(device)))


def write_sample_grid(
    model: str,
    settings: SamplingSettings,
    num_samples: int,
    resolution: int | None,
    out: Path,
    lora: str | None,
    concat: torch.Tensor | None = None,
) -> None:
    """``d2f sample``: a PNG grid of ``num_samples`` samples of ``model``, or of the LoRA export ``lora``
    trained on the base ``model``. An export trained with conditions samples one per condition in ``concat``
    (``data.datasets.sample_conditions`` reads them); the grid then shows each condition above its sample, ten
    to a row."""
    image_format(out)
    out = output_path(out)
    if lora is not None:
        meta = read_model(lora, "lora").meta
        if meta["kind"] != "lora":
            raise ValueError(f"lora={lora!r} is a {meta['kind']} export, not a LoRA: sample it as --model")
        base = meta["base"]
        if base != model and base != str(Path(model).resolve()):
            raise ValueError(f"--lora {lora} was trained on base {base!r}, not --model {model!r}")
    if concat is not None:
        num_samples = len(concat)
    images = sample_export(lora or model, settings, num_samples, resolution, progress=True, concat=concat).images
    if concat is not None and concat.shape[1] == images.shape[1]:
        pad = -torch.ones(-num_samples % 10, *images.shape[1:])  # black cells keep each condition above its sample
        conditions, images = torch.cat([concat, pad]), torch.cat([images, pad])
        images = torch.cat([torch.cat([conditions[i : i + 10], images[i : i + 10]]) for i in range(0, len(images), 10)])
    save_grid(images, out)
