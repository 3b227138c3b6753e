"""Image folders with captions, in the two layouts users already have.

- ``metadata.jsonl`` in the folder: one JSON object per line with ``file_name`` (the image's path relative to
  the folder) and a caption column (``caption_column``, default ``"text"``): the convention of diffusers'
  training scripts and the ``datasets`` library's image folders. Every image in the folder must be named.
- Otherwise a ``.txt`` file beside each image (``cat.png`` and ``cat.txt``), holding its caption.

Images are decoded as ``images.py`` decodes an image folder (:func:`~d2f.data.images.pixels`: EXIF rotation,
transparency onto white, 16-bit greyscale scaled), as RGB in [-1, 1], resized with antialiasing so the
shorter side is ``resolution`` and center-cropped to a square (:func:`~d2f.data.images.resize`). Unreadable images are
skipped and counted by reason in one warning; a missing caption, a caption column that does not exist or a
metadata line naming a missing file is an error naming the file. So is a link that leads outside the folder
(:func:`~d2f.data.images.folder_files`): what is trained on is what lies in the folder.

A flip (``flip=True``) mirrors each image with probability 1/2, drawn once per image from
``torch.Generator().manual_seed(seed)`` in the order of the sorted file names, so the same folder and seed
flip the same images whatever the batch size and whichever images turn out unreadable.
"""

from __future__ import annotations

import json
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import torch
from torch import Tensor

from .images import IMAGE_SUFFIXES, crop_box, folder_files, inside, pixels, resize

METADATA = "metadata.jsonl"


@dataclass
class Captions:
    """The captioned images of a folder, found but not decoded: ``files`` (paths relative to ``folder``, in
    sorted order) and their ``captions``; ``source`` says where the captions came from."""

    folder: Path
    files: list[str]
    captions: list[str]
    source: str  # "metadata.jsonl" or ".txt"
    ignored: list[str] = field(default_factory=list)  # files that are neither an image nor a caption
    used: list[str] = field(default_factory=list)  # every file the images and captions come from, sorted


@dataclass
class CaptionedImages:
    """Decoded images with their captions. ``images`` float32 ``(N, 3, R, R)`` in [-1, 1]; per image its
    ``original_sizes`` (height, width) and ``crops_top_left`` (top, left: where the square lies in the resized,
    and flipped where ``flipped``, image), as SDXL conditions on them; ``skipped`` maps a reason to the files
    skipped for it."""

    images: Tensor
    captions: list[str]
    files: list[str]
    original_sizes: Tensor  # int64 (N, 2)
    crops_top_left: Tensor  # int64 (N, 2)
    flipped: Tensor  # bool (N,)
    skipped: dict[str, list[str]] = field(default_factory=dict)
    ignored: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.files)

    @property
    def counts(self) -> dict[str, int | dict[str, int]]:
        """How many images were loaded, skipped (by reason) and how many files were ignored."""
        skipped = {reason: len(names) for reason, names in self.skipped.items()}
        return {"images": len(self.files), "skipped": skipped, "ignored": len(self.ignored)}


def _relative(folder: Path, file: Path) -> str:
    return file.relative_to(folder).as_posix()


def _metadata_captions(folder: Path, caption_column: str) -> dict[str, str]:
    """``file_name -> caption`` from ``folder/metadata.jsonl``, each line checked."""
    path = folder / METADATA
    try:
        # utf-8-sig: a byte order mark (Windows editors write one) is dropped, as the datasets library drops it
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a readable UTF-8 text file ({e})") from e
    captions: dict[str, str] = {}
    root = folder.resolve()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        name, caption = _row(line, where, caption_column)
        name = _file_name(folder, root, name, where)
        if name in captions:
            raise ValueError(f"{where}: file_name={name!r} is named a second time")
        captions[name] = caption
    return captions


def _row(line: str, where: str, caption_column: str) -> tuple[str, str]:
    """The file name and caption of one metadata line, its JSON and their types checked."""
    try:
        row = json.loads(line, object_pairs_hook=_unique_keys(where))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not a JSON object ({e})") from e
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object with file_name and {caption_column!r}, got {line!r}")
    if "file_name" not in row:
        raise ValueError(f"{where}: no 'file_name'; the line has the columns {sorted(row)}")
    if caption_column not in row:
        raise ValueError(
            f"{where}: no caption column {caption_column!r}; the line has the columns {sorted(row)} "
            "(choose one with caption_column / --caption-column)"
        )
    name, caption = row["file_name"], row[caption_column]
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: file_name={name!r}; expected a path relative to the folder")
    if not isinstance(caption, str):
        raise ValueError(f"{where}: {caption_column}={caption!r} is a {type(caption).__name__}; expected a string")
    return name, caption


def _unique_keys(where: str):
    """A ``json.loads`` hook refusing a key given twice in one object: JSON keeps the last silently, and which
    caption (or file) was meant cannot be known."""

    def hook(pairs: list[tuple[str, object]]) -> dict[str, object]:
        keys = [key for key, _ in pairs]
        for key in keys:
            if keys.count(key) > 1:
                raise ValueError(f"{where}: the key {key!r} appears twice in one line; give each column once")
        return dict(pairs)

    return hook


def _file_name(folder: Path, root: Path, name: str, where: str) -> str:
    """``name`` as a path inside ``folder`` (``root``, resolved), refused unless it names a file there, links
    resolved: a link out of the folder would bring in a file from elsewhere."""
    pure = PurePosixPath(name)
    if pure.is_absolute() or ".." in pure.parts or "\\" in name:
        raise ValueError(f"{where}: file_name={name!r}; expected a path inside {folder} (relative, no '..')")
    path = folder / pure
    if path.exists() and not inside(path, root):
        raise ValueError(
            f"{where}: file_name={name!r} leads outside {folder} (to {path.resolve()}); d2f reads only what lies "
            "inside the data folder"
        )
    if not path.is_file():
        raise ValueError(f"{where}: file_name={name!r} {_not_a_file(path)}")
    return pure.as_posix()


def _not_a_file(path: Path) -> str:
    """Why ``path`` is no file, with the name it may have been meant as: macOS writes decomposed Unicode names
    (NFD), an editor elsewhere composed ones (NFC), and the two differ byte for byte."""
    if path.is_dir():
        return "names a folder, not a file"
    wanted = unicodedata.normalize("NFC", path.name)
    if path.parent.is_dir():
        for other in path.parent.iterdir():
            if unicodedata.normalize("NFC", other.name) == wanted:
                return (
                    f"names no file in {path.parent}, which holds {other.name!r}: the same name written with other "
                    "Unicode code points (NFC and NFD); write the name as it is on disk"
                )
    return f"names a file that does not exist in {path.parent}"


def _missing(folder: Path, names: list[str], why: str) -> ValueError:
    examples = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    return ValueError(f"{folder}: {len(names)} image(s) have no caption ({why}): {examples}")


def find_captions(folder: str | Path, caption_column: str = "text") -> Captions:
    """The images of ``folder`` (recursively) with their captions, from ``metadata.jsonl`` if the folder holds
    one, else from a ``.txt`` beside each image. Nothing is decoded here."""
    folder = Path(folder)
    if not isinstance(caption_column, str) or not caption_column:
        raise ValueError(f"caption_column={caption_column!r}: the name of a column of {METADATA}")
    if not folder.is_dir():
        raise ValueError(f"data={str(folder)!r}: no such folder (an image folder with captions)")
    # Hidden files and folders (".DS_Store", "._photo.png", ".ipynb_checkpoints/") are not data.
    files = folder_files(folder, "data", hidden=False)
    images = [_relative(folder, p) for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if (folder / METADATA).exists() and not (folder / METADATA).is_file():
        raise ValueError(f"{folder / METADATA}: not a regular file (a folder?); the captions file must be one")
    if (folder / METADATA).is_file():
        by_name = _metadata_captions(folder, caption_column)
        missing = [name for name in images if name not in by_name]
        if missing:
            raise _missing(folder, missing, f"not named in {folder / METADATA}")
        names = sorted(by_name)  # may name files d2f cannot read (other suffixes): skipped when decoded
        used = set(names) | {METADATA}
        texts = [by_name[n] for n in names]
        return Captions(folder, names, texts, METADATA, _ignored(folder, files, used), sorted(used))
    texts = {name: (folder / name).with_suffix(".txt") for name in images}
    missing = [name for name, text in texts.items() if not text.is_file()]
    if missing:
        raise _missing(folder, missing, f"no .txt beside them and no {METADATA} in the folder")
    captions = []
    for text in texts.values():
        try:
            captions.append(text.read_text(encoding="utf-8").strip())
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{text}: not a readable UTF-8 caption file ({e})") from e
    used = set(images) | {_relative(folder, t) for t in texts.values()}
    return Captions(folder, images, captions, ".txt", _ignored(folder, files, used), sorted(used))


def _ignored(folder: Path, files: list[Path], used: set[str]) -> list[str]:
    return [name for name in (_relative(folder, p) for p in files) if name not in used]


class Unreadable(Exception):
    """An image file skipped, with the reason it is counted under and a detail for the warning."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def load_image(path: Path, resolution: int) -> tuple[Tensor, tuple[int, int], tuple[int, int], int]:
    """One image as float32 ``(3, R, R)`` in [-1, 1], its original (height, width), the crop's top-left in
    the resized image and the resized width; raises :class:`Unreadable` for a file d2f cannot decode."""
    from PIL import Image, ImageFile, UnidentifiedImageError

    if path.suffix.lower() not in IMAGE_SUFFIXES:
        raise Unreadable("not .png/.jpg/.jpeg", path.name)
    truncated_setting = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False  # PIL raises instead of filling the missing part with grey
    try:
        if path.stat().st_size == 0:
            raise Unreadable("empty", path.name)
        with Image.open(path) as im:
            im.load()  # open() only reads the header; truncation shows when the pixels are decoded
            array = pixels(im, 3)
    except UnidentifiedImageError as e:
        raise Unreadable("not an image", path.name) from e
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        reason = "truncated" if "truncated" in str(e) else "corrupt or unreadable"
        raise Unreadable(reason, f"{path.name} ({e})") from e
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = truncated_setting
    height, width = array.shape[:2]
    tensor = torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0) / 127.5 - 1
    top, left, _, resized_width = crop_box(height, width, resolution)
    return resize(tensor, resolution)[0], (height, width), (top, left), resized_width


def check_resolution(resolution: int) -> int:
    if not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 1:
        raise ValueError(f"resolution={resolution!r} is not allowed: a positive integer (pixels)")
    return resolution


def flips(n: int, flip: bool, seed: int) -> Tensor:
    """Which of ``n`` images are mirrored: each with probability 1/2 from ``seed`` (none without ``flip``)."""
    if not isinstance(flip, bool):
        raise ValueError(f"flip={flip!r} must be True or False")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed={seed!r} is not allowed: an integer >= 0")
    if not flip:
        return torch.zeros(n, dtype=torch.bool)
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < 0.5


def batches(
    captions: Captions, resolution: int, batch_size: int, flip: bool = False, seed: int = 0
) -> Iterator[CaptionedImages]:
    """The images of ``captions`` decoded ``batch_size`` at a time (the last batch may be smaller; a batch
    may be empty where every file in it is unreadable). After the last batch, one warning counts the skipped
    and ignored files; the skipped files are also in the last batch's ``skipped``."""
    check_resolution(resolution)
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: a positive integer")
    if not captions.files:
        raise ValueError(f"data={str(captions.folder)!r} holds no PNG or JPEG image")
    mirrored = flips(len(captions.files), flip, seed)
    skipped: dict[str, list[str]] = {}
    loaded = 0
    for start in range(0, len(captions.files), batch_size):
        rows = []
        for i in range(start, min(start + batch_size, len(captions.files))):
            name = captions.files[i]
            try:
                image, size, (top, left), resized_width = load_image(captions.folder / name, resolution)
            except Unreadable as e:
                skipped.setdefault(e.reason, []).append(e.detail)
                continue
            if mirrored[i]:  # the square's left edge, seen in the mirrored resized image
                image, left = image.flip(-1), resized_width - left - resolution
            rows.append((image, captions.captions[i], name, size, (top, left), bool(mirrored[i])))
        loaded += len(rows)
        last = start + batch_size >= len(captions.files)
        if last:
            warn_skipped(captions, skipped, loaded)
        yield _stack(rows, resolution, skipped if last else {}, captions.ignored if last else [])


def _stack(rows, resolution: int, skipped, ignored) -> CaptionedImages:
    images, texts, names, sizes, crops, mirrored = zip(*rows) if rows else ((), (), (), (), (), ())
    return CaptionedImages(
        images=torch.stack(images) if images else torch.zeros(0, 3, resolution, resolution),
        captions=list(texts),
        files=list(names),
        original_sizes=torch.tensor(sizes, dtype=torch.int64).reshape(-1, 2),
        crops_top_left=torch.tensor(crops, dtype=torch.int64).reshape(-1, 2),
        flipped=torch.tensor(mirrored, dtype=torch.bool),
        skipped=dict(skipped),
        ignored=list(ignored),
    )


def warn_skipped(captions: Captions, skipped: dict[str, list[str]], loaded: int) -> None:
    """One warning counting the skipped files by reason and the ignored ones, as ``image_folder`` warns."""
    parts = []
    if skipped:
        n_skipped = sum(len(names) for names in skipped.values())
        reasons = "; ".join(f"{why}: {len(names)} ({', '.join(names[:3])})" for why, names in skipped.items())
        parts.append(f"skipped {n_skipped} unreadable file(s) [{reasons}]")
    if captions.ignored:
        examples = ", ".join(captions.ignored[:3])
        parts.append(f"ignored {len(captions.ignored)} file(s) that are neither an image nor a caption ({examples})")
    if parts:
        warnings.warn(f"{captions.folder}: {'; '.join(parts)}; loaded {loaded} image(s)", stacklevel=3)
    if loaded == 0:
        raise ValueError(f"data={str(captions.folder)!r} holds no readable PNG or JPEG image")


def read_captioned(
    folder: str | Path, resolution: int, caption_column: str = "text", flip: bool = False, seed: int = 0
) -> CaptionedImages:
    """Every captioned image of ``folder`` decoded, center-cropped and resized to ``resolution``, in memory
    (for a large folder, :func:`batches` decodes a batch at a time)."""
    captions = find_captions(folder, caption_column)
    (everything,) = batches(captions, resolution, max(1, len(captions.files)), flip, seed)
    return everything


__all__ = ["CaptionedImages", "Captions", "batches", "find_captions", "read_captioned"]
