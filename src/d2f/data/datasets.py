"""A run's data set from any source (:func:`load_dataset`): the embedded MNIST digits, sklearn's 8x8 digits, an
image folder (``images.py``), or precomputed latents, used as they are.

Latent files (``.safetensors`` or ``.npy``): the key ``latents`` (or the ``.npy`` array itself) holds
``(N, C, H, W)`` float latents, already scaled as the model expects (e.g. SD's VAE factor 0.18215).
Optional keys: ``labels`` ``(N,)`` int64 class labels, ``encoder_hidden_states`` ``(N, L, D)`` text
embeddings with ``null_encoder_hidden_states`` ``(L, D)`` (or ``(1, L, D)``) for conditioning dropout, ``concat``
``(N, C', H, W)`` channels appended to the network input (image-to-X tasks), and SDXL's ``text_embeds``
``(N, P)`` with ``null_text_embeds`` ``(P,)`` and ``time_ids`` ``(N, 6)``. ``d2f encode`` writes them all.

A conditions file (``--cond-data`` of ``d2f train``, ``d2f sample`` and ``d2f eval --task dense``) gives its
conditions under ``concat`` when it has that key (``d2f encode --cond-data`` writes them there, beside their
targets under ``latents``), else as its ``latents`` when it holds nothing else (or as a ``.npy`` array). A file
with ``latents`` and other keys but no ``concat`` is a data file of targets, and is refused as conditions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .._checks import check_positive_int
from .images import Dataset, digits, image_folder, mnist, paired_folders, read_folder

OPTIONAL = [f.name for f in dataclasses.fields(Dataset) if f.name not in ("images", "noise")]


def _tensors(path: Path, what: str) -> dict[str, Tensor]:
    """A latents file's tensors by key (a ``.npy`` array as ``latents``), with floating-point ``latents`` and
    no key :class:`Dataset` does not know; ``.npy`` files are read with ``allow_pickle=False``, so an object
    array is refused."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        if path.suffix == ".npy":
            tensors = {"latents": torch.from_numpy(np.load(path, allow_pickle=False))}
        else:
            tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{what}={str(path)!r}: not a readable latents file ({e})") from e
    unknown = set(tensors) - {"latents", *OPTIONAL}
    if "latents" not in tensors or unknown:
        raise ValueError(
            f"{path}: a latents file needs the key 'latents' and may hold {', '.join(OPTIONAL)}; "
            f"found {sorted(tensors)}"
        )
    if not tensors["latents"].is_floating_point():  # integers or bools made float would pass for latents
        raise ValueError(f"{path}: latents have dtype {tensors['latents'].dtype}; latents are floating-point values")
    return tensors


def latents(path: Path, what: str = "data") -> Dataset:
    """A latents file, given as the argument ``what``, checked key by key."""
    tensors = _tensors(path, what)
    data = Dataset(images=tensors["latents"].float(), **{name: tensors.get(name) for name in OPTIONAL})
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
    """The conditions in the latents file ``path`` (:func:`condition_latents`) for ``data``'s samples, in order."""
    if path.suffix not in (".safetensors", ".npy") or not path.is_file():
        raise ValueError(f"cond_data={str(path)!r}: the conditions of a latents file are another latents file")
    if data.concat is not None:
        raise ValueError(f"cond_data={str(path)!r}: the data already holds concat conditions; give one or the other")
    conditions = condition_latents(path)[0]
    if conditions.shape[0] != len(data) or conditions.shape[2:] != data.images.shape[2:]:
        raise ValueError(
            f"cond_data={str(path)!r} holds {tuple(conditions.shape)}; the data's latents are "
            f"{tuple(data.images.shape)}: one condition per sample, of the same height and width"
        )
    return conditions


def condition_latents(path: Path) -> tuple[Tensor, str]:
    """The conditions the latents file ``path`` holds and the key they came from: ``concat`` where it has one,
    else the ``latents`` of a file that holds nothing else (see the module's docstring); finite."""
    data = latents(path, "cond_data")
    if data.concat is not None:
        return data.concat, "concat"  # latents() has checked it
    others = [name for name in OPTIONAL if getattr(data, name) is not None]
    if others:
        raise ValueError(
            f"cond_data={str(path)!r} holds latents with {', '.join(others)} but no concat: a data file of targets, "
            "not conditions; give a file with the conditions under concat (d2f encode --cond-data) or alone under "
            "latents"
        )
    if not bool(torch.isfinite(data.images).all()):
        raise ValueError(f"cond_data={str(path)!r}: latents holds NaN or inf")
    return data.images, "latents"


def sample_conditions(cond: str, export: str, resolution: int | None, num_samples: int) -> Tensor:
    """``--cond-data`` of ``d2f sample``: the first ``num_samples`` conditions for the export ``export``, from an
    image folder (read at ``resolution``, default the export's) or a latents file (:func:`condition_latents`, at
    its own size); refused for an export trained without conditions, and for a pipeline's UNet, which d2f sample
    cannot give its text embeddings."""
    from ..networks.export import read_model
    from ..networks.sampling import text_unet_error

    check_positive_int("num_samples", num_samples)
    meta = read_model(export).meta
    channels = meta.get("cond_channels")
    if not channels:
        raise ValueError(f"--cond-data {cond}: {export} was trained without conditions")
    if meta.get("pipeline"):
        raise text_unet_error(export, meta)
    path = Path(cond)
    if path.is_dir():
        concat = torch.cat(list(read_folder(path, resolution or meta["resolution"], channels, "cond_data").values()))
    elif path.suffix in (".safetensors", ".npy") and path.is_file():
        concat = _file_conditions(path, channels, resolution)
    else:
        raise ValueError(f"--cond-data {cond}: expected a folder of images or a .safetensors / .npy latents file")
    return concat[:num_samples]


def _file_conditions(path: Path, channels: int, resolution: int | None) -> Tensor:
    """A latents file's conditions, refused unless there is at least one, each ``(channels, H, W)``, at
    ``resolution`` when it is given."""
    concat, key = condition_latents(path)
    name = f"cond_data={str(path)!r}"
    if concat.ndim != 4:
        raise ValueError(f"{name}: {key} has shape {tuple(concat.shape)}; conditions are (N, C, H, W)")
    if not len(concat):
        raise ValueError(f"{name} holds no conditions ({key} has shape {tuple(concat.shape)})")
    if concat.shape[1] != channels:
        raise ValueError(f"{name}: {key} has {concat.shape[1]} channels; the export takes {channels} per condition")
    if resolution is not None and tuple(concat.shape[2:]) != (resolution, resolution):
        raise ValueError(
            f"resolution={resolution}: the conditions in {name} are {concat.shape[2]}x{concat.shape[3]}, the size "
            "the samples take; leave --resolution unset"
        )
    return concat
