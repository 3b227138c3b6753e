"""Tiny Stable Diffusion pipelines saved as real pipeline folders (what users point d2f at), built from
configs: the scheduler tests' UNet and VAE, a one-layer CLIP text encoder and a CLIP tokenizer from a
vocabulary and merges file written beside the pipeline."""

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from test_scheduler import tiny_pipeline


def tiny_sd_pipeline(folder: Path, prediction_type: str = "epsilon") -> Path:
    """An SD-1.x-like pipeline (8x8 latents, 12-wide text embeddings) saved to ``folder``, seeded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder.parent / "vocab.json").write_text(json.dumps({"<|startoftext|>": 0, "<|endoftext|>": 1, "a</w>": 2}))
    (folder.parent / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(folder.parent / "vocab.json"), str(folder.parent / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=3,
            hidden_size=12,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=77,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    components = tiny_pipeline(prediction_type, steps_offset=1, set_alpha_to_one=False).components
    StableDiffusionPipeline(**{**components, "text_encoder": text_encoder, "tokenizer": tokenizer}).save_pretrained(
        folder
    )
    return folder
