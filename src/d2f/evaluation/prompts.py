"""Prompt following: how well images drawn from text prompts match them, for the miniature Stable Diffusion.

Three scores, each on what a user would look at:

- **digit accuracy**: the evaluation classifier's prediction against the prompt's digit;
- **attribute accuracy**: stroke thickness and slant measured on each image exactly as the training captions
  measured them (``data/digit_captions.py``) against the prompt's bins, over the prompts that name the attribute
  (chance: 1/2 for thickness, 1/3 for slant);
- **FID** against the shipped digits at the images' resolution, in the classifier's features.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..data.digit_captions import NAMES, SLANT, THICKNESS, attributes
from ..data.images import mnist
from .classifier import LeNet, load_classifier
from .metrics import class_accuracy, features, fid, kid


@dataclass(frozen=True)
class Prompt:
    """A prompt and what it asks for: a digit, and a thickness and slant bin where it names them."""

    text: str
    digit: int
    thickness: str | None = None
    slant: str | None = None


def evaluation_prompts() -> list[Prompt]:
    """Twelve prompts per digit, 120 in all: the digit alone, with each thickness, with each slant, and with each
    combination of the two, in the training captions' phrasings."""
    found = []
    for digit, name in enumerate(NAMES):
        found.append(Prompt(f"a handwritten {name}", digit))
        found += [Prompt(f"a {t} {name}", digit, thickness=t) for t in THICKNESS]
        found += [Prompt(f"a {name} {s}", digit, slant=s) for s in SLANT]
        found += [Prompt(f"a {t} {name} {s}", digit, t, s) for t in THICKNESS for s in SLANT]
    return found


def sample_prompts() -> list[Prompt]:
    """The ten prompts of a run's ``samples.png`` (``d2f train`` on the captioned digits): digit ``d`` with the
    ``d``-th of its evaluation prompts, so the row shows each kind of prompt (alone, a thickness, a slant, both)."""
    prompts = evaluation_prompts()
    return [prompts[12 * digit + digit] for digit in range(len(NAMES))]


def grey(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` images in [-1, 1] as ``(N, 1, H, W)``: channels averaged."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, 1 or 3, H, W) in [-1, 1]")
    return images.float().mean(1, keepdim=True)


def real_features(classifier: LeNet, resolution: int) -> Tensor:
    """The classifier's features of the 5000 shipped digits at ``resolution``: the FID reference."""
    return features(classifier, mnist(resolution).images)


def prompt_following(
    images: Tensor, prompts: Sequence[Prompt], classifier: LeNet | None = None, reference: Tensor | None = None
) -> dict[str, float | int]:
    """The three scores of ``images`` (``(N, C, H, W)`` in [-1, 1]) drawn from ``prompts`` (one each): digit
    accuracy, thickness and slant accuracy (``None`` where no prompt names the attribute), and FID and KID (with its
    standard deviation over subsets) against ``reference`` features (default: :func:`real_features` at the images'
    resolution)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images for {len(prompts)} prompts: one prompt per image")
    classifier = classifier if classifier is not None else load_classifier()
    images = grey(images)
    if reference is None:
        reference = real_features(classifier, images.shape[-1])
    digits = torch.tensor([p.digit for p in prompts])
    measured = attributes(images)
    scores: dict[str, float | int] = {"n": len(prompts), "digit_accuracy": class_accuracy(classifier, images, digits)}
    for name in ("thickness", "slant"):
        pairs = [(m, getattr(p, name)) for m, p in zip(measured[name], prompts) if getattr(p, name) is not None]
        scores[f"{name}_n"] = len(pairs)
        scores[f"{name}_accuracy"] = sum(m == asked for m, asked in pairs) / len(pairs) if pairs else None
    fake = features(classifier, images)
    scores["fid"] = fid(reference, fake)
    scores["kid"], scores["kid_std"] = kid(reference, fake)
    return scores


@torch.no_grad()
def pipeline_images(
    pipe,
    prompts: Sequence[Prompt],
    steps: int,
    guidance: float,
    seed: int = 0,
    size: int | None = None,
    batch: int = 40,
) -> Tensor:
    """One image per prompt from a diffusers text-to-image ``pipe`` as ``(N, 3, H, W)`` in [-1, 1]. Image ``i``
    starts from ``torch.Generator().manual_seed(seed + i)``'s noise, so a prompt's image does not depend on the
    batch it lands in, and two schedulers given the same seed start from the same noise."""
    chunks = []
    for start in range(0, len(prompts), batch):
        texts = [p.text for p in prompts[start : start + batch]]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(texts))]
        out = pipe(
            texts,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=generators,
            height=size,
            width=size,
            output_type="pt",
        )
        chunks.append(out.images.float().cpu() * 2 - 1)
    return torch.cat(chunks)


# The miniature pipeline's reference sampler: its own DDIMScheduler, 25 steps, guidance 3; four images per
# evaluation prompt.
REFERENCE = {"steps": 25, "guidance": 3.0, "per_prompt": 4}


def reference_scores(pipeline: str | os.PathLike, seed: int = 0) -> dict[str, Any]:
    """Prompt following of a pipeline folder sampled with the scheduler it ships with at :data:`REFERENCE`'s
    settings and its native size: the reference every other sampler on it is compared with."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = evaluation_prompts() * REFERENCE["per_prompt"]
    images = pipeline_images(pipe, prompts, REFERENCE["steps"], REFERENCE["guidance"], seed)
    return {**REFERENCE, "scheduler": type(pipe.scheduler).__name__, **prompt_following(images, prompts)}


def export_outputs(
    export: str | os.PathLike,
    out: str | os.PathLike,
    steps: int,
    guidance: float,
    seed: int,
    size: int,
    device: str | torch.device | None = None,
):
    """What ``d2f train`` on the captioned digits writes about its export, drawn the way a user draws it
    (:func:`~d2f.networks.sampling.export_pipeline`: the base pipeline, ``load_lora_weights``, ``D2FScheduler``
    with the auto solver) at ``size`` px: ``samples.png``, one image per :func:`sample_prompts` prompt, with
    ``samples.json`` naming them; returns those names and the prompt following on :func:`evaluation_prompts`,
    one image each, for ``metrics.json``. The pipeline runs on ``device`` (unset: CUDA when available); the
    noise is drawn on the CPU, so each prompt starts from the same noise on any device."""
    from .._files import write_json
    from ..auto_sampler import auto_sampler
    from ..figures import save_grid
    from ..networks.sampling import export_pipeline

    out = Path(out)
    pipe = export_pipeline(export, device=device)
    settings = {"steps": steps, "guidance": guidance, "seed": seed, "size": size}
    config = pipe.scheduler.config
    sampler = auto_sampler(steps, config.flow_finetuned)
    settings["scheduler"] = f"D2FScheduler(solver='auto'): {sampler.solver} on the {sampler.grid} grid"
    shown = sample_prompts()
    save_grid(pipeline_images(pipe, shown, steps, guidance, seed, size), out / "samples.png", len(shown), upscale=1)
    write_json(out / "samples.json", {**settings, "prompts": [p.text for p in shown]})
    prompts = evaluation_prompts()
    scores = prompt_following(pipeline_images(pipe, prompts, steps, guidance, seed, size), prompts)
    return {"samples_png": "samples.png", "samples_json": "samples.json", "prompt_following": {**settings, **scores}}
