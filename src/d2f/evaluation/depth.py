"""The depth experiment in miniature: the paper's image-to-depth task (Marigold's recipe) on the embedded digits.

Task. The input is a 16 px digit; its "depth" is ``1 +`` the Euclidean distance (in pixels) from each pixel to
the nearest stroke pixel (value > 0), a smooth map with a ground truth nobody can argue with. Depth is stored as
an image the way ``d2f eval --task dense`` reads one: ``2 * depth / max_depth - 1``, so ``(x + 1) / 2`` is
depth up to scale, positive everywhere.

Runs. From the embedded teacher, its ``conv_in`` widened for the digit (``cond_init`` zero, and Marigold's for
d2f to pick the default), on 4500 digits; 500 held-out digits are scored. Objectives d2f, diffusion and naive FM,
LoRA 8 (conv_in trained fully) and full, at the study's tuned lr; and the reference every generative depth
method is compared with, the teacher finetuned as a plain regression network (the digit in, depth out, MSE, its
timestep fixed at the data end). Each generative model samples with ``d2f sample``'s default (``solver="auto"``,
the row of ``d2f.auto_sampler``'s table for its kind) at 1, 2, 4 and 10 network calls; scores are
AbsRel, RMSE and delta1 after scale-and-shift alignment (:mod:`d2f.evaluation.dense`), per training seed.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .._files import write_safetensors
from ..data.images import mnist
from ..figures import save_grid
from ..networks.sampling import SamplingSettings, sample_export
from ..networks.teachers import teacher_path
from ..training.config import TrainConfig
from ..training.loop import train
from .dense import depth_metrics, image_to_depth

DEPTH_NFE = (1, 2, 4, 10)
DEPTH_SEEDS = (0, 1, 2)
HELD_OUT = 500
# The settings study's lr picks (results/study.json, lr_selection): LoRA 8 took 1e-2 for all three objectives;
# full finetuning 1e-3 for d2f and diffusion (naive FM's full lr was not tuned: the same 1e-3).
LR = {"lora": 1e-2, "full": 1e-3}
ARMS = tuple(
    (objective, capacity, "zero") for objective in ("d2f", "diffusion", "fm") for capacity in ("lora", "full")
) + (("d2f", "lora", "marigold"), ("d2f", "full", "marigold"))


def distance_depth(images: torch.Tensor) -> torch.Tensor:
    """``1 +`` the distance from each pixel to the nearest pixel of ``images`` ``(N, 1, H, W)`` above 0 (every
    image needs one)."""
    n, _, h, w = images.shape
    coords = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).reshape(-1, 2).float()
    pairwise = torch.cdist(coords, coords)  # (HW, HW)
    stroke = images.reshape(n, -1) > 0
    if not bool(stroke.any(1).all()):
        raise ValueError("every image needs a pixel above 0 (a stroke) to measure distances from")
    out = []
    for chunk in stroke.split(500):
        far = torch.where(chunk[:, None, :], pairwise[None], torch.inf)  # (B, HW pixel, HW stroke)
        out.append(far.min(-1).values)
    return 1 + torch.cat(out).reshape(n, 1, h, w)


def depth_task(resolution: int = 16, held_out: int = HELD_OUT, seed: int = 0) -> dict[str, torch.Tensor]:
    """Digits and their depth images (``2 * depth / max_depth - 1``), split into train and held-out by a seeded
    permutation; ``depth_test`` is the held-out ground truth in pixels."""
    digits = mnist(resolution).images
    depth = distance_depth(digits)
    as_image = 2 * depth / depth.max() - 1
    order = torch.randperm(len(digits), generator=torch.Generator().manual_seed(seed))
    train_idx, test_idx = order[held_out:], order[:held_out]
    return {
        "digits_train": digits[train_idx],
        "depth_image_train": as_image[train_idx],
        "digits_test": digits[test_idx],
        "depth_test": depth[test_idx],
        "max_depth": depth.max(),
    }


def _regression(task: dict, steps: int, batch: int, seed: int) -> torch.nn.Module:
    """The teacher finetuned with MSE to map a digit to its depth image in one call (timestep 0, the data end;
    the null class)."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    unet = UNet2DModel.from_pretrained(teacher_path() / "unet")
    null = unet.config.num_class_embeds - 1
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR["full"])
    x, y = task["digits_train"], task["depth_image_train"]
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    for _ in range(steps):
        pick = torch.randint(len(x), (batch,), generator=generator)
        k, labels = torch.zeros(batch), torch.full((batch,), null)
        loss = torch.nn.functional.mse_loss(unet(x[pick], k, class_labels=labels).sample, y[pick])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    return unet


@torch.no_grad()
def _predict_regression(unet, digits: torch.Tensor) -> torch.Tensor:
    null = unet.config.num_class_embeds - 1
    k, labels = torch.zeros(len(digits)), torch.full((len(digits),), null)
    return unet(digits, k, class_labels=labels).sample


def depth(
    out: str = "runs/depth",
    steps: int = 300,
    batch_size: int = 32,
    seeds: tuple[int, ...] = DEPTH_SEEDS,
    nfe: tuple[int, ...] = DEPTH_NFE,
    held_out: int = HELD_OUT,
    figure_png: Path | None = None,
) -> dict:
    """The experiment; returns ``{"arms": {"<objective>/<capacity>/<cond_init>": {nfe: {metric: [per seed]}}},
    "regression": {metric: [per seed]}, ...}`` and draws inputs, ground truth and predictions to
    ``figure_png``."""
    started = time.perf_counter()
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    task = depth_task(held_out=held_out)
    data = folder / "train.safetensors"
    write_safetensors(data, {"latents": task["depth_image_train"], "concat": task["digits_train"]})
    gt, digits = task["depth_test"], task["digits_test"]
    arms: dict = {}
    shown = {}  # the first seed's predictions at 4 calls (or the most below), and the regression's: the figure
    shown_nfe = max(n for n in nfe if n <= 4) if min(nfe) <= 4 else min(nfe)
    seconds: dict[str, float] = {}
    for objective, capacity, init in ARMS:
        name = f"{objective}/{capacity}/{init}"
        arm_started = time.perf_counter()
        for seed in seeds:
            config = TrainConfig.teacher_task(
                out=str(folder / name.replace("/", "-") / f"seed{seed}"),
                data=str(data),
                resolution=16,
                objective=objective,
                lora_rank=8 if capacity == "lora" else 0,
                lr=LR[capacity],
                max_steps=steps,
                batch_size=batch_size,
                cond_init=init,
                seed=seed,
                checkpoint_every=0,
                num_samples=10,
                sample_steps=4,
            )
            train(config, progress=False)
            for n in nfe:
                samples = sample_export(
                    str(Path(config.out) / "export"), SamplingSettings(n, seed=seed), held_out, concat=digits
                )
                cell = arms.setdefault(name, {}).setdefault(str(n), {})
                for key, value in depth_metrics(image_to_depth(samples.images), gt).items():
                    cell.setdefault(key, []).append(value)
                if seed == seeds[0] and n == shown_nfe:
                    shown[f"{name} ({n} calls, seed {seed})"] = samples.images[:10]
        seconds[name] = round(time.perf_counter() - arm_started, 1)
    regression: dict = {}
    arm_started = time.perf_counter()
    for seed in seeds:
        unet = _regression(task, steps, batch_size, seed)
        prediction = _predict_regression(unet, digits)
        for key, value in depth_metrics(image_to_depth(prediction), gt).items():
            regression.setdefault(key, []).append(value)
        if seed == seeds[0]:
            shown[f"regression (1 call, seed {seed})"] = prediction[:10]
    seconds["regression"] = round(time.perf_counter() - arm_started, 1)
    if figure_png is not None:
        truth = 2 * gt[:10] / task["max_depth"] - 1
        save_grid(torch.cat([digits[:10], truth.float(), *(v.float() for v in shown.values())]), figure_png)
    return {
        "arms": arms,
        "regression": regression,
        "figure_rows": ["input", "ground truth", *shown],
        "nfe": list(nfe),
        "seeds": list(seeds),
        "held_out": held_out,
        "train": {"digits": 5000 - held_out, "steps": steps, "batch_size": batch_size, "lr": LR},
        "max_depth_px": float(task["max_depth"]),
        "sampler": "d2f sample's default, solver='auto' (d2f.auto_sampler), NFE = network calls",
        "seconds_by_arm": seconds,
        "seconds": round(time.perf_counter() - started, 1),
    }
