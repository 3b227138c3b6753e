"""Reflow: ``d2f pairs`` writes noise -> sample pairs, ``d2f train --pairs`` trains on exactly those pairs."""

import json
import pickle

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from safetensors.torch import save_file  # noqa: E402

import d2f  # noqa: E402
from d2f.cli import main  # noqa: E402
from d2f.data.pairs import PAIRS, generate_pairs, load_pairs  # noqa: E402
from d2f.networks.sampling import SamplingSettings, sample_export  # noqa: E402
from d2f.training import loop, objectives  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from nets import teacher_flags  # noqa: E402


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.safetensors"
    settings = SamplingSettings(steps=3, seed=5, solver="euler", grid="ddim")
    generate_pairs("teacher", path, num_pairs=12, settings=settings)
    return path


def test_pairs_are_the_teachers_ode_map_of_their_noise(pairs_file):
    """Euler on DDIM's grid is DDIM (E1), so diffusers' own DDIM loop on the teacher's UNet, started from the stored
    noise, must give the stored images."""
    from diffusers import DDIMScheduler

    from d2f.networks.export import ddim_config
    from d2f.networks.sampling import scheduler_loop

    data = load_pairs(pairs_file)
    assert data.images.shape == data.noise.shape == (12, 1, 16, 16)
    torch.testing.assert_close(data.noise, torch.randn(12, 1, 16, 16, generator=torch.Generator().manual_seed(5)))
    assert data.labels.tolist() == [i % 10 for i in range(12)]
    field = d2f.load("teacher")
    # d2f's ddim grid: SD's step rule, ending at alphabar = 1 (t = 1, where the FM state is the latent)
    ddim = DDIMScheduler.from_config({**ddim_config(field.schedule, field.prediction_type), "set_alpha_to_one": True})
    with torch.no_grad():
        reference = scheduler_loop(field.net, ddim, data.noise, 3, {"class_labels": data.labels})
    torch.testing.assert_close(data.images, reference, rtol=1e-4, atol=1e-4)
    assert not list(pairs_file.parent.glob(".*tmp*"))  # written through a temporary file, renamed


def test_reflow_feeds_the_stored_noise_to_the_network(pairs_file, tmp_path, monkeypatch):
    seen = []
    original = objectives.network_input

    def spy(clean, noise, t, dtype=None):
        seen.append((clean, noise))
        return original(clean, noise, t, dtype=dtype)

    monkeypatch.setattr(objectives, "network_input", spy)
    config = TrainConfig.teacher_task(
        out=str(tmp_path / "reflow"),
        pairs=str(pairs_file),
        resolution=16,
        lora_rank=0,
        max_steps=3,
        batch_size=5,
        num_samples=2,
        sample_steps=1,
        checkpoint_every=0,
    )
    metrics = loop.train(config, progress=False)
    data = load_pairs(pairs_file)
    assert len(seen) == 3 and torch.isfinite(torch.tensor(metrics["final_loss"]))
    for clean, noise in seen:  # every image arrives with its own stored noise
        for image, eps in zip(clean, noise):
            index = int((data.images - image).flatten(1).abs().amax(1).argmin())
            torch.testing.assert_close(image, data.images[index], rtol=0, atol=0)
            torch.testing.assert_close(eps, data.noise[index], rtol=0, atol=0)


def test_bad_pairs_are_refused(pairs_file, tmp_path, capsys):
    with pytest.raises(ValueError, match="not 'diffusion'"):
        TrainConfig.teacher_task(pairs=str(pairs_file), objective="diffusion")
    with pytest.raises(ValueError, match="give data \\(and classes\\) or pairs, not both"):
        TrainConfig.teacher_task(pairs=str(pairs_file), data="digits")
    with pytest.raises(ValueError, match="pass --resolution 16"):
        loop.train(TrainConfig.teacher_task(out=str(tmp_path / "r"), pairs=str(pairs_file)), progress=False)
    with pytest.raises(ValueError, match="no such file"):
        load_pairs(tmp_path / "missing.safetensors")
    planted = tmp_path / "planted.safetensors"
    planted.write_bytes(pickle.dumps({"noise": torch.zeros(1)}))
    with pytest.raises(ValueError, match="not a d2f pairs file"):
        load_pairs(planted)
    document = json.dumps({"format": PAIRS.format, "version": PAIRS.version, "model": "teacher"})
    save_file(
        {"noise": torch.zeros(2, 1, 4, 4), "sample": torch.zeros(2, 1, 4, 4)}, str(tmp_path / "m.st"), {"d2f": document}
    )
    with pytest.raises(ValueError, match="missing keys"):
        load_pairs(tmp_path / "m.st")
    full = json.loads(document) | {k: 0 for k in ("steps", "solver", "grid", "shift", "guidance", "seed", "seconds")}
    bad = {"noise": torch.zeros(2, 1, 4, 4), "sample": torch.full((2, 1, 4, 4), float("nan"))}
    save_file(bad, str(tmp_path / "nan.st"), {"d2f": json.dumps(full)})
    with pytest.raises(ValueError, match="sample contains NaN or inf"):
        load_pairs(tmp_path / "nan.st")
    save_file(
        {"noise": torch.zeros(2, 1, 4, 4), "sample": torch.zeros(3, 1, 4, 4)},
        str(tmp_path / "s.st"),
        {"d2f": json.dumps(full)},
    )
    with pytest.raises(ValueError, match="must be the same"):
        load_pairs(tmp_path / "s.st")
    assert main(["pairs", "--num-samples", "0", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "num_pairs=0 must be a positive integer" in capsys.readouterr().err
    # a pipeline's pairs are drawn by its own scheduler: d2f's sampler flags are refused by name, not ignored
    pipeline = ["pairs", "--model", "miniature", "--prompts", str(tmp_path), "--out", str(tmp_path / "p.safetensors")]
    assert main([*pipeline, "--solver", "heun"]) == 2
    assert "--solver heun set with --prompts" in capsys.readouterr().err
    # even when a flag names the sampler an export's pairs would take by default
    assert main([*pipeline, "--solver", "euler", "--grid", "uniform", "--shift", "3"]) == 2
    assert "--solver euler, --grid uniform, --shift 3.0 set with --prompts" in capsys.readouterr().err
    assert main([*pipeline[:1], *pipeline[3:]]) == 2  # --model left at teacher
    assert "pass --model PIPELINE" in capsys.readouterr().err
    assert main([*pipeline[:4], str(tmp_path / "none"), *pipeline[5:]]) == 2
    assert "none: no such folder" in capsys.readouterr().err
    assert main(["pairs", "--resolution", "32", "--out", str(tmp_path / "p.safetensors")]) == 2
    assert "--resolution is for a pipeline's pairs" in capsys.readouterr().err


def test_cli_pairs_then_reflow(tmp_path, capsys):
    pairs = tmp_path / "p.safetensors"
    assert main(["pairs", "--num-samples", "6", "--steps", "2", "--out", str(pairs)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["num_pairs"] == 6
    # unset sampler flags stand for the export's pairs sampler
    assert {key: printed[key] for key in ("solver", "grid", "shift")} == {
        "solver": "euler",
        "grid": "uniform",
        "shift": 3.0,
    }
    args = ["train", *teacher_flags(), "--pairs", str(pairs), "--resolution", "16", "--max-steps", "1"]
    args += ["--batch-size", "3"]
    args += ["--num-samples", "2", "--sample-steps", "1", "--no-progress", "--out", str(tmp_path / "r")]
    assert main(args) == 0
    assert (tmp_path / "r" / "export" / "d2f.json").is_file()


def test_sampling_settings_are_checked_by_name():
    with pytest.raises(ValueError, match="steps=0 must be a positive integer"):
        SamplingSettings(steps=0)
    with pytest.raises(ValueError, match="solver='rk4' is not supported"):
        SamplingSettings(solver="rk4")
    with pytest.raises(ValueError, match="grid='karras' is not supported"):
        SamplingSettings(grid="karras")
    with pytest.raises(ValueError, match="device='gpu0' is not a torch device"):
        SamplingSettings(device="gpu0")
    with pytest.raises(ValueError, match="device=device.type='cpu'. must be a device name"):
        SamplingSettings(device=torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device='cuda:1': CUDA is not available here"):
            SamplingSettings(device="cuda:1")


def test_the_noise_is_the_seeds_cpu_draw_on_any_device():
    cpu = sample_export("teacher", SamplingSettings(steps=2, seed=3, device="cpu"), num_samples=3)
    expected = torch.randn(3, 1, 16, 16, generator=torch.Generator().manual_seed(3))
    assert torch.equal(cpu.noise, expected) and cpu.images.device.type == "cpu" and cpu.settings.device == "cpu"


@pytest.mark.gpu
def test_the_device_moves_the_network_not_the_noise():
    cpu = sample_export("teacher", SamplingSettings(steps=2, seed=3, device="cpu"), num_samples=3)
    cuda = sample_export("teacher", SamplingSettings(steps=2, seed=3, device="cuda"), num_samples=3)
    assert torch.equal(cuda.noise, cpu.noise) and cuda.settings.device == "cuda"
    torch.testing.assert_close(cuda.images.cpu(), cpu.images, rtol=1e-4, atol=1e-4)  # float rounding only
