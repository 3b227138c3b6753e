"""The paper's experiments in miniature, E1 (zero-shot conversion) and E2 (finetuning); E3 and E4 are in
reflow.py and terminal_snr.py.

E1, zero-shot conversion:

E1 compares, at N = 10, 25 and 50 steps on the embedded teacher:

- ``teacher_ddim``: diffusers' DDIMScheduler with the teacher's own step rule;
- ``d2f_euler``: the converted teacher, FM Euler on the DDIM-equivalent grid (the math says: the same
  images as ``teacher_ddim``, up to float rounding);
- ``d2f_uniform``: the converted teacher, FM Euler on a uniform grid in t;
- ``naive_fm``: the teacher read as a naive FM model at initialisation (unscaled input, raw t as timestep,
  output taken as the velocity), Euler on a uniform grid: the paper's naive-FM baseline at iteration 0.

All four use the same noise and the same class labels (0..9 in turn), and all are scored by FID against
the 5000 real digits at the teacher's 16px (features of the evaluation classifier).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.images import mnist
from ..figures import save_grid
from ..networks.export import ddim_config, load
from ..networks.sampling import ddim_reference
from ..path import scale
from ..training.config import TrainConfig
from ..velocity import D2FVelocity
from .classifier import load_classifier
from .metrics import features, fid, score

E1_METHODS = ("teacher_ddim", "d2f_euler", "d2f_uniform", "naive_fm")


def _sample(method: str, teacher: D2FVelocity, noise: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
    if method == "teacher_ddim":
        return ddim_reference(
            teacher.net, teacher.schedule, teacher.prediction_type, noise, steps, {"class_labels": labels}
        )
    if method == "d2f_euler":
        rule = ddim_config(teacher.schedule, teacher.prediction_type)
        ts = teacher.grid(
            "ddim",
            steps,
            spacing=rule["timestep_spacing"],
            steps_offset=rule["steps_offset"],
            set_alpha_to_one=rule["set_alpha_to_one"],
        )
        return float(scale(float(ts.reshape(-1)[-1]))) * teacher.sample(noise, ts, class_labels=labels)
    naive = D2FVelocity(teacher.net, teacher.schedule, "velocity", align_input=False)
    field = teacher if method == "d2f_uniform" else naive
    ts = field.grid("uniform", steps)
    return field.sample(noise, ts, class_labels=labels)


def zero_shot(
    num_samples: int = 1000,
    steps: tuple[int, ...] = (10, 25, 50),
    seed: int = 0,
    batch: int = 500,
    grid_png: Path | None = None,
) -> dict:
    """E1. Returns ``{"steps": {"10": {method: {"fid", "class_accuracy"}}, ...}, ...}``.

    ``grid_png``: the first 10 samples of each method (rows in ``E1_METHODS`` order) at the middle step count.
    """
    started = time.perf_counter()
    teacher = load("teacher")
    classifier = load_classifier()
    real = features(classifier, mnist(16).images)
    noise = torch.randn(num_samples, 1, 16, 16, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(num_samples) % 10
    results: dict = {"steps": {}}
    for n in steps:
        row, samples = {}, {}
        for method in E1_METHODS:
            samples[method] = torch.cat(
                [
                    _sample(method, teacher, noise[i : i + batch], labels[i : i + batch], n)
                    for i in range(0, num_samples, batch)
                ]
            )
            row[method] = score(classifier, real, samples[method], labels)
        row["max_abs_diff_d2f_euler_vs_teacher_ddim"] = float(
            (samples["d2f_euler"] - samples["teacher_ddim"]).abs().max()
        )
        if grid_png is not None and n == steps[len(steps) // 2]:
            save_grid(torch.cat([samples[m][:10] for m in E1_METHODS]), grid_png)
        results["steps"][str(n)] = row
    results.update(
        {
            "num_samples": num_samples,
            "seed": seed,
            "reference": "FID in the evaluation classifier's features against the 5000 real digits at 16px",
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return results


def committed_run(out: str, objective: str, **settings) -> TrainConfig:
    """A training run of E2-E4 with the settings their committed results were made with: lr 1e-3 and, for the
    flow objectives, uniform t (``d2f train``'s defaults then)."""
    t_sampler = None if objective == "diffusion" else "uniform"
    return TrainConfig.teacher_task(out=out, objective=objective, t_sampler=t_sampler, lr=1e-3, **settings)


def full_finetune(out: str, objective: str, max_steps: int, seed: int, **settings) -> TrainConfig:
    """E3's and E4's runs: a teacher (unless ``settings`` say otherwise, the 16 px one at batch 64) finetuned in
    full, no checkpoints, 20 samples at the end."""
    defaults = {"resolution": 16, "batch_size": 64, "lora_rank": 0, "checkpoint_every": 0, "num_samples": 20}
    return committed_run(out, objective, max_steps=max_steps, seed=seed, **{**defaults, **settings})


# E2: finetuning on the default task (the 16x16 teacher adapted to 24x24 digits), the three objectives.
E2_OBJECTIVES = ("d2f", "fm", "diffusion")


def finetune_run(out: str, kind: str, objective: str, seed: int, max_steps: int = 600, every: int = 150) -> TrainConfig:
    """One run of E2: ``kind`` lora (rank 8) or full, checkpoints every ``every`` steps, in ``out``."""
    return committed_run(
        f"{out}/{kind}-{objective}-seed{seed}",
        objective,
        lora_rank=8 if kind == "lora" else 0,
        max_steps=max_steps,
        checkpoint_every=every,
        seed=seed,
        num_samples=10,
        sample_steps=10,
    )


def _checkpoint_field(config, step: int):
    """The EMA weights of ``config``'s run at ``step`` (step 0: the model before finetuning), as a velocity field."""
    from safetensors.torch import load_file

    from ..networks.export import load_network
    from ..networks.models import add_lora, trainable_parameters
    from ..training.outputs import velocity_field

    network = load_network(config.pretrained)
    if config.lora_rank:
        add_lora(network, config.lora_rank, config.lora_full_convs)
    else:
        network.unet.requires_grad_(True)
    if step:
        ema = load_file(str(Path(config.out) / "checkpoints" / f"step-{step:08d}" / "ema.safetensors"))
        with torch.no_grad():
            for name, p in trainable_parameters(network.unet).items():
                p.copy_(ema[name])
    network.unet.eval().requires_grad_(False)
    return velocity_field(network, config.objective, t_min=config.t_min(network.prediction_type, network.schedule))


def finetune(
    out: str = "runs/e2",
    max_steps: int = 600,
    every: int = 150,
    lora_seeds: tuple[int, ...] = (0, 1),
    full_seeds: tuple[int, ...] = (0,),
    num_samples: int = 300,
    sample_steps: int = 10,
    seed: int = 0,
) -> dict:
    """E2. Trains every objective with LoRA (each seed) and in full, scores the EMA at every checkpoint.

    Samplers at ``sample_steps``: FM Euler on a uniform grid for d2f and fm, DDIM for diffusion (FM Euler
    on its DDIM grid, which is DDIM), and d2f on the DDIM grid too (``d2f_ddim_grid``).
    """
    from ..training.loop import train

    started = time.perf_counter()
    classifier = load_classifier()
    data = mnist(24)
    real = features(classifier, data.images)
    noise = torch.randn(num_samples, 1, 24, 24, generator=torch.Generator().manual_seed(seed + 100))
    labels = torch.arange(num_samples) % 10
    steps = list(range(0, max_steps + 1, every))
    results: dict = {"steps": steps}
    for kind, seeds in (("lora", lora_seeds), ("full", full_seeds)):
        results[kind] = {}
        for objective in E2_OBJECTIVES:
            entry: dict = {"fid": [], "class_accuracy": []}
            if objective == "d2f":
                entry["fid_ddim_grid"] = []
            for run_seed in seeds:
                config = finetune_run(out, kind, objective, run_seed, max_steps, every)
                train(config, progress=False)
                fids, accs, ddim_fids = [], [], []
                for step in steps:
                    field = _checkpoint_field(config, step)
                    natural = "ddim" if objective == "diffusion" else "uniform"
                    grid = field.grid(natural, sample_steps)
                    images = field.sample(noise, grid, class_labels=labels)
                    cell = score(classifier, real, images, labels)
                    fids.append(cell["fid"])
                    accs.append(cell["class_accuracy"])
                    if objective == "d2f":
                        grid = field.grid("ddim", sample_steps)
                        ddim_fids.append(
                            fid(real, features(classifier, field.sample(noise, grid, class_labels=labels)))
                        )
                entry["fid"].append(fids)
                entry["class_accuracy"].append(accs)
                if objective == "d2f":
                    entry["fid_ddim_grid"].append(ddim_fids)
            entry["seeds"] = list(seeds)
            results[kind][objective] = entry
    results.update(
        {
            "task": "the 16x16 MNIST teacher finetuned to 24x24 digits (d2f train's default task)",
            "num_samples": num_samples,
            "sample_steps": sample_steps,
            "reference": "FID in the evaluation classifier's features against the 5000 real digits at 24px",
            "seconds": round(time.perf_counter() - started, 1),
        }
    )
    return results
