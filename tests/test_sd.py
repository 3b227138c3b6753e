"""Stable Diffusion end to end on tiny local SD-1.x-like and SDXL-like pipelines: captioned images in, a LoRA
or a full UNet out; the README's recipe commands and its loading snippet, run as written on them."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

import d2f  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402
from pipelines import captioned_folder, tiny_sd_pipeline  # noqa: E402

README = Path(__file__).resolve().parents[1] / "README.md"
CLASSES = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
TINY = dict(resolution=8, batch_size=4, warmup_steps=0, num_samples=2, sample_steps=2)
PROMPTS = ["red cat", "sky"]


def snippet(name: str, language: str) -> str:
    """A README block marked ``<!-- snippet: name ... -->``."""
    return re.search(rf"<!-- snippet: {name} .*?-->\s*```{language}\n(.*?)```", README.read_text(), re.S).group(1)


def pipeline_and_images(root: Path, kind: str) -> tuple[Path, Path]:
    """SD predicts v, SDXL epsilon (as SD 2.1 768 and SDXL base do); their captions in the two formats."""
    prediction_type = "v_prediction" if kind == "sd" else "epsilon"
    pipeline = tiny_sd_pipeline(root / "pipeline", prediction_type=prediction_type, xl=kind == "sdxl")
    return pipeline, captioned_folder(root / "images", n=12, formats="jsonl" if kind == "sd" else "txt")


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def lora_run(request, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    pipeline, images = pipeline_and_images(root, kind)
    config = TrainConfig(
        out=str(root / "run"),
        pretrained=str(pipeline),
        data=str(images),
        **TINY,
        lora_rank=4,
        lr=3e-2,
        max_steps=3,
        checkpoint_every=0,
        validation_prompts=("a", "a a"),
        validation_every=3,
        guidance=2.0,
        report_to="tensorboard",
    )
    train(config, progress=False)
    return root, pipeline, kind


def load_pipeline(kind: str, pipeline: Path, **components):
    import diffusers

    pipe = getattr(diffusers, CLASSES[kind]).from_pretrained(pipeline, **components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe) -> torch.Tensor:
    """The latents of 4 guided steps on two prompts from seeded noise (what the fresh process samples)."""
    generator = torch.Generator().manual_seed(1)
    out = pipe(PROMPTS, num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="latent")
    return out.images


# Appended to the README's loading snippet: the same call as sample(), saved for the test to compare.
AFTER_SNIPPET = f"""
import sys, numpy, torch
from safetensors.torch import save_file
generator = torch.Generator().manual_seed(1)
out = pipe({PROMPTS!r}, num_inference_steps=4, guidance_scale=2.0, generator=generator, output_type="latent")
save_file({{"latents": out.images.contiguous(), "image": torch.from_numpy(numpy.array(image))}}, sys.argv[1])
"""


def test_the_readme_loading_snippet_reproduces_the_trained_model_in_a_fresh_process(lora_run):
    """The README's three lines, with a tiny pipeline's and export's paths, in a new interpreter: the loaded
    pipeline samples what the trained model samples through the same pipeline, and the LoRA changes it."""
    root, pipeline, kind = lora_run
    export = root / "run" / "export"
    code = snippet("sd-lora", "python").replace("path/to/stable-diffusion-2-1", str(pipeline))
    code = code.replace("runs/sd21-768/export", str(export)).replace("StableDiffusionPipeline", CLASSES[kind])
    out = root / "fresh.safetensors"
    run = subprocess.run(
        [sys.executable, "-c", code + AFTER_SNIPPET, str(out)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    fresh = load_file(str(out))
    assert tuple(fresh["image"].shape) == (8, 8, 3)

    scheduler = d2f.D2FScheduler.from_pretrained(export, subfolder="scheduler", solver="auto")
    assert scheduler.config.flow_finetuned  # the export says what it is: auto takes the flow column
    trained = d2f.load(export).net  # the peft adapter on the base UNet: the trained model itself
    own = sample(load_pipeline(kind, pipeline, unet=trained, scheduler=scheduler))
    torch.testing.assert_close(fresh["latents"], own, rtol=1e-5, atol=1e-5)
    base = sample(load_pipeline(kind, pipeline, scheduler=scheduler))
    assert (fresh["latents"] - base).abs().max() > 1e-3


def test_load_lora_weights_gives_the_trained_unet(lora_run):
    root, pipeline, kind = lora_run
    export = root / "run" / "export"
    assert (export / "pytorch_lora_weights.safetensors").is_file()
    meta = d2f.networks.export.read_export(export).meta
    assert meta["pipeline"] == CLASSES[kind] and meta["resolution"] == 8
    adapter = load_file(str(export / "adapter" / "adapter_model.safetensors"))
    assert not any(".conv_in." in k or ".conv_out." in k for k in adapter)  # no full convs for a pipeline

    encoded = load_file(str(root / "run" / "latents.safetensors"))
    kwargs = {"encoder_hidden_states": encoded["encoder_hidden_states"][:2]}
    if kind == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": encoded["text_embeds"][:2], "time_ids": encoded["time_ids"][:2]}
    z, k = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)), torch.tensor([10.0, 700.0])
    pipe = load_pipeline(kind, pipeline)
    with torch.no_grad():
        before = pipe.unet(z, k, **kwargs).sample
        pipe.load_lora_weights(export)
        loaded, own = pipe.unet(z, k, **kwargs).sample, d2f.load(export).net(z, k, **kwargs).sample
    torch.testing.assert_close(loaded, own, rtol=1e-5, atol=1e-6)
    assert (loaded - before).abs().max() > 1e-3


def test_validation_images_and_samples_come_from_the_pipeline(lora_run):
    from PIL import Image

    root, _, _ = lora_run
    pngs = sorted(p.name for p in (root / "run" / "validation").iterdir())
    assert pngs == ["step-00000003.png"]
    for png in (root / "run" / "validation" / pngs[0], root / "run" / "samples.png"):
        with Image.open(png) as image:
            assert image.size == (2 * 9 + 1, 9 + 1)  # two 8x8 images, one per prompt, with 1-pixel borders
    assert json.loads((root / "run" / "metrics.json").read_text())["samples_png"] == "samples.png"


def test_tensorboard_gets_loss_lr_and_validation_images(lora_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, _, _ = lora_run
    (logs,) = (root / "run" / "logs").iterdir()
    events = EventAccumulator(str(logs), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    losses = [e.value for e in events.Scalars("loss")]
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3]
    assert all(v > 0 for v in losses) and [e.value for e in events.Scalars("lr")] == pytest.approx([3e-2] * 3)
    assert [(e.step, e.width, e.height) for e in events.Images("validation")] == [(3, 2 * 8, 8)]  # two prompts


def checkpoint(run: Path, step: int) -> dict[str, torch.Tensor]:
    folder = run / "checkpoints" / f"step-{step:08d}"
    return {
        f"{f}/{k}": v
        for f in ("trainable", "ema", "optimizer")
        for k, v in load_file(str(folder / f"{f}.safetensors")).items()
    }


@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_a_pipeline_run_resumes_bit_for_bit_and_a_full_one_exports_a_unet_folder(tmp_path, lora_rank):
    """SDXL, from captioned images: 4 steps straight == 2 steps, then ``--resume`` in a new process, 2 more."""
    from diffusers import UNet2DConditionModel

    pipeline, images = pipeline_and_images(tmp_path, "sdxl")
    config = TrainConfig(pretrained=str(pipeline), data=str(images), **TINY, lora_rank=lora_rank, checkpoint_every=2)
    train(config.replace(out=str(tmp_path / "straight"), max_steps=4), progress=False)
    train(config.replace(out=str(tmp_path / "split"), max_steps=2), progress=False)
    flags = f"--pretrained {pipeline} --data {images} --resolution 8 --batch-size 4 --warmup-steps 0 --num-samples 2"
    flags += f" --sample-steps 2 --lora-rank {lora_rank} --checkpoint-every 2 --max-steps 4 --out {tmp_path / 'split'}"
    resumed = subprocess.run(
        [sys.executable, "-m", "d2f", "train", *shlex.split(flags), "--resume", "--no-progress"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = checkpoint(tmp_path / "straight", 4), checkpoint(tmp_path / "split", 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    export = tmp_path / "split" / "export"
    if lora_rank:
        assert (export / "pytorch_lora_weights.safetensors").is_file()
        return
    assert not (export / "pytorch_lora_weights.safetensors").exists()
    unet = UNet2DConditionModel.from_pretrained(export / "unet")
    own = d2f.load(export).net
    assert all(torch.equal(p, q) for p, q in zip(unet.state_dict().values(), own.state_dict().values(), strict=True))
    ema = {k.removeprefix("ema/"): v for k, v in b.items() if k.startswith("ema/")}
    assert ema and all(torch.equal(unet.state_dict()[k], v) for k, v in ema.items())  # the EMA is what exports


def test_latents_must_come_from_the_trained_pipeline_at_the_given_resolution(tmp_path):
    from d2f.data.encode import encode

    sd, images = pipeline_and_images(tmp_path, "sd")
    sdxl = tiny_sd_pipeline(tmp_path / "xl", xl=True)
    latents = tmp_path / "latents.safetensors"
    encode(sd, images, 8, latents, progress=False)
    base = TrainConfig.teacher_task(out=str(tmp_path / "run"), data=str(latents), **TINY, max_steps=1)
    with pytest.raises(ValueError, match=r"resolution=16 is not what .* was encoded at \(resolution=8\)"):
        train(base.replace(pretrained=str(sd), resolution=16), progress=False)
    with pytest.raises(ValueError, match="was encoded by the VAE and text encoders of .*, which differ from those of"):
        train(base.replace(pretrained=str(sdxl)), progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".d2f.lock"]  # refused before anything is written


@pytest.mark.slow
def test_the_readme_recipe_commands_run_on_a_tiny_pipeline(tmp_path):
    """The README's encode and train commands, one process and data-parallel (two CPU processes for eight
    GPUs), with the paths of a tiny SD pipeline and its images and sizes a CPU can run."""
    pipeline, images = pipeline_and_images(tmp_path, "sd")
    commands = snippet("sd-recipe", "bash").replace("\\\n", " ")
    replacements = {
        "path/to/stable-diffusion-2-1": str(pipeline),
        "path/to/images": str(images),
        "--resolution 768": "--resolution 8",
        "--max-steps 10000": "--max-steps 2",
        "--checkpoint-every 1000": "--checkpoint-every 2",
        "--validation-every 500": "--validation-every 2",
        "--batch-size 8": "--batch-size 2",
        "--sample-steps 25": "--sample-steps 2",
        "accelerate launch --multi_gpu --num_processes 8": "accelerate launch --multi_gpu --num_processes 2 "
        "--num_machines 1 --mixed_precision no --dynamo_backend no",
    }
    for old, new in replacements.items():
        assert old in commands, old
        commands = commands.replace(old, new)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run = subprocess.run(["bash", "-euc", commands], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    for out in ("runs/sd21-768", "runs/sd21-768-x8"):
        folder = tmp_path / out
        names = {p.name for p in folder.iterdir()}
        expected = {"config.json", "checkpoints", "validation", "logs", "samples.png", "loss.png", "metrics.json"}
        assert expected | {"export"} <= names, (out, names)
        assert (folder / "validation" / "step-00000002.png").is_file()
        assert (folder / "export" / "pytorch_lora_weights.safetensors").is_file()
        weights = load_file(str(folder / "checkpoints" / "step-00000002" / "trainable.safetensors"))
        assert all(w.dtype == torch.float32 for w in weights.values())  # bf16 autocast, fp32 trainable weights
    metrics = json.loads((tmp_path / "runs/sd21-768-x8/metrics.json").read_text())
    assert metrics["processes"] == 2


def test_train_on_a_pipeline_and_a_captioned_folder_encodes_once(tmp_path, capsys):
    """``d2f train --pretrained PIPELINE --data FOLDER`` encodes into the run folder, reuses that file on resume
    only while data and settings are unchanged, and writes what ``d2f encode`` writes."""
    from d2f.cli import main

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
