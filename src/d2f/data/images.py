"""Images in, the first stage of d2f's data path (then captions, the encoded latents file and the data set:
``data/__init__.py``): the :class:`Dataset` every source fills, and the image sources: the embedded MNIST
digits, sklearn's 8x8 digits, image folders and pairs of them.

Every image comes out as float32 ``(C, H, W)`` in [-1, 1] at the requested resolution: resized with
antialiasing, shorter side first, then center-cropped (:func:`crop_box`).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
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
    noise: Tensor | None = None  # reflow pairs: the noise coupled to each image (see pairs.py)
    # SDXL's added conditioning: the pooled text embedding (and the empty prompt's) and the six time ids
    text_embeds: Tensor | None = None
    null_text_embeds: Tensor | None = None
    time_ids: Tensor | None = None

    def __len__(self) -> int:
        return self.images.shape[0]


def crop_box(height: int, width: int, resolution: int) -> tuple[int, int, int, int]:
    """``(top, left, resized height, resized width)``: :func:`resize` scales the shorter side to
    ``resolution`` and takes the centered square at ``(top, left)`` (SDXL's time ids record it)."""
    if (height, width) == (resolution, resolution):
        return 0, 0, resolution, resolution
    scale = resolution / min(height, width)
    size = (max(resolution, round(height * scale)), max(resolution, round(width * scale)))
    return (size[0] - resolution) // 2, (size[1] - resolution) // 2, *size


def resize(images: Tensor, resolution: int) -> Tensor:
    """Shorter side to ``resolution`` with antialiasing, then a center crop to a square (:func:`crop_box`)."""
    h, w = images.shape[-2:]
    if (h, w) == (resolution, resolution):
        return images
    top, left, *size = crop_box(h, w, resolution)
    images = F.interpolate(images, size=size, mode="bilinear", antialias=True, align_corners=False)
    return images[..., top : top + resolution, left : left + resolution].contiguous()


# Modes whose pixels span 0..65535. PIL opens 16-bit greyscale PNGs as "I;16" (older versions: "I"), and its
# convert("L") clips such values at 255 instead of scaling them, so they are scaled here.
_SIXTEEN_BIT_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def pixels(im, channels: int) -> np.ndarray:
    """A loaded PIL image as float32 ``(H, W, channels)`` in [0, 255], converted as :func:`image_folder` says."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im)  # phone photos store their rotation as an EXIF tag, not in the pixels
    target = "L" if channels == 1 else "RGB"
    if im.mode in _SIXTEEN_BIT_MODES:
        raw = np.asarray(im).astype(np.float32)
        grey = np.clip(raw, 0, 65535) * (255 / 65535)
        if "transparency" in im.info:  # a tRNS grey value marks fully transparent pixels
            grey[raw == im.info["transparency"]] = 255
        return np.repeat(grey[..., None], channels, axis=2)
    if "A" in im.getbands() or im.has_transparency_data:
        # Without compositing, the colour stored under alpha 0 (often junk) would be trained on.
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
    im = im.convert(target)
    return np.array(im, dtype=np.float32).reshape(im.height, im.width, channels)


def folder_files(folder: Path, what: str, hidden: bool = True) -> list[Path]:
    """Every file under ``folder`` (recursively, sorted; without hidden ones unless ``hidden``), once no link in
    it leads outside it: a link must not bring files from elsewhere into a data set unseen (``link.png ->
    ../elsewhere/x.png``, a linked subfolder), so each is refused by name. Links inside the folder read as what
    they point at; a linked folder is not descended into (its files are read where they lie); a link that loops
    leads nowhere and adds nothing."""
    root = folder.resolve()
    files, outside = [], []
    for path in sorted(folder.rglob("*")):
        if not hidden and any(part.startswith(".") for part in path.relative_to(folder).parts):
            continue
        if path.is_symlink() and not inside(path, root):
            outside.append(f"{path.relative_to(folder).as_posix()} -> {path.resolve()}")
        elif path.is_file():
            files.append(path)
    if outside:
        shown = ", ".join(outside[:3]) + (f" and {len(outside) - 3} more" if len(outside) > 3 else "")
        raise ValueError(
            f"{what}: {shown} lead(s) outside {folder}; d2f reads only what lies inside the data folder: copy the "
            f"files in (cp -L) or point {what} at the folder they are in"
        )
    return files


def inside(path: Path, root: Path) -> bool:
    """Whether ``path``, links resolved, lies in the (resolved) folder ``root``; a link loop counts as inside,
    since it leads to no file."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):  # a loop: RuntimeError up to Python 3.12, OSError (ELOOP) from 3.13
        return True


def read_folder(path: Path, resolution: int, channels: int, what: str = "data") -> dict[str, Tensor]:
    """Every PNG/JPEG under ``path`` (recursively), as 1 channel (PIL "L") or 3 channels (PIL "RGB").

    Conversions, all to [-1, 1], after applying the EXIF orientation tag (as photo viewers do):

    - L, RGB, CMYK, YCbCr, 1-bit and palette ("P") images without transparency: PIL's own ``convert("L")`` /
      ``convert("RGB")`` (RGB to L is ITU-R 601-2 luma, L to RGB repeats the grey value).
    - Images with transparency (RGBA, LA, PA, palette or L/RGB PNGs with a tRNS entry): alpha-composited onto a
      **white** background first, so a fully transparent pixel is white (+1) whatever colour it stores.
    - 16-bit greyscale PNGs (PIL modes "I;16", "I;16B", "I"): scaled by their full range, 0..65535 to [-1, 1]
      (32768 gives 0.0); as RGB the grey value is repeated. 16-bit colour PNGs are reduced to 8 bits by PIL.

    Every image is decoded up front and the dataset lives in memory, so a bad file is found here, never
    mid-epoch. Empty files, truncated files (``ImageFile.LOAD_TRUNCATED_IMAGES`` is held False while loading,
    so PIL raises instead of filling the missing part with grey) and files that are not images are skipped;
    files with other suffixes (``notes.txt``, ``.DS_Store``) are ignored. One warning counts the skipped files
    by reason and the ignored ones. A folder with no readable image is an error, and so is a link leading
    outside it (:func:`folder_files`).

    Returns each image under its path relative to ``path``.
    """
    from PIL import Image, ImageFile, UnidentifiedImageError

    if channels not in (1, 3):
        raise ValueError(f"channels={channels}: an image folder gives 1 (greyscale) or 3 (RGB) channels")
    files = folder_files(path, what)
    ignored = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
    images, skipped = {}, {}  # images: relative path without suffix -> image; skipped: reason -> file names
    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        for file in files:
            if file.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            try:
                if file.stat().st_size == 0:
                    skipped.setdefault("empty", []).append(file.name)
                    continue
                with Image.open(file) as im:
                    im.load()  # open() only reads the header; truncation shows when the pixels are decoded
                    array = pixels(im, channels)
            except UnidentifiedImageError:
                skipped.setdefault("not an image", []).append(file.name)
                continue
            except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
                # Grouped by PIL's message only to make the summary readable.
                reason = "truncated" if "truncated" in str(e) else "corrupt or unreadable"
                skipped.setdefault(reason, []).append(f"{file.name} ({e})")
                continue
            tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
            images[file.relative_to(path).as_posix()] = resize(tensor, resolution)
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
    if skipped or ignored:
        parts = []
        if skipped:
            n_skipped = sum(len(names) for names in skipped.values())
            reasons = "; ".join(f"{why}: {len(names)} ({', '.join(names[:3])})" for why, names in skipped.items())
            parts.append(f"skipped {n_skipped} unreadable file(s) [{reasons}]")
        if ignored:
            examples = ", ".join(p.name for p in ignored[:3])
            parts.append(f"ignored {len(ignored)} file(s) not .png/.jpg/.jpeg ({examples})")
        warnings.warn(f"{path}: {'; '.join(parts)}; loaded {len(images)} image(s)", stacklevel=2)
    if not images:
        raise ValueError(f"{what}={str(path)!r} holds no readable PNG or JPEG image")
    return images


def pair_by_stem(data: Iterable[str], cond_data: Iterable[str], where: tuple[Path, Path]) -> dict[str, tuple[str, str]]:
    """The files of ``data`` and ``cond_data`` (paths relative to the folders ``where``) paired by relative
    path without the suffix (``a/0001.png`` with ``a/0001.jpg``): ``{stem: (data file, cond_data file)}`` in
    stem order. Two files of one side that differ only in suffix are an error, since either could be the
    other's partner; so is a file without a partner, the error counting them by side. Nothing is dropped
    silently."""
    sides = []
    for what, names in (("data", data), ("cond_data", cond_data)):
        by_stem: dict[str, str] = {}
        for name in names:
            stem = Path(name).with_suffix("").as_posix()
            if stem in by_stem:
                raise ValueError(f"{what}: two images are named {stem!r} (suffixes aside); a pair needs one of each")
            by_stem[stem] = name
        sides.append(by_stem)
    targets, conditions = sides
    unmatched = {
        f"in data, not in cond_data ({where[1]})": sorted(set(targets) - set(conditions)),
        f"in cond_data, not in data ({where[0]})": sorted(set(conditions) - set(targets)),
    }
    counts = [f"{len(names)} {why}: {', '.join(names[:3])}" for why, names in unmatched.items() if names]
    if counts:
        raise ValueError(f"data and cond_data must hold the same image names (any suffix): {'; '.join(counts)}")
    return {stem: (targets[stem], conditions[stem]) for stem in sorted(targets)}


def _select_classes(images: Tensor, labels: Tensor, classes: tuple[int, ...] | None, source: str) -> Dataset:
    if classes is not None:
        missing = sorted(set(classes) - set(labels.unique().tolist()))
        if missing:
            raise ValueError(f"classes={list(classes)}: labels {missing} do not occur in {source}")
        keep = torch.isin(labels, torch.tensor(classes))
        images, labels = images[keep], labels[keep]
    return Dataset(images=images, labels=labels)


def mnist(resolution: int, classes: tuple[int, ...] | None = None) -> Dataset:
    """The 5000 real MNIST digits (28x28, 500 per class) shipped with d2f; nothing is downloaded.

    They are read from ``d2f/assets/mnist_5k.npz`` (``images`` uint8 ``(5000, 28, 28)``, ``labels`` int64),
    loaded with ``allow_pickle=False``. Source and terms: ``d2f/assets/MNIST_LICENSE.md``.
    """
    path = Path(__file__).resolve().parent.parent / "assets" / "mnist_5k.npz"
    with np.load(path, allow_pickle=False) as archive:
        pixels, targets = archive["images"], archive["labels"]
    labels = torch.from_numpy(targets.astype(np.int64))
    images = torch.from_numpy(pixels.astype(np.float32)).reshape(-1, 1, 28, 28) / 127.5 - 1
    return _select_classes(resize(images, resolution), labels, classes, "mnist")


def digits(resolution: int, classes: tuple[int, ...] | None = None) -> Dataset:
    """sklearn's 1797 8x8 digits (values 0..16), upsampled."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise ImportError("data='digits' needs scikit-learn: pip install scikit-learn") from e
    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1) / 8 - 1
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    return _select_classes(resize(images, resolution), labels, classes, "digits")


def image_folder(path: Path, resolution: int, channels: int) -> Dataset:
    """Every readable PNG/JPEG under ``path`` (:func:`read_folder`), in file-name order."""
    return Dataset(images=torch.cat(list(read_folder(path, resolution, channels).values())))


def paired_folders(path: Path, cond_path: Path, resolution: int, channels: int) -> Dataset:
    """Targets from ``path`` and their condition images (``concat``) from ``cond_path``, both read as
    :func:`read_folder` reads them with ``channels`` channels, paired by :func:`pair_by_stem`."""
    targets = read_folder(path, resolution, channels, "data")
    conditions = read_folder(cond_path, resolution, channels, "cond_data")
    pairs = pair_by_stem(targets, conditions, (path, cond_path)).values()
    return Dataset(
        images=torch.cat([targets[a] for a, _ in pairs]), concat=torch.cat([conditions[b] for _, b in pairs])
    )
