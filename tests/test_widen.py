"""Image-to-X finetuning: widening a pretrained UNet's conv_in, paired data, and widened exports that round-trip."""

import json
import re

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import UNet2DModel  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import d2f  # noqa: E402
from d2f.data.datasets import load_dataset  # noqa: E402
from d2f.networks.sampling import SamplingSettings, export_labels, sample_export  # noqa: E402
from d2f.networks.teachers import teacher_path  # noqa: E402
from d2f.networks.widen import widen_conv_in  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402


def teacher_and_inputs(seed=0):
    unet = UNet2DModel.from_pretrained(teacher_path() / "unet").eval()
    g = torch.Generator().manual_seed(seed)
    x, c = torch.randn(3, 1, 16, 16, generator=g), torch.randn(3, 1, 16, 16, generator=g)
    k, labels = torch.tensor([10.0, 500.0, 990.0]), torch.tensor([1, 5, 10])
    return unet, x, c, k, labels


@torch.no_grad()
def test_marigold_init_keeps_the_output_when_the_condition_is_the_input():
    unet, x, c, k, labels = teacher_and_inputs()
    before = unet(x, k, class_labels=labels).sample
    widen_conv_in(unet, 1, "marigold")
    assert unet.config.in_channels == 2 and unet.conv_in.weight.shape[1] == 2
    torch.testing.assert_close(unet(torch.cat([x, x], 1), k, class_labels=labels).sample, before)
    assert (unet(torch.cat([x, c], 1), k, class_labels=labels).sample - before).abs().max() > 1e-3


@torch.no_grad()
def test_zero_init_keeps_the_output_for_any_condition():
    unet, x, c, k, labels = teacher_and_inputs()
    before = unet(x, k, class_labels=labels).sample
    widen_conv_in(unet, 2, "zero")
    assert unet.config.in_channels == 3
    for cond in (torch.cat([c, c], 1), torch.randn(3, 2, 16, 16) * 100):
        torch.testing.assert_close(unet(torch.cat([x, cond], 1), k, class_labels=labels).sample, before)


def test_widening_refuses_what_it_cannot_do():
    unet = teacher_and_inputs()[0]
    with pytest.raises(ValueError, match="cond_init='marigold' copies .* the target's 1 channel\\(s\\), not 3"):
        widen_conv_in(unet, 3, "marigold")
    with pytest.raises(ValueError, match="cond_init='copy' is not supported"):
        widen_conv_in(unet, 1, "copy")
    with pytest.raises(ValueError, match="cond_channels=0 must be a positive integer"):
        widen_conv_in(unet, 0, "zero")
    with pytest.raises(ValueError, match="cond_init='half' is not allowed"):
        TrainConfig.teacher_task(cond_init="half")
    with pytest.raises(ValueError, match="reflow pairs take no conditions"):
        TrainConfig.teacher_task(cond_data="c", pairs="p")


def write_pairs(root, names, seed=0):
    """Targets in root/targets (PNG) and conditions in root/inputs (JPEG for one, PNG else): random 16x16 grey."""
    rng = np.random.default_rng(seed)
    for folder in ("targets", "inputs"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "targets" / f"{name}.png")
        suffix = "jpg" if i == 0 else "png"
        Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "inputs" / f"{name}.{suffix}")


def test_paired_folders_match_by_name_and_refuse_missing_partners(tmp_path):
    write_pairs(tmp_path, ["b", "a", "c"])
    data = load_dataset(str(tmp_path / "targets"), 16, 1, cond=str(tmp_path / "inputs"))
    assert data.images.shape == data.concat.shape == (3, 1, 16, 16)
    a = np.asarray(Image.open(tmp_path / "targets" / "a.png"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(data.images[0, 0].numpy(), a, atol=1e-6)  # sorted by name: a first
    a_in = np.asarray(Image.open(tmp_path / "inputs" / "a.png"), dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(data.concat[0, 0].numpy(), a_in, atol=1e-6)

    (tmp_path / "inputs" / "c.png").unlink()
    (tmp_path / "inputs" / "d.png").write_bytes((tmp_path / "inputs" / "a.png").read_bytes())
    (tmp_path / "inputs" / "e.png").write_bytes((tmp_path / "inputs" / "a.png").read_bytes())
    message = "1 in data, not in cond_data .*: c; 2 in cond_data, not in data .*: d, e"
    with pytest.raises(ValueError, match=message):
        load_dataset(str(tmp_path / "targets"), 16, 1, cond=str(tmp_path / "inputs"))
    with pytest.raises(ValueError, match="cond_data='x' pairs conditions with an image folder or a latents file"):
        load_dataset("mnist", 16, 1, cond="x")
    (tmp_path / "inputs" / "d.png").unlink()
    (tmp_path / "inputs" / "e.png").unlink()
    (tmp_path / "inputs" / "c.png").write_bytes((tmp_path / "inputs" / "a.png").read_bytes())
    (tmp_path / "targets" / "a.jpg").write_bytes((tmp_path / "inputs" / "b.jpg").read_bytes())
    with pytest.raises(ValueError, match="data: two images are named 'a' \\(suffixes aside\\)"):
        load_dataset(str(tmp_path / "targets"), 16, 1, cond=str(tmp_path / "inputs"))
    assert len(load_dataset(str(tmp_path / "targets"), 16, 1)) == 4  # unpaired, every file counts


def test_latent_conditions_come_from_the_data_file_or_a_second_file(tmp_path):
    save_file({"latents": torch.zeros(4, 2, 8, 8)}, str(tmp_path / "t.safetensors"))
    save_file({"latents": torch.ones(4, 3, 8, 8)}, str(tmp_path / "c.safetensors"))
    save_file({"latents": torch.ones(5, 3, 8, 8)}, str(tmp_path / "c5.safetensors"))
    data = load_dataset(str(tmp_path / "t.safetensors"), 8, 2, cond=str(tmp_path / "c.safetensors"))
    assert data.concat.shape == (4, 3, 8, 8)  # a 2-channel UNet, to be widened by 3
    wide = load_dataset(str(tmp_path / "t.safetensors"), 8, 5, cond=str(tmp_path / "c.safetensors"))
    assert wide.concat.shape[1] == 3  # a UNet that takes them already
    with pytest.raises(ValueError, match=re.escape("holds (5, 3, 8, 8); the data's latents are (4, 2, 8, 8)")):
        load_dataset(str(tmp_path / "t.safetensors"), 8, 2, cond=str(tmp_path / "c5.safetensors"))
    with pytest.raises(ValueError, match="but the model takes 4 input channel"):
        load_dataset(str(tmp_path / "t.safetensors"), 8, 4, cond=str(tmp_path / "c.safetensors"))


SMALL = dict(resolution=16, batch_size=3, max_steps=2, num_samples=2, sample_steps=2, checkpoint_every=0)


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora", "full"])
def test_a_widened_export_round_trips_and_samples_with_its_condition(tmp_path, lora_rank):
    """The teacher widened for a paired folder: the export records it, d2f.load restores the trained conv_in
    (a LoRA export trains it fully, as a peft module to save) and refuses to sample without the condition."""
    write_pairs(tmp_path, [f"{i:02d}" for i in range(6)])
    out = tmp_path / "run"
    config = TrainConfig.teacher_task(
        out=str(out), data=str(tmp_path / "targets"), cond_data=str(tmp_path / "inputs"), lora_rank=lora_rank, **SMALL
    )
    train(config, progress=False)
    meta = json.loads((out / "export/d2f.json").read_text())
    assert meta["cond_channels"] == 1 and meta["cond_init"] == "zero"
    assert meta["labeled"] is False and meta["null_class"] == 10  # trained on the null class: sampled with it
    assert export_labels(meta, 3).tolist() == [10, 10, 10]
    assert export_labels({**meta, "labeled": True}, 3).tolist() == [0, 1, 2]
    if lora_rank:
        adapter = load_file(str(out / "export/adapter/adapter_model.safetensors"))
        trained = adapter["base_model.model.conv_in.weight"]
        assert trained.shape[1] == 2 and trained[:, 1:].abs().max() > 0  # moved from its zero start
    else:
        trained = UNet2DModel.from_pretrained(out / "export/unet").conv_in.weight
        assert trained.shape[1] == 2
    cond = torch.rand(4, 1, 16, 16) * 2 - 1
    field = d2f.load(out / "export", concat=cond)
    torch.testing.assert_close(field.net.conv_in.weight, trained)
    with pytest.raises(ValueError, match="was trained with a 1-channel condition per sample; pass it"):
        d2f.load(out / "export")
    first = sample_export(str(out / "export"), SamplingSettings(2), 4, concat=cond)
    again = sample_export(str(out / "export"), SamplingSettings(2), 4, concat=cond)
    other = sample_export(str(out / "export"), SamplingSettings(2), 4, concat=-cond)
    assert first.images.shape == (4, 1, 16, 16) and torch.equal(first.images, again.images)
    assert (first.images - other.images).abs().max() > 1e-4  # the condition reaches the network
    with pytest.raises(ValueError, match="trained with no condition"):
        d2f.load("teacher", concat=cond)
    if lora_rank:
        return
    # A full widened export finetuned further: its conv_in already takes the conditions, and a LoRA on it
    # loads back onto that widened base; without conditions the run is refused by name.
    again = dict(pretrained=str(out / "export"), data=str(tmp_path / "targets"), **SMALL)
    train(
        TrainConfig.teacher_task(out=str(tmp_path / "more"), cond_data=str(tmp_path / "inputs"), lora_rank=4, **again),
        progress=False,
    )
    meta = json.loads((tmp_path / "more/export/d2f.json").read_text())
    assert (meta["cond_channels"], meta["cond_init"]) == (1, None)  # nothing widened this time
    assert d2f.load(tmp_path / "more/export", concat=cond).net.conv_in.weight.shape[1] == 2
    message = "takes 2 input channels, but the data gives 1 target channel.s. and no conditions; .* --cond-data"
    with pytest.raises(ValueError, match=message):
        train(TrainConfig.teacher_task(out=str(tmp_path / "bare"), lora_rank=0, **again), progress=False)


def test_eval_task_dense_scores_depth_with_an_ensemble(tmp_path, capsys):
    """d2f eval --task dense on the held-out pairs: metrics in range, the network calls counted with the
    ensemble, and the flags of one task refused by the other."""
    from d2f.cli import main

    write_pairs(tmp_path, [f"{i:02d}" for i in range(6)])
    out = tmp_path / "run"
    flags = dict(data=str(tmp_path / "targets"), cond_data=str(tmp_path / "inputs"))
    train(TrainConfig.teacher_task(out=str(out), lora_rank=0, **flags, **SMALL), progress=False)
    argv = ["eval", "--task", "dense", "--model", str(out / "export"), "--data", flags["data"], "--steps", "2"]
    argv += ["--cond-data", flags["cond_data"], "--num-samples", "4", "--ensemble", "3"]
    argv += ["--out", str(tmp_path / "r.json")]
    assert main(argv) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert (report["solver"], report["steps"], report["ensemble"]) == ("midpoint", 1, 3)  # auto, flow-finetuned
    assert report["network_calls_per_prediction"] == 6 and report["num_pairs"] == 4
    assert 0 <= report["delta1"] <= 1 and report["abs_rel"] > 0 and report["rmse"] > 0
    png = tmp_path / "grid.png"
    sample = ["sample", "--model", str(out / "export"), "--cond-data", flags["cond_data"], "--steps", "2"]
    assert main([*sample, "--num-samples", "4", "--out", str(png)]) == 0
    assert Image.open(png).size == ((10 * 17 + 1) * 3, (2 * 17 + 1) * 3)  # conditions above samples, 10 a row
    assert main(["sample", "--cond-data", flags["cond_data"], "--out", str(png)]) == 2
    assert "teacher was trained without conditions" in capsys.readouterr().err
    assert main(["eval", "--data", flags["data"]]) == 2
    assert "--data: for --task dense only" in capsys.readouterr().err
    assert main(["eval", "--task", "dense", "--model", "teacher"]) == 2
    assert "--task dense needs --data" in capsys.readouterr().err
    # A latents file that carries its conditions (concat) needs no --cond-data.
    pairs = load_dataset(flags["data"], 16, 1, cond=flags["cond_data"])
    save_file({"latents": pairs.images, "concat": pairs.concat}, str(tmp_path / "held_out.safetensors"))
    held_out = ["eval", "--task", "dense", "--model", str(out / "export"), "--steps", "2", "--ensemble", "3"]
    held_out += ["--num-samples", "4", "--out", str(tmp_path / "l.json")]
    assert main([*held_out, "--data", str(tmp_path / "held_out.safetensors")]) == 0
    assert json.loads((tmp_path / "l.json").read_text())["delta1"] == report["delta1"]  # the same pairs, seeds


def test_a_pipeline_run_encodes_the_pairs_and_widens_its_unet(tmp_path):
    """d2f train on a tiny SD pipeline with a captioned folder and its conditions: both go through the VAE into
    the run's latents file (concat), the UNet2DConditionModel is widened by the VAE's 4 latent channels, the
    LoRA export trains conv_in fully (so no diffusers-format file, which holds LoRA weights only) and loads."""

    from pipelines import captioned_folder, condition_folder, tiny_sd_pipeline

    pipeline = tiny_sd_pipeline(tmp_path / "sd", prediction_type="v_prediction")
    images = captioned_folder(tmp_path / "images", n=6)
    cond = condition_folder(images, tmp_path / "cond")
    out = tmp_path / "run"
    config = TrainConfig(
        out=str(out), pretrained=str(pipeline), data=str(images), cond_data=str(cond), resolution=8, batch_size=3
    )
    train(config.replace(max_steps=2, num_samples=2, sample_steps=2, checkpoint_every=0), progress=False)
    encoded = load_file(str(out / "latents.safetensors"))
    assert encoded["concat"].shape == encoded["latents"].shape == (6, 4, 8, 8)
    meta = json.loads((out / "export/d2f.json").read_text())
    assert (meta["cond_channels"], meta["cond_init"], meta["pipeline"]) == (4, "zero", "StableDiffusionPipeline")
    adapter = load_file(str(out / "export/adapter/adapter_model.safetensors"))
    assert adapter["base_model.model.conv_in.weight"].shape[1] == 8
    assert not (out / "export/pytorch_lora_weights.safetensors").exists()
    field = d2f.load(out / "export", concat=encoded["concat"][:2])
    assert field.net.config.in_channels == 8
    # d2f eval --task dense on pixel pairs: conditions through the VAE in, predictions decoded and averaged out.
    from d2f.evaluation.dense import evaluate_dense

    report = evaluate_dense(str(out / "export"), SamplingSettings(2), str(images), str(cond), num_samples=4)
    assert report["num_pairs"] == 4 and report["decoded_by"] == f"{pipeline.resolve()}/vae"
    assert 0 <= report["delta1"] <= 1 and report["abs_rel"] > 0
