"""PNG output without a plotting library: sample grids and the loss curve (Pillow, a diffusers dependency)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ._files import write_atomic


def image_format(path: str | Path) -> str:
    """The format ``path``'s suffix names (``.png``, ``.jpg``, ...), checked before anything is drawn."""
    name = Image.registered_extensions().get(Path(path).suffix.lower())
    if name is None:
        raise ValueError(f"out={str(path)!r}: the suffix names no image format Pillow writes (use .png)")
    return name


def save_image(image: Image.Image, path: str | Path) -> Path:
    """``image`` written atomically to ``path``, in the format its suffix names."""
    buffer = io.BytesIO()
    image.save(buffer, format=image_format(path))
    return write_atomic(path, buffer.getvalue())


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
    save_image(picture.resize((picture.width * upscale, picture.height * upscale), Image.NEAREST), path)


PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    # beyond ten lines (E5 draws seventeen): darker and purer hues, still far from the ten above
    (0, 0, 0),
    (0, 110, 110),
    (120, 0, 0),
    (0, 0, 140),
    (110, 110, 0),
    (230, 0, 230),
    (0, 200, 90),
]


def save_line_plot(
    series: dict[str, tuple[list[float], list[float]]],
    path: Path,
    title: str,
    xlabel: str = "",
    log_y: bool = False,
    size: tuple[int, int] = (640, 400),
    colors: dict[str, tuple[int, int, int]] | None = None,
    bands: dict[str, tuple[list[float], list[float]]] | None = None,
) -> None:
    """Lines ``name -> (xs, ys)`` on shared axes, with a legend (names starting with ``_`` get none), and for
    the names in ``bands`` a light band ``(lows, highs)`` at the same ``xs`` (a seed range, say).

    Non-finite points are left out rather than drawn as zero.
    """
    width, height = size
    left, right, top, bottom = 60, 20, 30, 40
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    draw.text((left, 8), title, fill="black")

    def finite(xs, ys) -> tuple[np.ndarray, np.ndarray]:
        x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        y = np.log10(np.maximum(y, 1e-12)) if log_y else y
        keep = np.isfinite(x) & np.isfinite(y)
        return x[keep], y[keep]

    prepared = {name: finite(xs, ys) for name, (xs, ys) in series.items()}
    shaded = {
        name: (finite(series[name][0], lows), finite(series[name][0], highs))
        for name, (lows, highs) in (bands or {}).items()
    }
    points = [v for xy in (*prepared.values(), *(b for pair in shaded.values() for b in pair)) for v in zip(*xy)]
    if not points:
        save_image(image, path)
        return
    (x_lo, y_lo), (x_hi, y_hi) = np.min(points, axis=0), np.max(points, axis=0)
    x_hi, y_hi = (x_hi if x_hi > x_lo else x_lo + 1), (y_hi if y_hi > y_lo else y_lo + 1)

    def xy(x: float, y: float) -> tuple[float, float]:
        return (
            left + (width - left - right) * (x - x_lo) / (x_hi - x_lo),
            top + (height - top - bottom) * (y_hi - y) / (y_hi - y_lo),
        )

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    names = list(prepared)
    for name, ((x_lo_band, y_lo_band), (x_hi_band, y_hi_band)) in shaded.items():
        color = (colors or {}).get(name, PALETTE[names.index(name) % len(PALETTE)])
        light = tuple(255 - (255 - c) // 4 for c in color)  # a quarter of the way from white
        outline = [xy(a, b) for a, b in zip(x_lo_band, y_lo_band)] + [
            xy(a, b) for a, b in zip(x_hi_band[::-1], y_hi_band[::-1])
        ]
        if len(outline) > 2:
            draw.polygon(outline, fill=light)
    legend_y = top + 6
    for i, (name, (x, y)) in enumerate(prepared.items()):
        color = (colors or {}).get(name, PALETTE[i % len(PALETTE)])
        if x.size > 1:
            draw.line([xy(a, b) for a, b in zip(x, y)], fill=color, width=2 if not name.startswith("_") else 1)
        for a, b in zip(x, y) if x.size < 30 else ():
            cx, cy = xy(a, b)
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=color)
        if not name.startswith("_"):
            draw.line([(width - right - 150, legend_y + 6), (width - right - 130, legend_y + 6)], fill=color, width=2)
            draw.text((width - right - 125, legend_y), name, fill="black")
            legend_y += 14
    for v in (y_lo, (y_lo + y_hi) / 2, y_hi):
        draw.text((4, xy(x_lo, v)[1] - 6), f"{10**v if log_y else v:.3g}", fill="black")
    draw.text((left, height - bottom + 8), f"{x_lo:.3g}", fill="black")
    draw.text((width - right - 40, height - bottom + 8), f"{x_hi:.3g}", fill="black")
    draw.text(((width - len(xlabel) * 6) / 2, height - bottom + 20), xlabel, fill="black")
    save_image(image, path)


def save_loss_curve(losses: list[float], path: Path, title: str = "training loss", size=(640, 400)) -> None:
    """The per-step loss (thin, grey) and its moving average (dark), on a log scale."""
    values = np.asarray(losses, dtype=np.float64)
    window = max(1, values.size // 50)
    smooth = np.convolve(values, np.ones(window) / window, mode="valid") if values.size else values
    steps = np.arange(1, values.size + 1)
    offset = (window - 1) / 2
    series = {"_loss": (steps, values), "moving average": (steps[: smooth.size] + offset, smooth)}
    colors = {"_loss": (190, 190, 190), "moving average": (20, 60, 160)}
    save_line_plot(series, path, title, xlabel="step", log_y=True, size=size, colors=colors)
