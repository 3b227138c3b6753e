"""A run's data set from any source (:func:`load_dataset`): the embedded MNIST digits, sklearn's 8x8 digits, an
image folder (``images.py``), or precomputed latents, used as they are.

Latent files (``.safetensors`` or ``.npy``): the key ``latents`` (or the ``.npy`` array itself) holds
``(N, C, H, W)`` float latents, already scaled as the model expects (e.g. SD's VAE factor 0.18215).
Optional keys: ``labels`` ``(N,)`` int64 class labels, ``encoder_hidden_states`` ``(N, L, D)`` text
embeddings with ``null_encoder_hidden_states`` ``(L, D)`` (or ``(1, L, D)``) for conditioning dropout, ``concat``
``(N, C', H, W)`` channels appended to the network input (image-to-X tasks), and SDXL's ``text_embeds``
``(N, P)`` with ``null_text_embeds`` ``(P,)`` and ``time_ids`` ``(N, 6)``. ``d2f encode`` writes them all.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .images import Dataset, digits, image_folder, mnist, paired_folders


def latents(path: Path) -> Dataset:
    """A latents file; ``.npy`` files are read with ``allow_pickle=False``, so an object array is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".npy":
            return Dataset(images=torch.from_numpy(np.load(path, allow_pickle=False)).float())
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"data={str(path)!r}: not a readable latents file ({e})") from e
    optional = [f.name for f in dataclasses.fields(Dataset) if f.name not in ("images", "noise")]
    unknown = set(tensors) - {"latents", *optional}
    if "latents" not in tensors or unknown:
        raise ValueError(
            f"{path}: a latents file needs the key 'latents' and may hold {', '.join(optional)}; "
            f"found {sorted(tensors)}"
        )
    data = Dataset(images=tensors["latents"].float(), **{name: tensors.get(name) for name in optional})
    n = len(data)
    for name in ("labels", "encoder_hidden_states", "concat", "text_embeds", "time_ids"):
        value = getattr(data, name)
        if value is not None and value.shape[0] != n:
            raise ValueError(f"{path}: {name} has {value.shape[0]} entries but latents has {n}")
    labels = data.labels
    # Checked here: a bad label would otherwise fail inside the network's embedding (on a GPU, as a
    # device-side assert that names nothing).
    if labels is not None:
        if labels.dtype not in (torch.int64, torch.int32):  # what an embedding takes
            raise ValueError(f"{path}: labels have dtype {labels.dtype}; class labels must be int64 or int32")
        if labels.ndim != 1 or (labels.numel() and int(labels.min()) < 0):
            low = int(labels.min()) if labels.numel() else None
            raise ValueError(
                f"{path}: labels must be one label >= 0 per sample; got shape {tuple(labels.shape)}, min {low}"
            )
    for null, of in (("null_encoder_hidden_states", "encoder_hidden_states"), ("null_text_embeds", "text_embeds")):
        value, per_sample = getattr(data, null), getattr(data, of)
        if value is not None and per_sample is not None and value.shape == (1, *per_sample.shape[1:]):
            value = value[0]  # a batch of one, as files written before d2f encode hold it
            setattr(data, null, value)
        if value is not None and (per_sample is None or value.shape != per_sample.shape[1:]):
            want = tuple(per_sample.shape[1:]) if per_sample is not None else f"{of} beside it"
            raise ValueError(f"{path}: {null} has shape {tuple(value.shape)}; it must be one sample's, {want}")
    if data.time_ids is not None and tuple(data.time_ids.shape) != (n, 6):
        raise ValueError(f"{path}: time_ids has shape {tuple(data.time_ids.shape)}; SDXL's are ({n}, 6)")
    conditions = ("encoder_hidden_states", "null_encoder_hidden_states", "concat", "text_embeds", "null_text_embeds")
    for name in (*conditions, "time_ids"):
        value = getattr(data, name)
        if value is not None and not (value.is_floating_point() and bool(torch.isfinite(value).all())):
            raise ValueError(f"{path}: {name} must be finite floating-point values (dtype {value.dtype})")
    return data


def load_dataset(
    spec: str,
    resolution: int,
    channels: int,
    classes: tuple[int, ...] | None = None,
    cond: str | None = None,
) -> Dataset:
    """``spec``: ``mnist``, ``digits``, an image folder, or a ``.safetensors`` / ``.npy`` latents file.

    ``cond`` gives each sample a condition (``concat``): with an image folder, a folder of images paired with
    it by name (:func:`paired_folders`, both read with ``channels`` channels); with a latents file, another
    latents file whose ``latents`` are the conditions, sample for sample. ``channels`` is the model's input
    channel count: the images' channels plus the concat channels, or the images' channels alone for a model
    that will be widened to take the concat channels (``networks/widen.py``).
    """
    if cond is not None and spec in ("mnist", "digits"):
        raise ValueError(f"cond_data={cond!r} pairs conditions with an image folder or a latents file, not {spec!r}")
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
        if path.is_dir() and cond is not None:
            if not Path(cond).is_dir():
                raise ValueError(f"cond_data={cond!r}: the conditions of an image folder are a folder of images")
            data = paired_folders(path, Path(cond), resolution, channels)
        elif path.is_dir():
            data = image_folder(path, resolution, channels)  # image folders carry no concat channels
        elif path.suffix in (".safetensors", ".npy"):
            data = latents(path)
            if cond is not None:
                data.concat = _conditions(data, Path(cond))
        else:
            raise ValueError(f"data={spec!r}: expected a folder of images or a .safetensors / .npy latents file")
    if len(data) == 0:
        raise ValueError(f"data={spec!r} is empty")
    extra = data.concat.shape[1] if data.concat is not None else 0
    fits = data.images.shape[1] + extra == channels or (extra and data.images.shape[1] == channels)
    if data.images.ndim != 4 or not fits:
        raise ValueError(
            f"data={spec!r} gives images of shape {tuple(data.images.shape[1:])}"
            + (f" plus {extra} concat channel(s)" if extra else "")
            + f", but the model takes {channels} input channel(s)"
            + (" (or that many image channels, widened for the concat ones)" if extra else "")
        )
    if not bool(torch.isfinite(data.images).all()):
        raise ValueError(f"data={spec!r} contains NaN or inf")
    return data


def _conditions(data: Dataset, path: Path) -> Tensor:
    """The ``latents`` of the latents file ``path`` as the conditions of ``data``'s samples, in order."""
    if path.suffix not in (".safetensors", ".npy") or not path.is_file():
        raise ValueError(f"cond_data={str(path)!r}: the conditions of a latents file are another latents file")
    if data.concat is not None:
        raise ValueError(f"cond_data={str(path)!r}: the data already holds concat conditions; give one or the other")
    conditions = latents(path).images
    if conditions.shape[0] != len(data) or conditions.shape[2:] != data.images.shape[2:]:
        raise ValueError(
            f"cond_data={str(path)!r} holds {tuple(conditions.shape)}; the data's latents are "
            f"{tuple(data.images.shape)}: one condition per sample, of the same height and width"
        )
    if not bool(torch.isfinite(conditions).all()):
        raise ValueError(f"cond_data={str(path)!r} contains NaN or inf")
    return conditions


def sample_conditions(cond: str, export: str, resolution: int | None, num_samples: int) -> Tensor:
    """``--cond-data`` of ``d2f sample``: the first ``num_samples`` conditions for the export ``export``, from an
    image folder (read at ``resolution``, default the export's) or a latents file; refused for an export trained
    without conditions."""
    from ..networks.export import read_export
    from ..networks.teachers import teacher_path

    meta = read_export(teacher_path() if export == "teacher" else Path(export)).meta
    path = Path(cond)
    if not meta.get("cond_channels"):
        raise ValueError(f"--cond-data {cond}: {export} was trained without conditions")
    if path.is_dir():
        concat = image_folder(path, resolution or meta["resolution"], meta["cond_channels"]).images
    elif path.suffix in (".safetensors", ".npy") and path.is_file():
        concat = latents(path).images
    else:
        raise ValueError(f"--cond-data {cond}: expected a folder of images or a .safetensors / .npy latents file")
    return concat[:num_samples]
