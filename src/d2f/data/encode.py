"""Encode a captioned image folder once with a diffusers pipeline's own VAE and text encoder(s): the latents
file ``d2f train`` trains on (``d2f encode``).

What is computed, as the pipelines themselves compute it:

- ``latents`` float32 ``(N, C, R/f, R/f)``: the VAE's ``latent_dist`` mean (or, with ``sample``, a draw
  ``mean + std * noise``, the noise drawn image by image from ``torch.Generator().manual_seed(seed)``),
  then ``(latent - shift_factor) * scaling_factor`` (``shift_factor`` where the VAE config has one).
- SD 1.x / 2.x (``StableDiffusionPipeline``): ``encoder_hidden_states`` ``(N, L, D)``, the text encoder's
  last hidden state for each caption padded to the tokenizer's ``model_max_length``, as
  ``StableDiffusionPipeline.encode_prompt``; ``null_encoder_hidden_states`` ``(L, D)``, the same for "".
- SDXL (``StableDiffusionXLPipeline``): ``encoder_hidden_states`` ``(N, L, D1 + D2)``, both encoders'
  penultimate hidden states concatenated; ``text_embeds`` ``(N, P)``, the pooled (projected) embedding of the
  second encoder; ``time_ids`` ``(N, 6)``: original height and width, the crop's top and left in the resized
  image, and the target size ``(R, R)``, as ``StableDiffusionXLPipeline.encode_prompt`` and
  ``_get_add_time_ids`` compute them. The null embeddings ``null_encoder_hidden_states`` ``(L, D1 + D2)`` and
  ``null_text_embeds`` ``(P,)`` are what the pipeline guides with when given no negative prompt: zeros where
  its ``force_zeros_for_empty_prompt`` is set (SDXL base's own setting), else the encoding of "".

The file's safetensors metadata ``d2f`` holds a ``d2f.encoded`` document: the settings, fingerprints of the
data folder (file names, sizes and modification times, hashed) and of the pipeline's VAE, text encoders and
tokenizers (a hash of the files' bytes, :func:`content_fingerprint`) and counts. :func:`check_encoded` refuses a
file whose data or settings differ from a new request. Images are decoded a batch at a time
(``captions.batches``), so memory holds one batch of pixels.

Before any image is encoded, every weights file passes the safetensors gate, every weight is finite, and the
configs are ones the pipeline itself could run (a finite, positive ``scaling_factor``, a VAE taking RGB, a
tokenizer whose ``model_max_length`` the text encoder covers); each batch's outputs are checked as they come,
so a NaN is refused naming its images and nothing is written.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from .._backend import device_or_default
from .._files import output_path, write_safetensors
from .._versioned import Document
from ..networks.export import model_folder
from ..networks.models import check_pipeline_folder, load_model, load_pretrained
from .captions import Captions, Unreadable, batches, check_resolution, find_captions, flips, load_image
from .images import IMAGE_SUFFIXES, folder_files, pair_by_stem

# What must match for an encoded file to stand for a new request (paths may move; the fingerprints may not).
IDENTITY = (
    "kind",
    "resolution",
    "caption_column",
    "flip",
    "sample",
    "seed",
    "data_fingerprint",
    "pretrained_fingerprint",
    "cond_fingerprint",
)
ENCODED = Document(
    "d2f.encoded",
    1,
    frozenset(IDENTITY) - {"cond_fingerprint"}
    | {"pretrained", "data", "captions", "null", "scaling_factor", "shift_factor", "images", "skipped", "truncated"},
    optional=frozenset({"cond_data", "cond_fingerprint"}),  # image-to-X pairs; files written before have none
    types={
        "pretrained": (str,),
        "kind": (str,),
        "resolution": (int,),
        "caption_column": (str,),
        "flip": (bool,),
        "sample": (bool,),
        "seed": (int,),
        "data": (str,),
        "images": (int,),
        "skipped": (dict,),
        "truncated": (int,),
        "scaling_factor": (int, float),
        "shift_factor": (int, float, type(None)),
        "data_fingerprint": (str,),
        "pretrained_fingerprint": (str,),
        "cond_fingerprint": (str, type(None)),
    },
)


KINDS = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
# The components d2f encode loads: the library model_index.json must name for each (d2f loads it with that
# library whatever the index says), the classes it accepts, and the weights file it is saved under.
COMPONENTS = {
    "vae": ("diffusers", {"AutoencoderKL"}, "diffusion_pytorch_model"),
    "text_encoder": ("transformers", {"CLIPTextModel"}, "model"),
    "tokenizer": ("transformers", {"CLIPTokenizer", "CLIPTokenizerFast"}, None),
    "text_encoder_2": ("transformers", {"CLIPTextModelWithProjection"}, "model"),
    "tokenizer_2": ("transformers", {"CLIPTokenizer", "CLIPTokenizerFast"}, None),
}
NEEDS = {"sd": ("vae", "text_encoder", "tokenizer"), "sdxl": tuple(COMPONENTS)}
# The files a CLIP tokenizer's vocabulary comes from (the fast one's, or the slow one's beside merges.txt).
VOCABULARIES = ("tokenizer.json", "vocab.json")
# Each tokenizer and the text encoder it feeds.
ENCODERS = {
    "sd": [("tokenizer", "text_encoder")],
    "sdxl": [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")],
}


def _present(index: dict, name: str) -> bool:
    entry = index.get(name)
    return isinstance(entry, list) and len(entry) == 2 and entry[0] is not None and entry[1] is not None


def find_pipeline(pretrained: str | Path, kind: str | None = None) -> tuple[Path, dict, str]:
    """The pipeline folder (``pretrained``: a folder, ``"miniature"`` for the shipped one, or the folder above a
    ``unet/`` given), its
    ``model_index.json`` and its kind, ``"sd"`` or ``"sdxl"``; refused unless it holds what encoding needs,
    or when ``kind`` is given and the pipeline is of the other kind."""
    from .._files import read_json

    if kind is not None and kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not allowed: 'sd' (SD 1.x/2.x), 'sdxl' or None (the pipeline's own)")
    folder = model_folder(str(pretrained)).resolve()
    if not (folder / "model_index.json").is_file() and (folder.parent / "model_index.json").is_file():
        folder = folder.parent
    if not (folder / "model_index.json").is_file():
        raise ValueError(
            f"pretrained={str(pretrained)!r}: not a diffusers pipeline folder (no model_index.json); encoding needs "
            "a pipeline's VAE and text encoder(s)"
        )
    index = read_json(folder / "model_index.json")
    if not isinstance(index, dict):
        raise ValueError(f"{folder / 'model_index.json'}: expected a JSON object")
    name = index.get("_class_name")
    for other in ("transformer", "text_encoder_3"):
        if _present(index, other):
            raise ValueError(
                f"{folder}: a {name} (it has {other}/); d2f encodes for {' and '.join(KINDS.values())} only"
            )
    force = index.get("force_zeros_for_empty_prompt", True)
    if not isinstance(force, bool):  # a "false" string would be taken as not True, silently
        raise ValueError(f"{folder / 'model_index.json'}: force_zeros_for_empty_prompt={force!r} must be true or false")
    found = "sdxl" if _present(index, "text_encoder_2") or _present(index, "tokenizer_2") else "sd"
    if kind is not None and kind != found:
        raise ValueError(
            f"pretrained={str(pretrained)!r} is an {'SDXL' if found == 'sdxl' else 'SD 1.x/2.x'} pipeline ({name}"
            + (", with text_encoder_2 and tokenizer_2" if found == "sdxl" else ", with one text encoder")
            + f"), but kind={kind!r} asks for {'an SDXL' if kind == 'sdxl' else 'an SD 1.x/2.x'} one ({KINDS[kind]})"
        )
    for component in NEEDS[found]:
        _check_component(folder, index, component, NEEDS[found])
    return folder, index, found


def _check_component(folder: Path, index: dict, component: str, needs: tuple[str, ...]) -> None:
    if not _present(index, component) or not (folder / component).is_dir():
        why = "no such folder" if _present(index, component) else "model_index.json names none"
        raise ValueError(f"{folder}: the pipeline has no {component}/ ({why}); encoding needs its {', '.join(needs)}")
    library, classes, _ = COMPONENTS[component]
    if index[component][1] not in classes:
        raise ValueError(
            f"{folder / 'model_index.json'}: {component} is a {index[component][1]}; d2f encodes with "
            f"{' or '.join(sorted(classes))}"
        )
    if index[component][0] != library:  # d2f would load it with its own library all the same
        raise ValueError(
            f"{folder / 'model_index.json'}: {component}={index[component]!r} names the library "
            f"{index[component][0]!r}; d2f encodes with {library}.{index[component][1]} only"
        )


def _load(folder: Path, index: dict, kind: str, device) -> dict[str, Any]:
    """The VAE, text encoder(s) and tokenizer(s), each weights file through the safetensors gate first, each
    model refused unless its weights are all there, floating-point and finite (``models.load_model``)."""
    try:
        import diffusers
        import transformers
    except ImportError as e:
        raise ImportError("encoding needs diffusers and transformers: pip install diffusers transformers") from e
    check_pipeline_folder(folder, skip=("unet",))  # the UNet is not read here
    loaded = {}
    for name in NEEDS[kind]:
        library, _, weights = COMPONENTS[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, index[name][1])
        if weights is None:
            loaded[name] = load_pretrained(cls, folder / name)
            continue
        # The weights this loader reads, whatever model_index.json says. diffusers casts with torch_dtype (a
        # later .to(dtype) warns); the encoders run in fp32.
        options = {"torch_dtype": torch.float32} if library == "diffusers" else {}
        model = load_model(cls, folder / name, weights, **options)
        model = model if library == "diffusers" else model.to(torch.float32)
        loaded[name] = model.to(device).eval().requires_grad_(False)
    return loaded


def _check_unet(folder: Path, kind: str, width: int, pooled: int | None) -> None:
    """Refuse a pipeline whose UNet could not take what is encoded, before anything is encoded."""
    from .._files import read_json

    config_file = folder / "unet" / "config.json"
    if not config_file.is_file():
        return
    config = read_json(config_file)
    cross = config.get("cross_attention_dim")
    if isinstance(cross, int) and cross != width:
        raise ValueError(
            f"{config_file}: cross_attention_dim={cross}, but the text encoder(s) give {width} wide states"
        )
    added = config.get("addition_embed_type")
    if kind == "sd" and added == "text_time":
        raise ValueError(
            f"{config_file}: addition_embed_type='text_time' is SDXL's UNet, but the pipeline has no text_encoder_2"
        )
    if kind == "sdxl":
        if added != "text_time":
            raise ValueError(f"{config_file}: addition_embed_type={added!r}; an SDXL UNet takes 'text_time'")
        time_dim, expected = config.get("addition_time_embed_dim"), config.get("projection_class_embeddings_input_dim")
        if not isinstance(time_dim, int) or expected != 6 * time_dim + pooled:
            raise ValueError(
                f"{config_file}: projection_class_embeddings_input_dim={expected!r}; six time ids of "
                f"addition_time_embed_dim={time_dim!r} plus text_encoder_2's projection_dim={pooled} give "
                f"{6 * time_dim + pooled if isinstance(time_dim, int) else '?'}"
            )


class _TextEncoder:
    """Captions to the pipeline's prompt embeddings (and SDXL's pooled embedding), as ``encode_prompt``."""

    def __init__(self, models: dict[str, Any], kind: str, device):
        self.kind, self.device = kind, device
        self.pairs = [(models[t], models[e]) for t, e in ENCODERS[kind]]
        self.truncated = 0

    def _ids(self, tokenizer, captions: list[str]):
        length = tokenizer.model_max_length  # padded to it, as encode_prompt pads
        return tokenizer(captions, padding="max_length", max_length=length, truncation=True, return_tensors="pt")

    @torch.no_grad()
    def __call__(self, captions: list[str], count: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        if count:  # a prompt longer than model_max_length is cut, as the pipelines cut it (they warn)
            long = [False] * len(captions)
            for tokenizer, _ in self.pairs:
                lengths = [len(ids) for ids in tokenizer(captions).input_ids]
                long = [a or n > tokenizer.model_max_length for a, n in zip(long, lengths)]
            self.truncated += sum(long)
        if self.kind == "sd":
            tokenizer, encoder = self.pairs[0]
            inputs = self._ids(tokenizer, captions)
            mask = (
                inputs.attention_mask.to(self.device) if getattr(encoder.config, "use_attention_mask", False) else None
            )
            return encoder(inputs.input_ids.to(self.device), attention_mask=mask)[0].float().cpu(), None
        states, pooled = [], None
        for tokenizer, encoder in self.pairs:
            out = encoder(self._ids(tokenizer, captions).input_ids.to(self.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled embedding: text_encoder_2's
                pooled = out[0]
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1).float().cpu(), pooled.float().cpu()


def scaled_latents(vae, z: torch.Tensor) -> torch.Tensor:
    """What the UNet sees of a VAE latent ``z``: ``(z - shift_factor) * scaling_factor``."""
    shift = getattr(vae.config, "shift_factor", None)
    return (z - shift if shift is not None else z) * vae.config.scaling_factor


def vae_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to scaled latents by the ``latent_dist`` mean (how conditions are encoded)."""
    return scaled_latents(vae, vae.encode(images.to(vae.dtype)).latent_dist.mean)


def vae_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents back to images in [-1, 1] (the pipelines' decode: unscale, unshift, ``decode``)."""
    shift = getattr(vae.config, "shift_factor", None)
    z = latents.to(vae.dtype) / vae.config.scaling_factor
    return vae.decode(z + shift if shift is not None else z).sample.clamp(-1, 1)


def load_vae(pretrained: str | Path, device=None):
    """The VAE of the pipeline ``pretrained`` (through the safetensors gate), in fp32 and eval mode."""
    import diffusers

    folder, _, _ = find_pipeline(pretrained)
    vae = load_model(diffusers.AutoencoderKL, folder / "vae", COMPONENTS["vae"][2])
    _check_scaling(vae, folder)
    return vae.to(device or "cpu", torch.float32).eval().requires_grad_(False)


def empty_prompt(pretrained: str | Path, device=None) -> dict[str, torch.Tensor]:
    """The UNet kwargs of the empty prompt for an SD 1.x/2.x pipeline, ``{"encoder_hidden_states": (1, L, D)}``,
    as ``encode`` computes its null embedding (image-to-X models are conditioned on it, as Marigold's are)."""
    folder, index, kind = find_pipeline(pretrained)
    if kind != "sd":
        raise ValueError(
            f"pretrained={str(pretrained)!r} is an SDXL pipeline; dense prediction is built for SD 1.x/2.x pipelines "
            "(an SDXL UNet also needs pooled text embeddings and time ids)"
        )
    device = torch.device(device or "cpu")
    models = _load(folder, index, kind, device)
    with torch.no_grad():
        states, _ = _TextEncoder(models, kind, device)([""], count=False)
    return {"encoder_hidden_states": states}


def _check_options(batch_size, sample, out) -> Path | None:
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} is not allowed: a positive integer")
    if not isinstance(sample, bool):
        raise ValueError(f"sample={sample!r} must be True or False")
    if out is None:
        return None
    if Path(out).suffix != ".safetensors":
        raise ValueError(f"out={str(out)!r}: the latents file is written as .safetensors")
    return output_path(out)


def vae_factor(vae_config) -> int:
    """Pixels per latent pixel along a side: the VAE's downsampling, 2 ** (its down blocks - 1)."""
    return 2 ** (len(vae_config["block_out_channels"]) - 1)


def latent_side(pretrained: str | Path, resolution: int) -> int:
    """The latent side of ``resolution`` px images in the pipeline ``pretrained``'s VAE (read from its config);
    a resolution that is not a multiple of the VAE's downsampling is refused."""
    from .._files import read_json

    folder, _, _ = find_pipeline(pretrained)
    factor = vae_factor(read_json(folder / "vae" / "config.json"))
    if resolution % factor:
        raise ValueError(f"resolution={resolution} is not allowed for {folder / 'vae'}: a multiple of {factor}")
    return resolution // factor


def _encoders(folder: Path, index: dict, kind: str, resolution: int, device) -> tuple[Any, _TextEncoder]:
    """The pipeline's VAE and text encoder(s), refused unless the VAE can encode at ``resolution`` the way d2f
    scales latents."""
    models = _load(folder, index, kind, device)
    vae = models["vae"]
    factor = vae_factor(vae.config)
    if resolution % factor:
        raise ValueError(
            f"resolution={resolution} is not allowed for {folder / 'vae'}: a multiple of {factor}, the VAE's "
            "downsampling factor"
        )
    if getattr(vae.config, "latents_mean", None) is not None or getattr(vae.config, "latents_std", None) is not None:
        raise ValueError(
            f"{folder / 'vae' / 'config.json'}: latents_mean / latents_std are set; d2f encodes with "
            "scaling_factor (and shift_factor) only"
        )
    if vae.config.in_channels != 3:  # captions.batches decodes every image (and condition) as RGB
        raise ValueError(
            f"{folder / 'vae' / 'config.json'}: in_channels={vae.config.in_channels!r}; d2f encode feeds the VAE "
            "RGB images (3 channels)"
        )
    _check_scaling(vae, folder)
    _check_tokenizers(folder, models, kind)
    return vae, _TextEncoder(models, kind, device)


def _check_scaling(vae, folder: Path) -> None:
    """Refuse a ``scaling_factor`` or ``shift_factor`` that is no finite number (a NaN one makes every latent
    NaN, a string one a TypeError mid-run) or a scaling factor that is not positive (zero latents)."""
    where = folder / "vae" / "config.json"
    scaling, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None)
    if not _finite_number(scaling) or scaling <= 0:
        raise ValueError(f"{where}: scaling_factor={scaling!r} is not allowed: a finite number > 0")
    if shift is not None and not _finite_number(shift):
        raise ValueError(f"{where}: shift_factor={shift!r} is not allowed: a finite number, or null for none")


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_tokenizers(folder: Path, models: dict[str, Any], kind: str) -> None:
    """Refuse a tokenizer whose ids its text encoder cannot take. Prompts are padded to ``model_max_length``
    (as ``encode_prompt`` pads them; where ``tokenizer_config.json`` sets none, transformers takes 1e30 and the
    pipeline itself fails), which the encoder's ``max_position_embeddings`` must cover; and every token id
    must index the encoder's vocabulary."""
    from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

    for tokenizer_name, encoder_name in ENCODERS[kind]:
        tokenizer, config = models[tokenizer_name], models[encoder_name].config
        if not any((folder / tokenizer_name / file).is_file() for file in VOCABULARIES):
            raise ValueError(
                f"{folder / tokenizer_name}: no {' or '.join(VOCABULARIES)}; transformers would build a tokenizer "
                "that knows no word from the rest"
            )
        length, limit = tokenizer.model_max_length, config.max_position_embeddings
        if isinstance(length, bool) or not isinstance(length, int) or not 1 <= length <= limit:
            given = "sets no model_max_length" if length == VERY_LARGE_INTEGER else f"model_max_length={length!r}"
            raise ValueError(
                f"{folder / tokenizer_name / 'tokenizer_config.json'}: {given}; prompts are padded to it, and "
                f"{encoder_name} takes up to max_position_embeddings={limit} tokens: set an integer from 1 to {limit}"
            )
        if len(tokenizer) > config.vocab_size:
            raise ValueError(
                f"{folder / tokenizer_name}: {len(tokenizer)} tokens, but {encoder_name} has vocab_size="
                f"{config.vocab_size}; the tokenizer is not its text encoder's"
            )
    lengths = {name: models[name].model_max_length for name, _ in ENCODERS[kind]}
    if len(set(lengths.values())) > 1:  # SDXL concatenates both encoders' states token by token
        raise ValueError(
            f"{folder}: the tokenizers pad to different lengths ({lengths}); SDXL concatenates both text encoders' "
            "states token by token, so their tokenizer_config.json must set the same model_max_length"
        )


def encode(
    pretrained: str | Path,
    data: str | Path,
    resolution: int,
    out: str | Path | None = None,
    caption_column: str = "text",
    flip: bool = False,
    sample: bool = False,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = True,
    device: str | torch.device | None = None,
    kind: str | None = None,
    cond_data: str | Path | None = None,
) -> dict[str, Any]:
    """Encode the captioned images of ``data`` with the pipeline ``pretrained`` (see the module docstring).

    ``cond_data``: a folder of condition images paired by name with ``data``'s (any suffix), cropped, resized
    and flipped as their targets, and encoded by the VAE's ``latent_dist`` mean into ``concat`` (image-to-X,
    Marigold's recipe). A grey target is read as RGB, its value repeated in the three channels the VAE takes.

    ``kind`` (``"sd"`` or ``"sdxl"``) refuses a pipeline of the other kind; ``None`` takes the pipeline's own.
    ``device``: where the VAE and text encoders run (default: CUDA when available). With ``out``, writes the
    latents file there (atomically, with the ``d2f.encoded`` document as its metadata). Returns the document
    plus ``seconds`` and ``tensors`` (what the file holds).
    """
    started = time.perf_counter()
    check_resolution(resolution)
    flips(0, flip, seed)  # checks flip and seed
    out = _check_options(batch_size, sample, out)
    folder, index, kind = find_pipeline(pretrained, kind)
    captions = find_captions(data, caption_column)  # caption errors before any model is loaded
    partners = None if cond_data is None else _partners(captions, Path(cond_data))
    device = device_or_default(device)
    vae, text = _encoders(folder, index, kind, resolution, device)
    null, null_pooled = text([""], count=False)
    _check_finite({"states": null, "pooled": null_pooled}, "the empty prompt", folder)
    zeros = kind == "sdxl" and index.get("force_zeros_for_empty_prompt", True) is True
    if zeros:  # what StableDiffusionXLPipeline guides with when given no negative prompt
        null, null_pooled = torch.zeros_like(null), torch.zeros_like(null_pooled)
    _check_unet(folder, kind, null.shape[-1], None if null_pooled is None else null_pooled.shape[-1])
    # Once the checks pass, before the first image: the encoders as loaded, the data as it is read.
    identity = _identity(folder, kind, captions, resolution, caption_column, flip, sample, seed, cond_data)

    parts: dict[str, list[torch.Tensor]] = {key: [] for key in ("latents", "states", "concat", "pooled", "time_ids")}
    scaling, shift = float(vae.config.scaling_factor), getattr(vae.config, "shift_factor", None)
    noise = torch.Generator().manual_seed(seed)
    skipped: dict[str, list[str]] = {}
    from tqdm.auto import tqdm

    done = 0
    # A context: an error mid-run closes the bar first, so the error starts a line of its own.
    with tqdm(total=len(captions.files), desc="d2f encode", unit="image", disable=not progress) as bar:
        for batch in batches(captions, resolution, batch_size, flip, seed):
            skipped = batch.skipped or skipped
            step = min(done + batch_size, len(captions.files)) - done
            done += step
            if len(batch):
                encoded = _encode_batch(batch, vae, text, kind, sample, noise, partners, device)
                _check_finite(encoded, f"{_names(batch.files)} (in {captions.folder})", folder)
                for key, value in encoded.items():
                    parts[key].append(value)
            bar.update(step)
    if text.truncated:
        warnings.warn(
            f"{captions.folder}: {text.truncated} caption(s) are longer than the tokenizer's model_max_length and "
            "were truncated, as the pipeline truncates prompts",
            stacklevel=2,
        )
    tensors = {
        "latents": torch.cat(parts["latents"]),
        "encoder_hidden_states": torch.cat(parts["states"]),
        "null_encoder_hidden_states": null[0],
    }
    if partners is not None:
        tensors["concat"] = torch.cat(parts["concat"])
    if kind == "sdxl":
        tensors |= {
            "text_embeds": torch.cat(parts["pooled"]),
            "null_text_embeds": null_pooled[0],
            "time_ids": torch.cat(parts["time_ids"]),
        }
    document = ENCODED.new(
        **identity,
        cond_data=None if cond_data is None else str(Path(cond_data).resolve()),
        pretrained=str(folder),
        data=str(captions.folder.resolve()),
        captions=captions.source,
        null="zeros" if zeros else "empty prompt",
        scaling_factor=scaling,
        shift_factor=None if shift is None else float(shift),
        images=int(tensors["latents"].shape[0]),
        skipped={reason: len(names) for reason, names in skipped.items()},
        truncated=text.truncated,
    )
    if out is not None:
        write_safetensors(out, tensors, metadata={"d2f": json.dumps(document)})
    return {**document, "seconds": round(time.perf_counter() - started, 2), "tensors": tensors}


@torch.no_grad()
def _encode_batch(batch, vae, text, kind: str, sample: bool, noise, partners, device) -> dict[str, torch.Tensor]:
    """One batch of captioned images: its scaled latents (the mean, or a draw from ``noise``), its conditions'
    latents, its prompt embeddings and, for SDXL, the pooled embeddings and time ids."""
    resolution = batch.images.shape[-1]  # batches come square, at the resolution requested
    dist = vae.encode(batch.images.to(device)).latent_dist
    z = dist.mean
    if sample:
        draws = torch.stack([torch.randn(z.shape[1:], generator=noise) for _ in range(len(batch))])
        z = z + dist.std * draws.to(device)
    out = {"latents": scaled_latents(vae, z).float().cpu()}
    if partners is not None:
        conditions = torch.stack(
            [_condition(partners[name], resolution, mirrored) for name, mirrored in zip(batch.files, batch.flipped)]
        )
        out["concat"] = vae_latents(vae, conditions.to(device)).float().cpu()
    out["states"], pooled = text(batch.captions)
    if kind == "sdxl":
        out["pooled"] = pooled
        target = torch.tensor([[resolution, resolution]] * len(batch), dtype=torch.int64)
        out["time_ids"] = torch.cat([batch.original_sizes, batch.crops_top_left, target], 1).float()
    return out


def _check_finite(encoded: dict[str, torch.Tensor | None], what: str, folder: Path) -> None:
    """Refuse NaN or inf in what was just encoded (finite weights and settings can still overflow), naming the
    model and the images, before the next batch and before anything is written."""
    for key, (label, component) in OUTPUTS.items():
        value = encoded.get(key)
        if value is not None and not bool(torch.isfinite(value).all()):
            raise ValueError(
                f"{folder / component}: the {label} of {what} hold NaN or inf, though the weights are finite (an "
                "overflow); nothing was written"
            )


def _names(files: list[str], shown: int = 4) -> str:
    more = f" and {len(files) - shown} more" if len(files) > shown else ""
    return ", ".join(files[:shown]) + more


# What each model output of an encoded batch is called in an error, and the folder of the model that made it
# (SDXL's embeddings concatenate both text encoders': the pipeline's).
OUTPUTS = {
    "latents": ("scaled latents (the VAE's mean or draw times scaling_factor)", "vae"),
    "concat": ("condition latents", "vae"),
    "states": ("text embeddings", "."),
    "pooled": ("pooled text embeddings", "text_encoder_2"),
}


def _partners(captions: Captions, cond: Path) -> dict[str, Path]:
    """Each captioned image's condition in ``cond``, paired by :func:`~d2f.data.images.pair_by_stem`."""
    if not cond.is_dir():
        raise ValueError(f"cond_data={str(cond)!r}: the conditions of an image folder are a folder of images")
    found = [
        p.relative_to(cond).as_posix() for p in folder_files(cond, "cond_data") if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    pairs = pair_by_stem(captions.files, found, (captions.folder, cond)).values()
    return {name: cond / partner for name, partner in pairs}


def _condition(path: Path, resolution: int, mirrored: bool) -> torch.Tensor:
    """A condition image as its target was read (``load_image``), mirrored with it; an unreadable one is an
    error, since its target cannot be trained without it."""
    try:
        image = load_image(path, resolution)[0]
    except Unreadable as e:
        raise ValueError(
            f"cond_data: {path} is unreadable ({e.reason}: {e.detail}); its target has no condition"
        ) from e
    return image.flip(-1) if mirrored else image


def _identity(
    folder: Path, kind: str, captions: Captions, resolution, caption_column, flip, sample, seed, cond_data=None
) -> dict:
    return {
        "cond_fingerprint": None if cond_data is None else fingerprint(cond_data),
        "kind": kind,
        "resolution": resolution,
        "caption_column": caption_column,
        "flip": flip,
        "sample": sample,
        "seed": seed,
        "data_fingerprint": fingerprint(captions.folder, tuple(captions.used)),
        "pretrained_fingerprint": encoders_fingerprint(folder, kind),
    }


def _files(folder: Path, parts: tuple[str, ...] | None) -> list[tuple[str, Path]]:
    """The files under ``folder`` (or under its ``parts``, files or subfolders), hidden ones excluded, as
    sorted (relative name, path) pairs."""
    roots = [folder] if parts is None else [folder / p for p in parts]
    files = []
    for root in roots:
        candidates = [root] if root.is_file() else root.rglob("*")
        for path in candidates:
            relative = path.relative_to(folder)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                files.append((relative.as_posix(), path))
    return sorted(files)


def fingerprint(folder: str | Path, parts: tuple[str, ...] | None = None) -> str:
    """A SHA-256 of the sorted relative names, sizes and modification times (ns) of the files under
    ``folder`` (or under its ``parts``, files or subfolders), hidden ones excluded: changes when a file is
    added, removed, renamed, rewritten or touched. The data's fingerprint covers the files its images and
    captions come from (``Captions.used``), so a latents file written into the data folder leaves it alone.

    No file is read: a data set of many GB is not read once more for it. So a file rewritten with the same size
    and its modification time set back is not noticed; the pipeline's encoders, which decide what every
    latent is, get :func:`content_fingerprint` instead."""
    digest = hashlib.sha256()
    for name, path in _files(Path(folder), parts):
        stat = path.stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# A pipeline fingerprint that hashes the files' bytes starts with this; earlier d2f wrote a bare hex digest.
CONTENT = "sha256:"
# Formats no loader d2f runs reads (pickles, flax, ONNX; the gate refuses pickled weights): named and sized in
# the fingerprint, not read for it (a cloned SD repository holds GBs of them beside the safetensors).
UNREAD = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".msgpack", ".h5", ".onnx"})


def content_fingerprint(folder: str | Path, parts: tuple[str, ...]) -> str:
    """``"sha256:"`` and a SHA-256 of the sorted relative names, sizes and SHA-256 digests of the bytes of the
    files under ``folder``'s ``parts`` (hidden ones excluded; :data:`UNREAD` formats by name and size only):
    changes whenever a weight, config or tokenizer file does, whatever its modification time says.

    Cost: one read of every file, about a second per GB on one core (SD 1.5's VAE and text encoder in fp32,
    0.8 GB; SDXL's, 3.6 GB in fp32). ``d2f encode`` pays it once beside loading the same files, and ``d2f train``
    again each time it checks a latents file against ``--pretrained``; a header hash alone (dtypes, shapes and
    offsets) would be cheaper but misses a swapped encoder of the same shapes."""
    digest = hashlib.sha256()
    for name, path in _files(Path(folder), parts):
        digest.update(f"{name}\0{path.stat().st_size}\0".encode())
        if path.suffix not in UNREAD:
            digest.update(_file_digest(path))
        digest.update(b"\n")
    return CONTENT + digest.hexdigest()


def _file_digest(path: Path) -> bytes:
    file_digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            file_digest.update(chunk)
    return file_digest.digest()


def encoders_fingerprint(folder: Path, kind: str) -> str:
    """The :func:`content_fingerprint` of what decides a latent and a text embedding of the pipeline ``folder`` of
    ``kind``: its index and :data:`NEEDS` (the VAE, the text encoders and their tokenizers)."""
    return content_fingerprint(folder, ("model_index.json", *NEEDS[kind]))


def _check_fingerprint(path: str | Path, document: dict[str, Any]) -> None:
    """Refuse a file written before the pipeline fingerprint hashed the weights: its fingerprint cannot be
    compared with today's."""
    if not document["pretrained_fingerprint"].startswith(CONTENT):
        raise ValueError(
            f"{path} was encoded by an earlier d2f, whose pipeline fingerprint (names, sizes and modification "
            "times) cannot tell whether the encoders are unchanged; remove it and encode the data again"
        )


def read_encoded(path: str | Path) -> dict[str, Any]:
    """The ``d2f.encoded`` document of a latents file written by :func:`encode`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata() or {}
        document = json.loads(metadata.get("d2f", "null"))
    except (SafetensorError, OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a latents file written by d2f encode ({e})") from e
    return ENCODED.check(document, str(path))


def check_encoded(
    path: str | Path,
    pretrained: str | Path,
    data: str | Path,
    resolution: int,
    caption_column: str = "text",
    flip: bool = False,
    sample: bool = False,
    seed: int = 0,
    cond_data: str | Path | None = None,
) -> dict[str, Any]:
    """The document of the latents file ``path`` if it was encoded from this pipeline and data with these
    settings (the data and the pipeline's encoders unchanged since); else a ``ValueError`` naming what differs."""
    document = read_encoded(path)
    _check_fingerprint(path, document)
    folder, _, kind = find_pipeline(pretrained)
    captions = find_captions(data, caption_column)
    now = _identity(folder, kind, captions, resolution, caption_column, flip, sample, seed, cond_data)
    changed = [
        f"{key}={document.get(key)!r} then, {now[key]!r} now" for key in IDENTITY if document.get(key) != now[key]
    ]
    if changed:
        raise ValueError(
            f"{path} was encoded from other data or with other settings ({'; '.join(changed)}); remove it to encode "
            "again"
        )
    return document


def check_training_latents(path: str | Path, pretrained: str | Path | None, resolution: int) -> dict[str, Any] | None:
    """``d2f train --data LATENTS``: None for a latents file d2f did not write (nothing to check against); for
    one :func:`encode` wrote, its document, once it is known to be encoded at ``resolution`` and, where
    ``pretrained`` is a pipeline folder, with that pipeline's own VAE and text encoders (a file encoded by
    other encoders would train on embeddings the UNet never saw)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if "d2f" not in (f.metadata() or {}):
                return None
    except (SafetensorError, OSError):
        return None  # not safetensors at all: the latents loader refuses it, naming the file
    document = read_encoded(path)
    if document["resolution"] != resolution:
        raise ValueError(
            f"resolution={resolution} is not what {path} was encoded at (resolution={document['resolution']}); "
            f"pass --resolution {document['resolution']}"
        )
    if pretrained is not None:
        _check_fingerprint(path, document)
        folder, _, kind = find_pipeline(pretrained)
        if document["pretrained_fingerprint"] != encoders_fingerprint(folder, kind):
            raise ValueError(
                f"{path} was encoded by the VAE and text encoders of {document['pretrained']}, which differ from "
                f"those of pretrained={str(pretrained)!r}; encode the data with the pipeline being trained"
            )
    return document


__all__ = [
    "ENCODED",
    "check_encoded",
    "check_training_latents",
    "content_fingerprint",
    "encode",
    "encoders_fingerprint",
    "find_pipeline",
    "fingerprint",
    "read_encoded",
]
