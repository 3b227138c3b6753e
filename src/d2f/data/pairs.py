"""Reflow pairs: noise and the sample a model's ODE carries it to, stored for rectified-flow finetuning.

``d2f pairs`` writes them; ``d2f train --pairs PATH`` trains on them. A pairs file is a safetensors file
with ``noise`` and ``sample`` ``(N, C, H, W)`` float32, optional ``labels`` ``(N,)`` int64 (the class
each sample was drawn for) or, for pairs drawn from a text-to-image pipeline (:func:`pipeline_pairs`: latents),
``encoder_hidden_states`` ``(N, L, D)`` (the prompt each was drawn for), and metadata naming the format, its
version and how the pairs were made.
Reflow trains the straight path between the *stored* noise and its sample, so each pair is one draw of a
coupling that the new model learns to follow in fewer steps (Liu et al., rectified flow).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .._checks import check_positive_int, check_real
from .._files import output_path, write_safetensors
from .._versioned import Document
from ..networks.sampling import SamplingSettings, sample_export
from .images import Dataset

PAIRS = Document(
    "d2f.pairs",
    1,
    frozenset({"model", "steps", "solver", "grid", "shift", "guidance", "seed", "seconds"}),
    # where the pairs were sampled (files made before it was recorded lack it); a pipeline's pairs: its
    # scheduler, the image size, how many prompts they were drawn from and the fingerprint of its encoders
    frozenset({"device", "scheduler", "size", "prompts", "pretrained_fingerprint"}),
)
PAIRS_KEYS = {"noise", "sample", "labels", "encoder_hidden_states"}


def generate_pairs(
    model: str,
    out: str | Path,
    num_pairs: int = 5000,
    settings: SamplingSettings | None = None,
    progress: bool = False,
) -> dict:
    """Sample ``num_pairs`` images from the export ``model`` and store them with their starting noise.

    Many ODE steps make the coupling close to the model's exact ODE map; ``settings`` are those of
    ``d2f sample`` (default: 50 Euler steps on the uniform grid). Returns the metadata written with the file.
    """
    settings = settings or SamplingSettings(steps=50, solver="euler", grid="uniform")
    check_positive_int("num_pairs", num_pairs)
    out = _check_out(out)
    started = time.perf_counter()
    images, labels, noise, _, settings = sample_export(model, settings, num_pairs, progress=progress)
    if not bool(torch.isfinite(images).all()):
        raise FloatingPointError(f"{model} produced non-finite samples; no pairs written")
    tensors = {"noise": noise.contiguous(), "sample": images.float().contiguous()}
    if labels is not None:
        tensors["labels"] = labels.to(torch.int64).contiguous()
    meta = {"model": str(model), **settings.to_dict(), "seconds": round(time.perf_counter() - started, 1)}
    _write(out, tensors, meta)
    return meta


def _write(out: Path, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    write_safetensors(out, tensors, metadata={"d2f": json.dumps(PAIRS.new(**meta))})


def _check_out(out) -> Path:
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: a pairs file is written as .safetensors")
    return output_path(out)


def image_noise(first_seed: int, n: int, shape: tuple[int, ...]) -> torch.Tensor:
    """``n`` noises of ``shape``, noise ``i`` the first draw of ``Generator().manual_seed(first_seed + i)`` on the
    CPU: what a diffusers pipeline draws given one seeded generator per image (its ``randn_tensor`` draws each
    image from its own generator), so a noise does not depend on the batch it lands in."""
    return torch.cat(
        [torch.randn(1, *shape, generator=torch.Generator().manual_seed(first_seed + i)) for i in range(n)]
    )


PIPELINE_PAIRS = ("StableDiffusionPipeline",)  # text-to-image from the UNet's latents alone


@torch.no_grad()
def pipeline_pairs(
    pretrained: str | Path,
    prompts: list[str],
    out: str | Path,
    num_pairs: int = 1000,
    steps: int = 25,
    guidance: float = 3.0,
    size: int | None = None,
    seed: int = 0,
    batch: int = 40,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> dict:
    """Reflow pairs from a ``StableDiffusionPipeline`` folder (or ``"miniature"``), drawn as a user draws images: its
    own scheduler, ``steps`` steps, guidance ``guidance``, at ``size`` px (unset: its UNet's). Pair ``i`` is prompt
    ``j_i`` of ``prompts`` (``num_pairs`` of them drawn without replacement from ``Generator().manual_seed(seed)``,
    with replacement when there are fewer prompts than pairs), its starting latent noise
    (:func:`image_noise` from seed ``seed + 1``: pair ``i``'s generator is seeded ``seed + 1 + i``, which also
    seeds any noise a stochastic scheduler adds) and the latent the pipeline carries it to (the scaled latent space
    its encoded training data lives in), with the prompt's text embedding. Score a reflow model on other seeds:
    these noises are its training data. The guided map is what the reflow model learns, so the pairs store no
    empty-prompt embedding: the student is trained without dropout and sampled unguided (``d2f train``'s
    guidance defaults to 1 for such data). ``device``: where the pipeline runs (unset: CUDA when available); the
    noise is drawn on the CPU."""
    import diffusers
    from tqdm.auto import tqdm

    from .._backend import device_or_default
    from .encode import encoders_fingerprint, find_pipeline

    for name, value in (("num_pairs", num_pairs), ("steps", steps), ("batch", batch)):
        check_positive_int(name, value)
    if size is not None:
        check_positive_int("size", size)
    check_real("guidance", guidance, "be a finite number >= 1 (1: unguided)", lambda g: g >= 1)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    out = _check_out(out)
    folder, index, kind = find_pipeline(pretrained)
    if index.get("_class_name") not in PIPELINE_PAIRS:
        raise ValueError(
            f"pretrained={str(pretrained)!r} is a {index.get('_class_name')}; pipeline pairs are drawn from "
            f"{' or '.join(PIPELINE_PAIRS)} (an SDXL UNet also takes pooled embeddings and time ids, an inpainting or "
            "image-to-image one an image, which a pairs file does not store)"
        )
    started = time.perf_counter()
    cls = getattr(diffusers, index["_class_name"])
    pipe = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device_or_default(device))
    size = size or pipe.unet.config.sample_size * pipe.vae_scale_factor
    if size % pipe.vae_scale_factor:
        raise ValueError(f"size={size} is not allowed for {folder / 'vae'}: a multiple of {pipe.vae_scale_factor}")
    side = size // pipe.vae_scale_factor
    chooser = torch.Generator().manual_seed(seed)
    if num_pairs <= len(prompts):
        chosen = torch.randperm(len(prompts), generator=chooser)[:num_pairs]
    else:
        chosen = torch.randint(len(prompts), (num_pairs,), generator=chooser)
    texts = [prompts[int(j)] for j in chosen]
    shape = (pipe.unet.config.in_channels, side, side)
    noise, samples, states = [], [], []
    for start in tqdm(range(0, num_pairs, batch), desc="pairs", unit="batch", disable=not progress):
        part = texts[start : start + batch]
        z = image_noise(seed + 1 + start, len(part), shape)
        cond, _ = pipe.encode_prompt(part, pipe.device, 1, False)
        # the pipeline scales the noise by init_noise_sigma itself; the coupling is the unit noise
        result = pipe(
            prompt_embeds=cond,
            latents=z.to(pipe.device),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=size,
            width=size,
            generator=[torch.Generator().manual_seed(seed + 1 + start + i) for i in range(len(part))],
            output_type="latent",
        ).images
        noise.append(z)
        samples.append(result.float().cpu())
        states.append(cond.float().cpu())
    tensors = {
        "noise": torch.cat(noise).contiguous(),
        "sample": torch.cat(samples).contiguous(),
        "encoder_hidden_states": torch.cat(states).contiguous(),
    }
    if not bool(torch.isfinite(tensors["sample"]).all()):
        raise FloatingPointError(f"{pretrained} produced non-finite latents; no pairs written")
    meta = {
        "model": str(pretrained),
        "steps": steps,
        "solver": type(pipe.scheduler).__name__,
        "grid": None,
        "shift": None,
        "guidance": guidance,
        "seed": seed,
        "scheduler": type(pipe.scheduler).__name__,
        "size": size,
        "prompts": len(prompts),
        "pretrained_fingerprint": encoders_fingerprint(folder, kind),
        "device": str(pipe.device),
        "seconds": round(time.perf_counter() - started, 1),
    }
    _write(out, tensors, meta)
    return meta


def load_pairs(path: str | Path, shape: tuple[int, ...] | None = None, pretrained: str | Path | None = None) -> Dataset:
    """A pairs file as training data: ``images`` are the samples, ``noise`` their coupled noise, and
    ``encoder_hidden_states`` each pair's prompt embedding where the pairs came from a pipeline; with ``shape``,
    refused unless each sample is of that ``(C, H, W)``. A pipeline's pairs are latents and text embeddings in its
    encoders' spaces, so they train only the pipeline ``pretrained`` whose VAE and text encoder drew them
    (``encoders_fingerprint``); an export's pairs train no pipeline."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"pairs={str(path)!r}: no such file (make one with `d2f pairs`)")
    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        document = json.loads(metadata.get("d2f", "null"))
        tensors = load_file(str(path))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"pairs={str(path)!r}: not a d2f pairs file ({e})") from e
    PAIRS.check(document, f"pairs={str(path)!r}")
    if not {"noise", "sample"} <= set(tensors) <= PAIRS_KEYS:
        raise ValueError(
            f"pairs={str(path)!r}: expected keys noise, sample (and labels or encoder_hidden_states); found "
            f"{sorted(tensors)}"
        )
    noise, sample, labels = tensors["noise"], tensors["sample"], tensors.get("labels")
    states = tensors.get("encoder_hidden_states")
    if noise.shape != sample.shape or sample.ndim != 4:
        raise ValueError(
            f"pairs={str(path)!r}: noise {tuple(noise.shape)} and sample {tuple(sample.shape)} must be the "
            "same (N, C, H, W)"
        )
    if labels is not None and (labels.shape != (sample.shape[0],) or labels.dtype != torch.int64):
        raise ValueError(f"pairs={str(path)!r}: labels must be int64 of shape ({sample.shape[0]},)")
    if states is not None and (states.ndim != 3 or states.shape[0] != sample.shape[0]):
        raise ValueError(
            f"pairs={str(path)!r}: encoder_hidden_states has shape {tuple(states.shape)}; one (L, D) text embedding "
            f"per pair, ({sample.shape[0]}, L, D)"
        )
    for name, value in (("noise", noise), ("sample", sample), ("encoder_hidden_states", states)):
        if value is None:
            continue
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"pairs={str(path)!r}: {name} contains NaN or inf")
    if shape is not None and tuple(sample.shape[1:]) != tuple(shape):
        raise ValueError(
            f"pairs={str(path)!r} holds samples of shape {tuple(sample.shape[1:])}; the run needs {tuple(shape)}: "
            f"pass --resolution {document.get('size') or sample.shape[-1]} for pairs of this model"
        )
    if states is not None or pretrained is not None:
        _check_drawn_by(path, document, states is not None, pretrained)
    return Dataset(
        images=sample.float(),
        labels=labels,
        noise=noise.float(),
        encoder_hidden_states=None if states is None else states.float(),
    )


def _check_drawn_by(path: Path, document: dict, from_pipeline: bool, pretrained: str | Path | None) -> None:
    from .encode import encoders_fingerprint, find_pipeline

    drawn = f"pairs={str(path)!r} were drawn by {document['model']}"
    if pretrained is None:
        raise ValueError(f"{drawn}: latents and text embeddings, which train that pipeline (--pretrained PIPELINE)")
    if not from_pipeline:
        raise ValueError(f"{drawn}, an export, whose images are no latents of pretrained={str(pretrained)!r}")
    if "pretrained_fingerprint" not in document:
        raise ValueError(
            f"{drawn} with an earlier d2f, which did not record that pipeline's encoders; draw them again "
            "(d2f pairs --prompts)"
        )
    folder, _, kind = find_pipeline(pretrained)
    if document["pretrained_fingerprint"] != encoders_fingerprint(folder, kind):
        raise ValueError(
            f"{drawn}, whose VAE and text encoder differ from those of pretrained={str(pretrained)!r}; draw the "
            "pairs with the pipeline being trained"
        )


__all__ = ["generate_pairs", "load_pairs", "pipeline_pairs"]
