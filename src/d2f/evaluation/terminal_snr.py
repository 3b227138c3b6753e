"""E4, terminal SNR: can a model sampled from pure noise reach images far from the data's mean brightness?

The teacher's schedule (SD's scaled-linear) ends at alphabar_999 = 0.0047: even its noisiest training input
keeps 7 % of the image, so it never learns to start from pure noise, and its DDIM sampler starts at
timestep 961 (25 leading steps), not at noise alone. Diff2Flow's FM time runs on to t = 0, pure noise,
and its d2f objective trains there too.

The data: the 5000 MNIST digits at 16 px with every other digit (in a seeded order) inverted to black on
white, so per-image mean brightness is bimodal, about -0.74 and +0.74 on the [-1, 1] scale, with nothing
near the mean 0. The teacher (trained on white-on-black digits only) is finetuned in full on it with the
diffusion objective and with d2f, at the same budget; each is sampled with its natural sampler, and d2f
also on the DDIM grid to separate the weights from the sampler. Per method: the 1-D Wasserstein distance
between the per-image mean brightness of samples and data, the share of inverted samples (data: 0.5), and
the share of grey images (|mean| < 0.3; data: none).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from .._files import write_safetensors
from ..grids import sampling_grid
from ..training.data import mnist
from ..training.export import load
from ..training.images import save_line_plot
from .experiments import full_finetune_16px

E4_METHODS = {  # name: (model, grid)
    "teacher_ddim": ("teacher", "ddim"),
    "diffusion_ddim": ("diffusion", "ddim"),
    "d2f_uniform": ("d2f", "uniform"),
    "d2f_ddim_grid": ("d2f", "ddim"),
}
GREY = 0.3


def half_inverted_digits(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    data = mnist(16)
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


def terminal_snr(
    out: str = "runs/e4",
    max_steps: int = 600,
    num_samples: int = 1000,
    sample_steps: int = 25,
    seed: int = 0,
    plot_png: Path | None = None,
) -> dict:
    """E4. Returns ``{"methods": {name: brightness report}, "data": ..., ...}``."""
    from ..training.loop import train

    started = time.perf_counter()
    images, labels = half_inverted_digits(seed)
    data_file = Path(out) / "half_inverted_mnist16.safetensors"
    data_file.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(data_file, {"latents": images, "labels": labels})
    exports, train_seconds = {"teacher": "teacher"}, {}
    for objective in ("diffusion", "d2f"):
        config = full_finetune_16px(
            str(Path(out) / objective), objective, max_steps, seed, data=str(data_file), sample_steps=sample_steps
        )
        train_seconds[objective] = train(config, progress=False)["seconds_train"]
        exports[objective] = str(Path(config.out) / "export")

    noise = torch.randn(num_samples, 1, 16, 16, generator=torch.Generator().manual_seed(seed + 300))
    class_labels = torch.arange(num_samples) % 10
    data_brightness = images.mean((1, 2, 3)).double().numpy()
    results: dict = {"methods": {}, "data": brightness_report(data_brightness, data_brightness)}
    histograms = {"data": data_brightness}
    for name, (model, grid) in E4_METHODS.items():
        field = load(exports[model])
        ts = sampling_grid(grid, sample_steps, field.schedule, field.prediction_type)
        samples = field.sample(noise, ts, class_labels=class_labels)
        brightness = samples.mean((1, 2, 3)).double().numpy()
        results["methods"][name] = brightness_report(brightness, data_brightness)
        histograms[name] = brightness
    if plot_png is not None:
        edges = np.linspace(-1, 1, 41)
        centers = (edges[:-1] + edges[1:]) / 2
        series = {
            name: (centers.tolist(), (np.histogram(b, edges)[0] / len(b)).tolist()) for name, b in histograms.items()
        }
        save_line_plot(series, plot_png, "E4: per-image mean brightness (share of images per bin)", "mean brightness")
    results.update(
        {
            "data_set": "5000 MNIST digits at 16px, every other one (seeded order) inverted",
            "max_steps": max_steps,
            "train_seconds": train_seconds,
            "sample_steps": sample_steps,
            "num_samples": num_samples,
            "seed": seed,
            "grey_threshold": GREY,
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return results
