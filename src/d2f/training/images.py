"""PNG output without a plotting library: sample grids and the loss curve (Pillow, a diffusers dependency)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw


def save_grid(images: torch.Tensor, path: Path, columns: int = 10, upscale: int = 3) -> None:
    """``images``: ``(N, C, H, W)`` in [-1, 1], 1 or 3 channels; written as one PNG grid."""
    images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = images.shape
    rows = -(-n // columns)
    grid = np.zeros((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[1 + r * (h + 1) : 1 + r * (h + 1) + h, 1 + col * (w + 1) : 1 + col * (w + 1) + w] = image.permute(
            1, 2, 0
        ).numpy()
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")
    picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST).save(path)


def save_loss_curve(losses: list[float], path: Path, title: str = "training loss", size=(640, 400)) -> None:
    """The per-step loss (thin, grey) and its moving average (dark), on a log scale."""
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")
    values = np.log10(np.maximum(np.asarray(losses, dtype=np.float64), 1e-12))
    if values.size < 2:
        image.save(path)
        return
    window = max(1, values.size // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid")
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1

    def xy(i: float, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / (values.size - 1)
        y = top + (height - top - bottom) * (hi - v) / (hi - lo)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    draw.line([xy(i, v) for i, v in enumerate(values)], fill=(190, 190, 190), width=1)
    offset = (window - 1) / 2
    draw.line([xy(i + offset, v) for i, v in enumerate(smooth)], fill=(20, 60, 160), width=2)
    for v in (lo, (lo + hi) / 2, hi):
        draw.text((4, xy(0, v)[1] - 6), f"{10**v:.3g}", fill="black")
    draw.text((left, height - bottom + 8), "step 1", fill="black")
    draw.text((width - right - 60, height - bottom + 8), f"step {values.size}", fill="black")
    image.save(path)
