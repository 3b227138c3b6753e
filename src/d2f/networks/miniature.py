"""The miniature Stable Diffusion: a complete diffusers ``StableDiffusionPipeline`` small enough to train on a
CPU, in SD 1.x's layout, for text-to-image on the shipped digits (their captions: ``data/digit_captions.py``).

- **VAE**: an ``AutoencoderKL`` of (16, 32, 64, 64) channels with SD's 4 latent channels and 8x downsampling,
  so 64 px digits give 8x8 latents and 128 px ones 16x16.
- **Tokenizer**: a ``CLIPTokenizer`` whose vocabulary and merges d2f writes (:func:`tokenizer_files`), so that
  every caption word is one token.
- **Text encoder**: a 2-layer ``CLIPTextModel`` of width 64 with fixed random weights, frozen as SD's is. Trained
  weights would need a contrastive image model to train against, which this miniature does not have; a random
  encoder already gives each caption a distinct embedding, and the UNet's cross-attention learns to read it.
- **UNet**: a ``UNet2DConditionModel`` of (64, 128) channels, 3.15 M parameters, with cross-attention on the
  text embedding at the latent's full size and in the middle block (attention at both levels costs 23 % more
  per step for 1.0 M more parameters), trained as a diffusion model with SD 1.5's schedule and epsilon
  prediction (``d2f miniature``).
- **Scheduler**: SD 1.5's ``DDIMScheduler`` configuration.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from .._files import built_in_place

VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (16, 32, 64, 64),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 64,
}
TEXT_WIDTH = 64
UNET = {
    "sample_size": 8,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (64, 128),
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
    "layers_per_block": 1,
    "cross_attention_dim": TEXT_WIDTH,
    "attention_head_dim": 8,
}
# SD 1.5's scheduler_config.json, less what only the PNDM scheduler it shipped with reads.
SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
}
SPECIAL = ("<|startoftext|>", "<|endoftext|>")


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair encoding of one lowercase ASCII ``word`` under the merges ``ranks``: start from its
    characters, the last one marked ``</w>``, and merge the adjacent pair of lowest rank until none is ranked."""
    parts = [*word[:-1], word[-1] + "</w>"]
    while len(parts) > 1:
        best = min(zip(parts, parts[1:]), key=lambda pair: ranks.get(pair, len(ranks)))
        if best not in ranks:
            break
        merged, i = [], 0
        while i < len(parts):
            if tuple(parts[i : i + 2]) == best:
                merged.append(parts[i] + parts[i + 1])
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def tokenizer_files(words: list[str]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP vocabulary and merges under which each of ``words`` (lowercase letters and digits) is one token.

    Each word's merges join its first two parts as they stand after every earlier merge. A merge only ever goes
    to the end of the list, and BPE takes the lowest rank first, so no later word's merges can split an earlier
    word: each is still merged by its own merges, in their order. Every single character stays in the
    vocabulary too, so any other word still tokenizes, letter by letter."""
    for word in words:
        if not word or not all(c.isascii() and (c.islower() or c.isdigit()) for c in word):
            raise ValueError(f"word={word!r}: a tokenizer word is lowercase ASCII letters and digits")
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        while len(parts := _bpe(word, ranks)) > 1:
            ranks[parts[0], parts[1]] = len(ranks)
    chars = sorted({c for word in words for c in word})
    tokens = [*SPECIAL, *chars, *(c + "</w>" for c in chars), *(a + b for a, b in ranks)]
    return {token: i for i, token in enumerate(dict.fromkeys(tokens))}, list(ranks)


def tokenizer(words: list[str]):
    """The ``CLIPTokenizer`` of :func:`tokenizer_files`, padding to SD's 77 tokens."""
    import tempfile

    from transformers import CLIPTokenizer

    vocab, merges = tokenizer_files(words)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps(vocab))
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        return CLIPTokenizer(str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=77)


def text_encoder(vocab_size: int, seed: int):
    """The frozen random text encoder, seeded."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=2 * TEXT_WIDTH,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        projection_dim=TEXT_WIDTH,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = CLIPTextModel(config)
    return model.requires_grad_(False).eval()


def write_pipeline(folder: str | os.PathLike, vae, unet, text_encoder, tokenizer) -> Path:
    """Save the components as a ``StableDiffusionPipeline`` folder with safetensors weights and no safety checker,
    built in a temporary sibling and renamed into place (:func:`~d2f._files.built_in_place`)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with built_in_place(folder) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_bpe_files(tmp / "tokenizer")
        prefix_text_model(tmp / "text_encoder" / "model.safetensors")
    return Path(folder)


def prefix_text_model(file: Path) -> None:
    """Store the text encoder's weights under ``text_model.``, as every SD checkpoint's ``CLIPTextModel`` does:
    transformers 5 saves them without it, which transformers 4 does not match to its model and would
    initialise at random (with a warning only)."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(file))
    renamed = {(k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in weights.items()}
    save_file(renamed, str(file), metadata={"format": "pt"})


def write_bpe_files(folder: Path) -> None:
    """``vocab.json`` and ``merges.txt`` beside a saved tokenizer's ``tokenizer.json``, from its BPE model:
    transformers 5 saves only ``tokenizer.json``, and transformers 4's ``CLIPTokenizer`` (d2f supports 4.40 on)
    reads these two files instead (and saves them itself)."""
    if (folder / "vocab.json").is_file():
        return
    model = json.loads((folder / "tokenizer.json").read_text())["model"]
    merges = [pair if isinstance(pair, str) else " ".join(pair) for pair in model["merges"]]
    (folder / "vocab.json").write_text(json.dumps(model["vocab"]))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{pair}\n" for pair in merges))


def pipeline_path() -> Path:
    """Where the trained miniature ships: ``d2f/assets/miniature``, a ``StableDiffusionPipeline`` folder
    (``StableDiffusionPipeline.from_pretrained(pipeline_path())``; ``pretrained="miniature"`` in d2f), with the
    ``recipe.json`` and ``prompt_following.json`` of the ``d2f miniature`` run that trained it."""
    return Path(__file__).resolve().parent.parent / "assets" / "miniature"


def base_pipeline():
    """The shipped miniature as ``StableDiffusionPipeline`` loads it offline, progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_path(), local_files_only=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def components(vocab_size: int, seed: int) -> dict[str, Any]:
    """Fresh VAE and UNet of the miniature's architecture and its text encoder, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vae, unet = AutoencoderKL(**VAE), UNet2DConditionModel(**UNET)
    return {"vae": vae, "unet": unet, "text_encoder": text_encoder(vocab_size, seed)}
