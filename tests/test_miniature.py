"""The miniature Stable Diffusion's parts: the tokenizer d2f writes, the frozen text encoder, the pipeline folder
diffusers loads offline, and the VAE's training."""

import json

import pytest
import torch

from d2f.data.digit_captions import captioned_digits, words
from d2f.networks.miniature import UNET, VAE, components, text_encoder, tokenizer, tokenizer_files, write_pipeline
from d2f.training.vae import reconstruction_error, scaling_factor, train_vae


def test_every_caption_word_is_one_token_and_other_words_spell_out():
    tok = tokenizer(words())
    for word in words():
        ids = tok(word).input_ids
        assert len(ids) == 3 and tok.convert_ids_to_tokens(ids[1]) == f"{word}</w>", word
    # upper case is folded; a word outside the vocabulary falls back to its letters, none unknown
    assert tok("THE Digit 7").input_ids == tok("the digit 7").input_ids
    spelled = tok("tin huge").input_ids[1:-1]
    assert tok.convert_ids_to_tokens(spelled) == ["t", "in</w>", "h", "u", "g", "e</w>"]
    padded = tok("a thick seven", padding="max_length", max_length=tok.model_max_length).input_ids
    assert len(padded) == 77


def test_merges_that_a_later_word_adds_never_split_an_earlier_one():
    # "even" ranks the pair (e, v), which lies inside "seven": it must still come out whole
    vocab, merges = tokenizer_files(["seven", "even", "eve", "v"])
    tok = tokenizer(["seven", "even", "eve", "v"])
    assert [len(tok(w).input_ids) for w in ("seven", "even", "eve", "v")] == [3, 3, 3, 3]
    assert set(vocab) >= {"seven</w>", "even</w>", "eve</w>", "v</w>"} and len(merges) == len(set(merges))


@pytest.mark.parametrize("word", ["Seven", "a-b", "", "naïve"])
def test_a_word_the_tokenizer_cannot_hold_is_refused_by_name(word):
    with pytest.raises(ValueError, match=f"word={word!r}: a tokenizer word is lowercase ASCII"):
        tokenizer_files(["one", word])


def test_the_text_encoder_is_frozen_and_the_seed_decides_its_weights():
    a, b, c = text_encoder(50, seed=0), text_encoder(50, seed=0), text_encoder(50, seed=1)
    assert not any(p.requires_grad for p in a.parameters()) and not a.training
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.get_input_embeddings().weight, c.get_input_embeddings().weight)
    state = torch.random.get_rng_state()
    text_encoder(50, seed=3)
    assert torch.equal(state, torch.random.get_rng_state())  # the global generator is left as it was


def test_the_pipeline_folder_loads_offline_without_a_safety_checker_and_draws_at_64_and_128px(tmp_path):
    from diffusers import StableDiffusionPipeline

    tok = tokenizer(words())
    folder = write_pipeline(tmp_path / "sd", tokenizer=tok, **components(len(tok), seed=0))
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert pipe.safety_checker is None and pipe.vae_scale_factor == 8
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == 64
    assert tuple(pipe.vae.config.block_out_channels) == VAE["block_out_channels"]
    assert tuple(pipe.unet.config.block_out_channels) == UNET["block_out_channels"]
    assert pipe.scheduler.config.prediction_type == "epsilon" and pipe.scheduler.config.steps_offset == 1
    pipe.set_progress_bar_config(disable=True)
    for size in (64, 128):
        out = pipe("a thick seven", num_inference_steps=2, height=size, width=size, output_type="np")
        assert out.images.shape == (1, size, size, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sd"]


def test_vae_training_lowers_the_held_out_error_and_sets_the_scale_from_the_latents():
    digits = captioned_digits(32).images.repeat(1, 3, 1, 1)
    vae = components(10, seed=0)["vae"]
    report = train_vae(vae, digits[:400], digits[4900:], steps=30, batch_size=8, lr=2e-3, progress=False)
    assert report["held_out_after"]["l1"] < 0.6 * report["held_out_before"]["l1"]
    assert report["held_out_after"] == reconstruction_error(vae, digits[4900:])
    means = vae.encode(digits[:400]).latent_dist.mean
    assert vae.config.scaling_factor == report["scaling_factor"] == pytest.approx(1 / means.std().item(), rel=1e-4)
    assert scaling_factor(vae, digits[:400]) == pytest.approx(report["scaling_factor"], rel=1e-5)


@pytest.mark.parametrize(
    "settings, message",
    [({"steps": 0}, "steps=0 must be a positive integer"), ({"lr": float("nan")}, "lr=nan must be a finite number")],
)
def test_vae_training_refuses_bad_settings_by_name(settings, message):
    digits = captioned_digits(32).images[:8].repeat(1, 3, 1, 1)
    with pytest.raises(ValueError, match=message):
        train_vae(components(10, seed=0)["vae"], digits, digits, **{"steps": 1, **settings})


def test_a_diverging_vae_run_stops_naming_the_step():
    digits = captioned_digits(32).images[:16].repeat(1, 3, 1, 1)
    with pytest.raises(FloatingPointError, match="the VAE's loss is (nan|inf) at step"):
        train_vae(components(10, seed=0)["vae"], digits, digits, steps=50, batch_size=8, lr=1e6, progress=False)


def test_the_recipe_trains_each_stage_and_writes_a_pipeline_diffusers_loads(tmp_path, monkeypatch):
    """The whole of ``d2f miniature`` at 32 px, a few steps per stage (the recipe's own numbers take ~40 min)."""
    from diffusers import StableDiffusionPipeline

    from d2f.cli import main
    from d2f.evaluation import prompts
    from d2f.training import recipes

    monkeypatch.setitem(recipes.MINIATURE, "resolution", 32)
    monkeypatch.setitem(recipes.MINIATURE, "unet_batch_size", 8)
    monkeypatch.setattr(prompts, "REFERENCE", {"steps": 2, "guidance": 3.0, "per_prompt": 1})
    out = tmp_path / "mini"
    assert main(["miniature", "--out", str(out), "--vae-steps", "3", "--unet-steps", "2"]) == 0
    report = json.loads((out / "recipe.json").read_text())
    assert report["recipe"]["vae_steps"] == 3 and report["unet"]["steps"] == 2
    assert report["unet_config"]["objective"] == "diffusion" and report["unet_config"]["lora_rank"] == 0
    scores = json.loads((out / "prompt_following.json").read_text())
    assert scores["n"] == 120 and scores["scheduler"] == "DDIMScheduler" and scores["steps"] == 2
    pipe = StableDiffusionPipeline.from_pretrained(out / "pipeline", local_files_only=True)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"])
    # the trained UNet (the run's export), not the untrained one it started from
    from diffusers import UNet2DConditionModel

    exported = UNet2DConditionModel.from_pretrained(out / "unet" / "export" / "unet")
    untrained = UNet2DConditionModel.from_pretrained(out / "untrained" / "unet")
    for name, weight in pipe.unet.state_dict().items():
        assert torch.equal(weight, exported.state_dict()[name]), name
    assert not torch.equal(pipe.unet.conv_in.weight, untrained.conv_in.weight)
    assert main(["miniature", "--out", str(out)]) == 2  # refused: the folder holds a run already
