"""E4, terminal SNR: can a model sampled from pure noise reach images far from the data's mean brightness?

The teacher's schedule (SD's scaled-linear) ends at alphabar_999 = 0.0047: even its noisiest training input
keeps 7 % of the image, so it never learns to start from pure noise, and its DDIM sampler starts at
timestep 961 (25 leading steps), not at noise alone. Diff2Flow's FM time runs on to t = 0, pure noise,
and its d2f objective trains there too.

The data: the 5000 MNIST digits with every other digit (in a seeded order) inverted to black on white, so
per-image mean brightness is bimodal, about -0.74 and +0.74 on the [-1, 1] scale, with nothing near the mean
0. The teacher (trained on white-on-black digits only) is finetuned in full on it with the diffusion
objective, with d2f, and with the diffusion objective on its schedule rescaled to zero terminal SNR (Lin et
al.), at the same budget; each is sampled with its natural sampler (the zero-SNR model with DDIM's trailing
steps, which start at timestep 999, pure noise), and d2f also on the DDIM grid to separate the weights from
the sampler. Per method: the 1-D Wasserstein distance between the per-image mean brightness of samples and
data, the share of inverted samples (data: 0.5), and the share of grey images (|mean| < 0.3; data: none).

Why resolution matters: the image mean leaking through the last timestep is sqrt(alphabar_999) x 0.74 =
0.050, while the mean of r x r pixels of pure noise varies by 1/r between images. At 16 px (0.063) the leak
drowns in that noise; at 64 px (0.016) it does not, so a network trained on the leak can lean on it and the
flaw should show. E4 runs at 16 px on the embedded teacher, and at 32 and 64 px on teachers trained the same
way at those sizes (:mod:`d2f.networks.teachers`), shipped in ``d2f/assets/teacher32`` and ``teacher64``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .._files import write_safetensors
from ..data.images import mnist
from ..figures import save_line_plot
from ..networks.export import load
from ..networks.teachers import teacher_path
from .experiments import full_finetune

E4_ARMS = {  # the finetuning runs: name -> their settings
    "diffusion": {"objective": "diffusion"},
    "d2f": {"objective": "d2f"},
    "diffusion_zero_snr": {"objective": "diffusion", "zero_terminal_snr": True},
}
E4_METHODS = {  # name: (model, grid, DDIM spacing)
    "teacher_ddim": ("teacher", "ddim", "leading"),
    "diffusion_ddim": ("diffusion", "ddim", "leading"),
    "d2f_uniform": ("d2f", "uniform", "leading"),
    "d2f_ddim_grid": ("d2f", "ddim", "leading"),
    "zero_snr_ddim_trailing": ("diffusion_zero_snr", "ddim", "trailing"),
}
METRICS = ("wasserstein_to_data", "inverted_share", "grey_share", "mean")
GREY = 0.3
# Per resolution: finetuning steps and batch, samples per seed and method, DDIM steps, seeds (offsets from
# ``seed``). 16 px is the committed E4; 32 and 64 px are sized for about 25 and 50 minutes on one CPU core.
_SMALL = {"max_steps": 150, "batch_size": 32, "num_samples": 150, "sample_steps": 25, "seeds": 3}
E4_SETTINGS = {
    16: {"max_steps": 600, "batch_size": 64, "num_samples": 1000, "sample_steps": 25, "seeds": 1},
    32: _SMALL,
    64: _SMALL,
}
E4_RESOLUTIONS = tuple(E4_SETTINGS)
# "full": each size's own protocol; "small": the 32 and 64 px one at any size, so that 16 px can be set beside
# them at equal budget (the two are the same at 32 and 64 px).
E4_BUDGETS = ("full", "small")


def check_resolution(resolution: int) -> int:
    if resolution not in E4_SETTINGS:
        raise ValueError(f"resolution={resolution!r} is not allowed for E4: one of {E4_RESOLUTIONS}")
    return resolution


def e4_settings(resolution: int, budget: str = "full") -> dict:
    """E4's protocol at ``resolution`` px under ``budget`` (one of ``E4_BUDGETS``)."""
    check_resolution(resolution)
    if budget not in E4_BUDGETS:
        raise ValueError(f"budget={budget!r} is not allowed for E4: one of {E4_BUDGETS}")
    return dict(_SMALL if budget == "small" else E4_SETTINGS[resolution])


def e4_teacher(resolution: int) -> str:
    """The teacher E4 finetunes at ``resolution``: the embedded one at 16 px, and at 32 and 64 px the ones
    shipped beside it (``d2f.networks.teachers.teacher_path``; ``d2f teacher --resolution`` retrains them)."""
    return "teacher" if check_resolution(resolution) == 16 else str(teacher_path(resolution))


def half_inverted_digits(seed: int = 0, resolution: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist(resolution)
    images = data.images.clone()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    images[order[::2]] = -images[order[::2]]
    return images, data.labels


def wasserstein_1d(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two empirical 1-D distributions: the mean gap between their quantile functions."""
    q = (np.arange(2000) + 0.5) / 2000
    return float(np.abs(np.quantile(a, q) - np.quantile(b, q)).mean())


def brightness_report(brightness: np.ndarray, data_brightness: np.ndarray) -> dict:
    return {
        "wasserstein_to_data": wasserstein_1d(brightness, data_brightness),
        "inverted_share": float((brightness > 0).mean()),
        "grey_share": float((np.abs(brightness) < GREY).mean()),
        "mean": float(brightness.mean()),
    }


def _one_seed(out: Path, teacher: str, resolution: int, settings: dict, seed: int) -> tuple[dict, dict, dict]:
    """Finetune every arm on seed ``seed``'s data and sample every method; returns (per-method reports, their
    brightness arrays, timings)."""
    from ..training.loop import train

    images, labels = half_inverted_digits(seed, resolution)
    data_file = out / f"half_inverted_mnist{resolution}.safetensors"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(data_file, {"latents": images, "labels": labels})
    exports, timings = {"teacher": teacher}, {"train_seconds": {}, "sample_seconds": {}}
    for arm, arm_settings in E4_ARMS.items():
        config = full_finetune(
            str(out / arm),
            max_steps=settings["max_steps"],
            seed=seed,
            data=str(data_file),
            pretrained=teacher,
            resolution=resolution,
            batch_size=settings["batch_size"],
            sample_steps=settings["sample_steps"],
            **arm_settings,
        )
        timings["train_seconds"][arm] = train(config, progress=False)["seconds_train"]
        exports[arm] = str(Path(config.out) / "export")

    n, steps = settings["num_samples"], settings["sample_steps"]
    noise = torch.randn(n, 1, resolution, resolution, generator=torch.Generator().manual_seed(seed + 300))
    class_labels = torch.arange(n) % 10
    data_brightness = images.mean((1, 2, 3)).double().numpy()
    reports, brightness = {}, {"data": data_brightness}
    for name, (model, grid, spacing) in E4_METHODS.items():
        started = time.perf_counter()
        field = load(exports[model])
        ts = field.grid(grid, steps, spacing=spacing, steps_offset=int(spacing == "leading"))
        samples = field.sample(noise, ts, class_labels=class_labels)
        brightness[name] = samples.mean((1, 2, 3)).double().numpy()
        reports[name] = brightness_report(brightness[name], data_brightness)
        timings["sample_seconds"][name] = round(time.perf_counter() - started, 1)
    return reports, brightness, timings


def _histogram_figure(per_seed: list[dict], path: Path, resolution: int) -> None:
    """Share of images per brightness bin, the mean over seeds, with the seed range as a band."""
    edges = np.linspace(-1, 1, 41)
    centers = ((edges[:-1] + edges[1:]) / 2).tolist()
    series, bands = {}, {}
    for name in per_seed[0]:
        shares = np.stack([np.histogram(b[name], edges)[0] / len(b[name]) for b in per_seed])
        series[name] = (centers, shares.mean(0).tolist())
        if len(per_seed) > 1:
            bands[name] = (shares.min(0).tolist(), shares.max(0).tolist())
    title = f"E4 at {resolution}px: per-image mean brightness (share of images per bin"
    title += f", mean and range over {len(per_seed)} seeds)" if len(per_seed) > 1 else ")"
    save_line_plot(series, path, title, "mean brightness", bands=bands)


def terminal_snr(
    out: str = "runs/e4",
    max_steps: int | None = None,
    num_samples: int | None = None,
    sample_steps: int | None = None,
    seed: int = 0,
    plot_png: Path | None = None,
    resolution: int = 16,
    seeds: int | None = None,
    batch_size: int | None = None,
    budget: str = "full",
) -> dict:
    """E4 at ``resolution`` px (16, 32 or 64) on seeds ``seed, seed + 1, ...`` (``seeds`` of them); unset
    settings come from ``e4_settings(resolution, budget)``. Returns ``{"methods": {name: brightness report},
    "data": ..., ...}``: each report holds the mean over seeds, ``spread`` (``[min, max]`` per metric) and
    ``per_seed``."""
    started = time.perf_counter()
    given = {
        "max_steps": max_steps,
        "num_samples": num_samples,
        "sample_steps": sample_steps,
        "seeds": seeds,
        "batch_size": batch_size,
    }
    settings = {**e4_settings(resolution, budget), **{k: v for k, v in given.items() if v is not None}}
    teacher = e4_teacher(resolution)
    run_seeds = [seed + i for i in range(settings["seeds"])]
    per_seed, histograms, timings = [], [], []
    for run_seed in run_seeds:
        folder = Path(out) if len(run_seeds) == 1 else Path(out) / f"seed{run_seed}"
        reports, brightness, seconds = _one_seed(folder, teacher, resolution, settings, run_seed)
        per_seed.append(reports)
        histograms.append(brightness)
        timings.append(seconds)
    methods = {}
    for name in E4_METHODS:
        values = {m: [r[name][m] for r in per_seed] for m in METRICS}
        methods[name] = {
            **{m: float(np.mean(v)) for m, v in values.items()},
            "spread": {m: [min(v), max(v)] for m, v in values.items()},
            "per_seed": [r[name] for r in per_seed],
        }
    data_brightness = histograms[0]["data"]
    if plot_png is not None:
        _histogram_figure(histograms, plot_png, resolution)
    return {
        "methods": methods,
        "data": brightness_report(data_brightness, data_brightness),
        "data_set": f"5000 MNIST digits at {resolution}px, every other one (seeded order) inverted",
        "resolution": resolution,
        "budget": budget,
        "teacher": teacher if teacher == "teacher" else Path(teacher).name,
        "max_steps": settings["max_steps"],
        "batch_size": settings["batch_size"],
        "train_seconds": {arm: [t["train_seconds"][arm] for t in timings] for arm in E4_ARMS},
        "sample_seconds": {name: [t["sample_seconds"][name] for t in timings] for name in E4_METHODS},
        "sample_steps": settings["sample_steps"],
        "num_samples": settings["num_samples"],
        "seed": seed,
        "seeds": run_seeds,
        "grey_threshold": GREY,
        "seconds": round(time.perf_counter() - started, 1),
    }
