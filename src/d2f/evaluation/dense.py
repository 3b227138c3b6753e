"""Affine-invariant depth metrics, as monocular depth estimators (MiDaS, Marigold) are scored.

A generative or relative depth model predicts depth up to an unknown scale and shift, so each prediction
``p`` is first aligned to its ground truth ``g`` by least squares over the valid pixels ``V`` (``g > 0``):

    (s, b) = argmin_{s, b} sum_{i in V} (s * p_i + b - g_i)^2,

the 2x2 normal equations ``[[sum p^2, sum p], [sum p, |V|]] [s, b] = [sum p g, sum g]``. The aligned
``p' = s * p + b`` is clamped to at least ``min_depth`` (a negative depth has no ratio to score; Marigold
clips to the data set's depth range the same way). Per image, over ``V``:

- ``abs_rel = mean(|p' - g| / g)``;
- ``rmse = sqrt(mean((p' - g)^2))``;
- ``delta1`` = the share of pixels with ``max(p' / g, g / p') < 1.25``;

and each metric is the mean over images. A depth map stored as an image in [-1, 1] is read as depth up to
scale, ``(x + 1) / 2`` averaged over its channels (a VAE's three, as Marigold averages them back): black is 0,
no depth. :func:`ensemble` is Marigold's test-time ensembling in a simple
form: the per-pixel median of several samples, each first aligned to their plain median (Marigold optimises
the members' scales and shifts jointly; the ground truth is not used either way).
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch import Tensor

DELTA1 = 1.25


def align_scale_shift(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> Tensor:
    """Each image of ``pred`` ``(N, ...)`` scaled and shifted onto ``gt`` by least squares over ``valid``
    (default ``gt > 0``), in float64."""
    if pred.shape != gt.shape:
        raise ValueError(f"pred has shape {tuple(pred.shape)} and gt {tuple(gt.shape)}; they must match")
    p, g = pred.double().flatten(1), gt.double().flatten(1)
    m = (g > 0 if valid is None else valid.flatten(1)).double()
    n, sp, sg = m.sum(1), (m * p).sum(1), (m * g).sum(1)
    spp, spg = (m * p * p).sum(1), (m * p * g).sum(1)
    det = spp * n - sp * sp
    if bool((det <= 0).any()):
        bad = int((det <= 0).nonzero()[0])
        raise ValueError(
            f"image {bad}: its prediction is constant over the valid pixels (or it has fewer than 2), so no scale "
            "and shift align it"
        )
    s = (spg * n - sp * sg) / det
    b = (spp * sg - sp * spg) / det
    return (s[:, None] * p + b[:, None]).reshape(pred.shape)


def check_targets(gt: Tensor, name: str = "gt image") -> None:
    """Refuse ground truth no prediction can be scored against, naming the image (``name`` and its index): fewer
    than 2 valid pixels (depth > 0; black is 0) leave the scale and shift undetermined, and a constant depth is
    matched exactly by any prediction that is not constant, so it would score perfectly."""
    g = gt.double().flatten(1)
    valid = g > 0
    count = valid.sum(1)
    low = torch.where(valid, g, math.inf).amin(1)
    high = torch.where(valid, g, -math.inf).amax(1)
    bad = ((count < 2) | (low == high)).nonzero()
    if len(bad):
        i = int(bad[0])
        what = {0: "no depth > 0 at any pixel (black everywhere)", 1: "depth > 0 at 1 pixel only"}.get(
            int(count[i]), f"the same depth, {float(high[i]):.4g}, at every pixel of depth > 0"
        )
        raise ValueError(
            f"{name} {i}: {what}; scale-and-shift alignment needs 2 or more pixels of different depth to score it"
        )


def depth_metrics(pred: Tensor, gt: Tensor, min_depth: float = 1e-3) -> dict[str, float]:
    """AbsRel, RMSE and delta1 of ``pred`` against ``gt`` (``(N, ...)``, depth > 0 where valid) after the
    scale-and-shift alignment, each the mean over the N images."""
    if not bool(torch.isfinite(pred).all()):
        raise ValueError("pred holds NaN or inf; no depth metric is computed from it")
    check_targets(gt)
    valid = gt > 0
    p = align_scale_shift(pred, gt, valid).clamp_min(min_depth).flatten(1)
    g, m = gt.double().flatten(1), valid.flatten(1).double()
    count = m.sum(1)
    abs_rel = (m * (p - g).abs() / g.clamp_min(min_depth)).sum(1) / count
    rmse = ((m * (p - g) ** 2).sum(1) / count).sqrt()
    ratio = torch.maximum(p / g.clamp_min(min_depth), g / p)
    delta1 = (m * (ratio < DELTA1)).sum(1) / count
    return {"abs_rel": float(abs_rel.mean()), "rmse": float(rmse.mean()), "delta1": float(delta1.mean())}


def ensemble(samples: Tensor) -> Tensor:
    """The per-pixel median over ``samples`` ``(K, N, ...)``, each first scaled and shifted onto the plain
    per-pixel median of all K over every pixel (the ground truth is never used)."""
    reference = samples.median(0).values
    everywhere = torch.ones_like(reference, dtype=torch.bool)
    return torch.stack([align_scale_shift(s, reference, everywhere) for s in samples]).median(0).values


def image_to_depth(images: Tensor) -> Tensor:
    """Depth images ``(N, C, H, W)`` in [-1, 1] as depth up to scale ``(N, 1, H, W)``: ``(x + 1) / 2``, averaged
    over the channels."""
    return ((images.double() + 1) / 2).mean(1, keepdim=True)


def evaluate_dense(
    model: str, settings, data: str, cond_data: str | None = None, num_samples: int = 1000, members: int = 1
):
    """``d2f eval --task dense``: the export ``model`` predicts the depth of each held-out condition (the first
    ``num_samples`` pairs of ``data`` and ``cond_data``, by name), ``members`` samples each from different noise,
    merged by :func:`ensemble`; scored by :func:`depth_metrics`.

    An export trained on a Stable Diffusion pipeline's latents reads image pairs at the VAE's pixel size (a grey
    target as RGB, its value in all three channels), encodes the conditions with the pipeline's VAE
    (``latent_dist`` mean) and decodes each prediction with it before averaging the channels back, as Marigold
    does; the UNet is conditioned on the empty prompt, as Marigold's is (SD 1.x/2.x pipelines only). Every input
    is checked before the first sample."""
    from .._checks import check_positive_int
    from ..data.encode import empty_prompt, load_vae, vae_images
    from ..networks.export import read_model
    from ..networks.sampling import load_for, sample_export
    from .few_step import d2f_calls

    check_positive_int("num_samples", num_samples)
    check_positive_int("ensemble", members)
    started = time.perf_counter()
    meta = read_model(model).meta
    if not meta.get("cond_channels"):
        raise ValueError(f"--task dense needs a model trained with conditions (--cond-data); {model} has none")
    pipeline = meta["train_config"]["pretrained"] if meta.get("pipeline") else None
    if pipeline and Path(data).suffix in (".safetensors", ".npy"):
        raise ValueError(
            f"data={data!r} is a latents file; dense eval of a pipeline's export reads image pairs (depth images "
            "and their conditions), which it encodes and decodes with the pipeline's VAE"
        )
    field = load_for(model, settings, torch.zeros(1, meta["cond_channels"], 8, 8))  # sampled by every member
    vae, shared = (load_vae(pipeline), empty_prompt(pipeline)) if pipeline else (None, None)
    gt, cond = held_out_pairs(meta, field.net.config.out_channels, vae, data, cond_data, num_samples)
    predictions = []
    for member in range(members):
        member_settings = replace(settings, seed=settings.seed + member)
        samples = sample_export(model, member_settings, len(cond), concat=cond, shared=shared, loaded=field)
        images = samples.images
        if vae is not None:
            with torch.no_grad():
                images = torch.cat([vae_images(vae, z) for z in images.split(8)])
        predictions.append(image_to_depth(images))
    merged = predictions[0] if members == 1 else ensemble(torch.stack(predictions))
    used = samples.settings
    return {
        "task": "dense",
        "model": str(model),
        **used.to_dict(),
        "seed": settings.seed,
        "ensemble": members,
        "network_calls_per_prediction": members * d2f_calls(field, used.solver, used.grid, used.steps, used.shift),
        "num_pairs": len(cond),
        **depth_metrics(merged, gt),
        "decoded_by": None if vae is None else f"{pipeline}/vae",
        "reference": f"{data} (depth images read as (x + 1) / 2, channels averaged) with conditions from "
        f"{cond_data or 'its concat key'}",
        "seconds": round(time.perf_counter() - started, 1),
    }


def held_out_pairs(
    meta: dict, channels: int, vae, data: str, cond_data: str | None, num_samples: int
) -> tuple[Tensor, Tensor]:
    """The first ``num_samples`` held-out pairs: their targets as depth, checked (:func:`check_targets`), and
    their conditions as the export takes them (through ``vae`` for a pipeline's export), of its channel count."""
    from ..data.datasets import load_dataset
    from ..data.encode import vae_factor, vae_latents

    if vae is None:
        pairs = load_dataset(data, meta["resolution"], channels, cond=cond_data)
    else:
        pixels = meta["resolution"] * vae_factor(vae.config)
        pairs = load_dataset(data, pixels, 3, cond=cond_data)
    if pairs.concat is None:
        raise ValueError(f"data={data!r} carries no conditions (no concat key); pass --cond-data")
    gt, cond = image_to_depth(pairs.images[:num_samples]), pairs.concat[:num_samples]
    check_targets(gt, f"data={data!r}: target")
    if vae is not None:
        with torch.no_grad():
            cond = torch.cat([vae_latents(vae, c) for c in cond.split(8)])
    if cond.shape[1] != meta["cond_channels"]:
        source = f"cond_data={cond_data!r}" if cond_data else f"data={data!r}"
        raise ValueError(
            f"{source}: its conditions have {cond.shape[1]} channels; the model was trained with "
            f"{meta['cond_channels']} condition channel(s)"
        )
    return gt, cond
