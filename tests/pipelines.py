"""Tiny Stable Diffusion pipelines built from configs, for the tests: an in-memory SD pipeline without text
encoders (the scheduler tests feed it embeddings), and SD-1.x-like and SDXL-like pipelines with CLIP text
encoders and tokenizers, saved as real pipeline folders (what users point d2f at). Also a folder of generated,
captioned images in both caption formats d2f reads. Everything is seeded, so every build is the same."""

import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from nets import tiny_cond_unet

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
SD_CONFIG = dict(**SD_SCHEDULE, clip_sample=False)

# A character-level CLIP vocabulary: with no merges, CLIP's BPE splits every word into its letters, the last
# one marked "</w>", so any lowercase caption tokenizes into distinct, real tokens. "!" is the padding token
# of SDXL's second tokenizer.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
VOCAB = ["<|startoftext|>", "<|endoftext|>", "!", "!</w>", *LETTERS, *(f"{c}</w>" for c in LETTERS)]


def tiny_vae(channels: int = 3):
    """An AutoencoderKL with one block: 4 latent channels at the image's own size (scale factor 1), for images of
    ``channels`` channels."""
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        latent_channels=4,
        block_out_channels=(8,),
        norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=8,
    )


def tiny_pipeline(prediction_type="epsilon", **scheduler_config):
    """An in-memory SD pipeline without text encoders (callers pass ``prompt_embeds`` of width 12)."""
    torch.manual_seed(0)
    unet = tiny_cond_unet()
    vae = tiny_vae()
    scheduler = DDIMScheduler(**{**SD_CONFIG, "prediction_type": prediction_type, **scheduler_config})
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_tokenizer(pad_token="<|endoftext|>"):
    """A CLIP tokenizer built from a vocabulary and merges file written to a temporary folder."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        vocab, merges = Path(tmp) / "vocab.json", Path(tmp) / "merges.txt"
        vocab.write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
        merges.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab), str(merges), pad_token=pad_token, model_max_length=77)


def tiny_text_encoder(hidden_size, projection_dim=None):
    """A two-layer CLIP text encoder (two, so that SDXL's penultimate hidden state is a layer's output);
    with ``projection_dim``, SDXL's second encoder (``CLIPTextModelWithProjection``)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(VOCAB),
        hidden_size=hidden_size,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=projection_dim or hidden_size,
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def tiny_sdxl_unet(cross_attention_dim, projection_dim, time_embed_dim=4):
    """The scheduler tests' UNet with SDXL's added conditioning: the pooled text embedding and six time ids."""
    return tiny_cond_unet(
        cross_attention_dim=cross_attention_dim,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + projection_dim,
    )


def tiny_sd_pipeline(folder, prediction_type="epsilon", xl=False) -> Path:
    """A tiny pipeline saved to ``folder`` with safetensors weights, seeded; returns ``folder``.

    SD-1.x-like (``xl=False``): :func:`tiny_pipeline`'s UNet, VAE and DDIM scheduler, one 12-wide text encoder.
    SDXL-like: text encoders 4 and 8 wide (their penultimate hidden states concatenate to 12), the second with
    a 6-wide projection (the pooled embedding), a tokenizer padding with "!" as SDXL's second one does, and a
    UNet taking SDXL's added conditioning; scheduled like SDXL (Euler, scaled linear, leading spacing).
    """
    folder = Path(folder)
    tokenizer = tiny_tokenizer()
    if not xl:
        torch.manual_seed(0)
        text_encoder = tiny_text_encoder(12)
        components = tiny_pipeline(prediction_type, steps_offset=1, set_alpha_to_one=False).components
        pipe = StableDiffusionPipeline(**{**components, "text_encoder": text_encoder, "tokenizer": tokenizer})
    else:
        torch.manual_seed(0)
        text_encoder, text_encoder_2 = tiny_text_encoder(4), tiny_text_encoder(8, projection_dim=6)
        unet, vae = tiny_sdxl_unet(cross_attention_dim=12, projection_dim=6), tiny_vae()
        scheduler = EulerDiscreteScheduler(
            **SD_SCHEDULE, prediction_type=prediction_type, steps_offset=1, timestep_spacing="leading"
        )
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tiny_tokenizer(pad_token="!"),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# Sizes (width, height) of the generated images: square, landscape and portrait, some smaller than the
# resolutions the tests encode at.
SIZES = [(16, 16), (24, 16), (16, 24), (40, 20), (20, 40), (9, 13), (32, 32), (30, 17), (17, 30), (8, 8), (50, 25)]
WORDS = ["red", "green", "blue", "cat", "dog", "sky", "sea", "tree", "a", "small", "big", "photo"]


def captioned_folder(folder, n=12, formats="jsonl") -> Path:
    """``n`` generated RGB PNGs of different sizes and aspect ratios in ``folder``, captioned in
    ``metadata.jsonl`` (``file_name`` and ``text``, in reverse order) or a ``.txt`` beside each image;
    seeded, so every call writes the same images and captions. Returns ``folder``."""
    from PIL import Image

    if formats not in ("jsonl", "txt"):
        raise ValueError(f"formats={formats!r}: 'jsonl' or 'txt'")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        width, height = SIZES[i % len(SIZES)]
        # A smooth gradient plus noise: the crop and the flip are visible in it.
        ramp = np.linspace(0, 255, width)[None, :, None] * np.array([1.0, 0.5, 0.0])
        pixels = np.clip(ramp + rng.integers(0, 60, (height, width, 3)), 0, 255).astype(np.uint8)
        name = f"image-{i:02d}.png"
        Image.fromarray(pixels, "RGB").save(folder / name)
        caption = " ".join(rng.choice(WORDS, size=1 + i % 4))
        if formats == "txt":
            (folder / name).with_suffix(".txt").write_text(caption + "\n")
        else:
            lines.append(json.dumps({"file_name": name, "text": caption}))
    if formats == "jsonl":
        (folder / "metadata.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    return folder


def condition_folder(images: Path, folder: Path) -> Path:
    """Image-to-X conditions for a captioned folder: a copy of each of its images under the same name."""
    import shutil

    folder.mkdir(parents=True)
    for image in sorted(Path(images).glob("*.png")):
        shutil.copy(image, folder / image.name)
    return folder
