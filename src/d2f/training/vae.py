"""Training the miniature Stable Diffusion's VAE (``networks/miniature.py``) on the shipped digits.

The loss is SD's autoencoder loss less its perceptual and adversarial terms, which need networks this
miniature does not have: the L1 distance between an image and the decoding of a draw from its posterior, plus
``kl_weight`` times the posterior's KL divergence from N(0, I) (SD's weight, 1e-6: the KL term only keeps the
latents from drifting; their scale is set after training, by ``scaling_factor``).

``scaling_factor`` is then set as SD set 0.18215: one over the standard deviation of the latents (here the
posterior means of the training images), so that the scaled latents have unit variance, as the diffusion schedule
assumes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .._checks import check_positive_int


def _batches(n: int, batch_size: int, steps: int, generator: torch.Generator):
    """Indices of ``steps`` batches: epochs of a permutation drawn from ``generator``, concatenated."""
    epochs = math.ceil(steps * batch_size / n)
    order = torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])
    return order[: steps * batch_size].view(steps, batch_size)


def vae_loss(vae, images: Tensor, generator: torch.Generator, kl_weight: float) -> tuple[Tensor, Tensor]:
    """``(loss, l1)``: L1 between ``images`` and the decoded posterior draw, plus ``kl_weight`` times the KL
    divergence summed over latent elements and averaged over images (SD's ``LPIPSWithDiscriminator`` without
    its perceptual and adversarial terms)."""
    posterior = vae.encode(images).latent_dist
    reconstruction = vae.decode(posterior.sample(generator)).sample
    l1 = (reconstruction - images).abs().mean()
    return l1 + kl_weight * posterior.kl().mean(), l1


@torch.no_grad()
def reconstruction_error(vae, images: Tensor, batch_size: int = 100) -> dict[str, float]:
    """Mean absolute error (on [-1, 1]) and PSNR (on [0, 1]) of decoding each image's posterior mean."""
    abs_error = squared = 0.0
    for chunk in images.split(batch_size):
        decoded = vae.decode(vae.encode(chunk).latent_dist.mean).sample.clamp(-1, 1)
        abs_error += (decoded - chunk).abs().sum().item()
        squared += ((decoded - chunk) / 2).square().sum().item()
    return {"l1": abs_error / images.numel(), "psnr": -10 * math.log10(squared / images.numel())}


@torch.no_grad()
def scaling_factor(vae, images: Tensor, batch_size: int = 100) -> float:
    """One over the standard deviation of the posterior means of ``images`` (module docstring)."""
    means = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(batch_size)])
    return 1.0 / means.std().item()


def train_vae(
    vae,
    images: Tensor,
    held_out: Tensor,
    steps: int,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train ``vae`` in place on ``images`` (``(N, 3, R, R)`` in [-1, 1]) with Adam and the loss of
    :func:`vae_loss`, then set its ``scaling_factor`` from ``images``. Returns the report: the recipe, the
    reconstruction error on ``held_out`` before and after, the final loss and the seconds taken."""
    check_positive_int("steps", steps)
    check_positive_int("batch_size", batch_size)
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    generator = torch.Generator().manual_seed(seed)
    order = _batches(len(images), batch_size, steps, generator)
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
    before = reconstruction_error(vae.eval(), held_out)
    started, losses = time.perf_counter(), []
    vae.train()
    for step in tqdm(range(steps), desc="d2f VAE", unit="step", disable=not progress):
        loss, l1 = vae_loss(vae, images[order[step]], generator, kl_weight)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"the VAE's loss is {loss.item()} at step {step} (lr={lr})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(l1.item())
    vae.eval()
    factor = scaling_factor(vae, images)
    vae.register_to_config(scaling_factor=factor)
    return {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "kl_weight": kl_weight,
        "seed": seed,
        "final_l1": sum(losses[-50:]) / len(losses[-50:]),
        "held_out_before": before,
        "held_out_after": reconstruction_error(vae, held_out),
        "scaling_factor": factor,
        "seconds": time.perf_counter() - started,
    }
