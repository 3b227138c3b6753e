"""Stable Diffusion end to end on tiny local pipelines: train a LoRA on a pipeline's UNet, export it, and load
it in a fresh process the way every SD user does (``pipe.load_lora_weights``)."""

import subprocess
import sys

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

import d2f  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402
from pipelines import tiny_sd_pipeline  # noqa: E402

# Loads the base pipeline and the LoRA, swaps in D2FScheduler from the export, samples 4 steps to latents.
FRESH = """
import sys, torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file
from d2f import D2FScheduler

pipeline, export, inputs, out = sys.argv[1:]
pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
if export != "none":
    pipe.load_lora_weights(export)
    pipe.scheduler = D2FScheduler.from_pretrained(export, subfolder="scheduler")
x = load_file(inputs)
kwargs = dict(prompt_embeds=x["prompt_embeds"], negative_prompt_embeds=x["negative_prompt_embeds"])
latents = pipe(**kwargs, latents=x["noise"], num_inference_steps=4, guidance_scale=2.0, output_type="latent")
save_file({"latents": latents.images.contiguous()}, out)
"""


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sd")
    pipeline = tiny_sd_pipeline(root / "pipeline", prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    data = {
        "latents": torch.randn(8, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(8, 77, 12, generator=g),
        "null_encoder_hidden_states": torch.randn(77, 12, generator=g),
    }
    save_file(data, str(root / "latents.safetensors"))
    config = TrainConfig(
        out=str(root / "run"),
        pretrained=str(pipeline),
        data=str(root / "latents.safetensors"),
        resolution=8,
        lora_rank=4,
        lr=3e-2,
        max_steps=3,
        batch_size=4,
        warmup_steps=0,
        checkpoint_every=0,
        num_samples=2,
        sample_steps=2,
        validation_prompts=("a", "a a"),
        validation_every=3,
        guidance=2.0,
        report_to="tensorboard",
    )
    train(config, progress=False)
    return root, pipeline, data


def sample_in_a_fresh_process(root, pipeline, export, data, name):
    inputs = root / f"{name}-inputs.safetensors"
    embeds = data["encoder_hidden_states"][:2]
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    null = data["null_encoder_hidden_states"].expand(2, -1, -1).contiguous()
    save_file({"prompt_embeds": embeds, "negative_prompt_embeds": null, "noise": noise}, str(inputs))
    out = root / f"{name}-latents.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", FRESH, str(pipeline), str(export), str(inputs), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return load_file(str(out))["latents"]


def test_a_pipeline_lora_loads_with_load_lora_weights_and_equals_the_trained_model(lora_run):
    root, pipeline, data = lora_run
    export = root / "run" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    trained = d2f.load(export).net  # the peft adapter on the base UNet: the trained model itself
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None)
    base = pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), data["encoder_hidden_states"][:1]).sample
    pipe.load_lora_weights(export)
    z, k, states = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0]), data["encoder_hidden_states"][:2]
    with torch.no_grad():
        loaded, own = pipe.unet(z, k, states).sample, trained(z, k, states).sample
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-6)
    changed = pipe.unet(torch.zeros(1, 4, 8, 8), torch.tensor([500.0]), data["encoder_hidden_states"][:1]).sample
    assert (changed - base).abs().max() > 1e-3  # the LoRA trained, and it changes the output

    with_lora = sample_in_a_fresh_process(root, pipeline, export, data, "lora")
    without = sample_in_a_fresh_process(root, pipeline, "none", data, "base")
    assert (with_lora - without).abs().max() > 1e-3
    # The same pipeline call with the trained UNet swapped in directly, in this process.
    pipe = StableDiffusionPipeline.from_pretrained(pipeline, safety_checker=None, unet=trained)
    pipe.scheduler = d2f.D2FScheduler.from_pretrained(export, subfolder="scheduler")
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    null = data["null_encoder_hidden_states"].expand(2, -1, -1)
    kwargs = dict(prompt_embeds=data["encoder_hidden_states"][:2], negative_prompt_embeds=null)
    own = pipe(**kwargs, latents=noise, num_inference_steps=4, guidance_scale=2.0, output_type="latent").images
    torch.testing.assert_close(with_lora, own, rtol=1e-5, atol=1e-5)


def test_validation_images_come_from_the_pipeline_with_the_current_weights(lora_run):
    from PIL import Image

    root, _, _ = lora_run
    pngs = sorted(p.name for p in (root / "run" / "validation").iterdir())
    assert pngs == ["step-00000003.png"]
    with Image.open(root / "run" / "validation" / pngs[0]) as image:
        assert image.size == (2 * 9 + 1, 9 + 1)  # two 8x8 images, one per prompt, with 1-pixel borders


def test_tensorboard_gets_loss_lr_and_validation_images(lora_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = lora_run
    (logs,) = (root / "run" / "logs").iterdir()
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    meta = d2f.training.export.read_export(root / "run" / "export").meta  # the run finished
    assert meta["kind"] == "lora" and [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert all(v > 0 for v in losses) and [e.value for e in events.Scalars("lr")] == pytest.approx([3e-2] * 3)
    assert [(e.step, e.width, e.height) for e in events.Images("validation")] == [(3, 2 * 8, 8)]  # two prompts


def test_a_pipeline_lora_trains_no_full_convs_by_default(lora_run):
    root, _, _ = lora_run
    meta = d2f.training.export.read_export(root / "run" / "export").meta
    assert meta["pipeline"] == "StableDiffusionPipeline"
    adapter = load_file(str(root / "run" / "export" / "adapter" / "adapter_model.safetensors"))
    assert not any(".conv_in." in k or ".conv_out." in k for k in adapter)


def test_train_on_a_pipeline_and_a_captioned_folder_encodes_once(tmp_path, capsys):
    """``d2f train --pretrained PIPELINE --data FOLDER`` encodes into the run folder, reuses that file on resume
    only while data and settings are unchanged, and writes what ``d2f encode`` writes."""
    from d2f.cli import main
    from pipelines import captioned_folder

    pipeline = tiny_sd_pipeline(tmp_path / "pipeline", prediction_type="v_prediction")
    images = captioned_folder(tmp_path / "images", n=12, formats="jsonl")
    small = dict(resolution=8, lora_rank=4, batch_size=4, warmup_steps=0, num_samples=2, sample_steps=2)
    config = TrainConfig(out=str(tmp_path / "run"), pretrained=str(pipeline), data=str(images), **small)
    train(config.replace(max_steps=2, checkpoint_every=2), progress=False)
    cache = tmp_path / "run" / "latents.safetensors"
    before = cache.stat().st_mtime_ns
    train(config.replace(max_steps=3, checkpoint_every=2), resume="latest", progress=False)
    assert cache.stat().st_mtime_ns == before  # reused, not encoded again
    with pytest.raises(ValueError, match="was written with different flip"):
        train(config.replace(max_steps=4, flip=True), resume="latest", progress=False)
    metadata = images / "metadata.jsonl"
    captions = metadata.read_text()
    metadata.write_text(captions.replace('"text": "', '"text": "a ', 1))  # one caption edited
    with pytest.raises(ValueError, match="encoded from other data or with other settings"):
        train(config.replace(max_steps=4, checkpoint_every=2), resume="latest", progress=False)

    out = tmp_path / "encoded.safetensors"
    metadata.write_text(captions)
    argv = ["encode", "--pretrained", str(pipeline), "--data", str(images), "--resolution", "8", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    a, b = load_file(str(out)), load_file(str(cache))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
