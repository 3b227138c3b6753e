"""Captions for the embedded digits that carry more than a class label: the digit's name in several phrasings,
and two attributes measured on each image, so a prompt can ask for what a label cannot ("a thick seven leaning
left"). The same measures score generated images against their prompts.

Both attributes are measured at 28 px (other sizes are resized first, as :func:`~d2f.data.images.resize` does),
on intensities in [0, 1]:

- **thickness** = ink area / ink boundary, over the ink mask (intensity > 1/2), where a boundary pixel is an ink
  pixel with a background pixel among its four neighbours. A stroke of width w and length L has area about w L
  and boundary about 2 L, so the ratio grows as w / 2; one-pixel strokes give 1. Two bins, split at the median
  of the shipped digits (1.4): ``thin`` and ``thick``.
- **slant** = cov(x, y) / var(y), the shear of the ink's intensity-weighted mass with y pointing up: the
  horizontal shift per row, positive when the top leans right. Three bins, near the shipped digits' tertiles:
  ``leaning left`` (< 0), ``upright`` (0 to 0.25), ``leaning right`` (>= 0.25).

Resized from 28 to 128 px and measured again, 94.6 % of the shipped digits keep their thickness bin and 99.7 %
their slant bin: the thickness split sits in the thick of its distribution, so a small change moves a digit
across it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_positive_int
from .._files import built_in_place
from .images import mnist, resize

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS = ("thin", "thick")
SLANT = ("leaning left", "upright", "leaning right")
THICKNESS_EDGES = (1.4,)
SLANT_EDGES = (0.0, 0.25)
# Each image's caption uses one phrasing, drawn per image from the seed: the name alone, the numeral, or the name
# with one or both attributes.
PHRASINGS = (
    "a handwritten {name}",
    "the digit {numeral}",
    "a {thickness} {name}",
    "a {name} {slant}",
    "a {thickness} {name} {slant}",
    "the number {name} in {thickness} strokes {slant}",
)
MEASURED_AT = 28
# The data name under which d2f train writes these digits as a captioned folder into its run (at its resolution).
CAPTIONED_DIGITS = "captioned-digits"


def _at_28px(images: Tensor) -> Tensor:
    """``(N, C, H, W)`` images in [-1, 1] as ``(N, 28, 28)`` intensities in [0, 1] (channels averaged)."""
    if images.ndim != 4:
        raise ValueError(f"images of shape {tuple(images.shape)}: expected (N, C, H, W) in [-1, 1]")
    grey = images.float().mean(1, keepdim=True)
    return (resize(grey, MEASURED_AT)[:, 0].clamp(-1, 1) + 1) / 2


def thickness(images: Tensor) -> Tensor:
    """Ink area over ink boundary, per image (module docstring); 0 for an image without ink."""
    ink = _at_28px(images) > 0.5
    padded = torch.nn.functional.pad(ink, (1, 1, 1, 1))
    interior = ink & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]
    area = ink.sum((1, 2)).float()
    return area / (ink & ~interior).sum((1, 2)).clamp(min=1).float()


def slant(images: Tensor) -> Tensor:
    """cov(x, y) / var(y) of the ink's intensity-weighted mass, y up, per image; 0 for an image without ink."""
    mass = _at_28px(images)
    y = -torch.arange(MEASURED_AT, dtype=mass.dtype).view(1, -1, 1)
    x = torch.arange(MEASURED_AT, dtype=mass.dtype).view(1, 1, -1)
    total = mass.sum((1, 2)).clamp(min=1e-6)
    dx = x - ((mass * x).sum((1, 2)) / total).view(-1, 1, 1)
    dy = y - ((mass * y).sum((1, 2)) / total).view(-1, 1, 1)
    return (mass * dx * dy).sum((1, 2)) / (mass * dy * dy).sum((1, 2)).clamp(min=1e-6)


def attributes(images: Tensor) -> dict[str, list[str]]:
    """Each image's ``thickness`` and ``slant`` bin names, as the captions name them."""
    thick = np.digitize(thickness(images).numpy(), THICKNESS_EDGES)
    lean = np.digitize(slant(images).numpy(), SLANT_EDGES)
    return {"thickness": [THICKNESS[i] for i in thick], "slant": [SLANT[i] for i in lean]}


def caption(digit: int, thickness: str, slant: str, phrasing: int) -> str:
    """The caption of a ``digit`` with the given attribute bins in :data:`PHRASINGS`' ``phrasing``."""
    if thickness not in THICKNESS or slant not in SLANT:
        raise ValueError(f"thickness={thickness!r}, slant={slant!r}: one of {THICKNESS} and one of {SLANT}")
    return PHRASINGS[phrasing].format(name=NAMES[digit], numeral=digit, thickness=thickness, slant=slant)


def words() -> list[str]:
    """Every word a caption can hold, sorted: the vocabulary a tokenizer for them needs."""
    texts = [
        p.format(name=n, numeral=d, thickness=t, slant=s)
        for p in PHRASINGS
        for d, n in enumerate(NAMES)
        for t in THICKNESS
        for s in SLANT
    ]
    return sorted({w for text in texts for w in text.split()})


@dataclass
class CaptionedDigits:
    images: Tensor  # (N, 1, R, R) in [-1, 1]
    labels: Tensor
    captions: list[str]
    thickness: list[str]
    slant: list[str]


def captioned_digits(resolution: int, seed: int = 0) -> CaptionedDigits:
    """The 5000 shipped digits at ``resolution`` with a caption each; the attributes are measured on the 28 px
    originals and each phrasing is drawn from ``seed``."""
    check_positive_int("resolution", resolution)
    originals = mnist(MEASURED_AT)
    measured = attributes(originals.images)
    phrasing = torch.randint(len(PHRASINGS), (len(originals),), generator=torch.Generator().manual_seed(seed))
    captions = [
        caption(int(d), t, s, int(p))
        for d, t, s, p in zip(originals.labels, measured["thickness"], measured["slant"], phrasing)
    ]
    return CaptionedDigits(
        resize(originals.images, resolution), originals.labels, captions, measured["thickness"], measured["slant"]
    )


def write_digit_folder(out: str | os.PathLike, resolution: int, seed: int = 0, count: int | None = None) -> Path:
    """A captioned image folder of the shipped digits at ``resolution``, as ``d2f encode`` reads it: greyscale
    PNGs and a ``metadata.jsonl`` with ``file_name``, ``text`` (the caption) and the measured ``digit``,
    ``thickness`` and ``slant``. ``count`` digits (None: all 5000) are taken evenly spaced: the shipped digits
    are sorted by class, so the first few hundred would all be zeros. Built in a temporary sibling and renamed
    into place, so ``out`` appears whole or not at all (:func:`~d2f._files.built_in_place`); an existing ``out``
    is refused."""
    from PIL import Image

    out = Path(out)
    if out.exists():
        raise FileExistsError(17, "already exists; give a new folder", str(out))
    data = captioned_digits(resolution, seed)
    n = len(data.images)
    if count is not None and check_positive_int("count", count) > n:
        raise ValueError(f"count={count!r} is more than the {n} shipped digits")
    taken = range(n) if count is None else [k * n // count for k in range(count)]
    pixels = ((data.images[:, 0] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    with built_in_place(out) as tmp:
        lines = []
        for i, k in enumerate(taken):
            name = f"{i:05d}.png"
            Image.fromarray(pixels[k]).save(tmp / name)
            row = {"file_name": name, "text": data.captions[k], "digit": int(data.labels[k])}
            lines.append(json.dumps({**row, "thickness": data.thickness[k], "slant": data.slant[k]}))
        (tmp / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out
