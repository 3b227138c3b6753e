"""``d2f sample``, ``d2f eval`` and ``d2f pairs`` on bad inputs: conditions files, counts, devices, exports of a
pipeline's UNet, non-finite or constant data, doctored exports and outputs that cannot be written. Each is
refused in one line naming the flag or file (exit status 2, no traceback) before any sampling, or, where it
is right, sampled as documented. Everything runs on the embedded teacher, widened and finetuned for two steps,
and on tiny Stable Diffusion pipelines built from configs."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from d2f.cli import main  # noqa: E402
from d2f.data.datasets import load_dataset  # noqa: E402
from d2f.evaluation.dense import depth_metrics  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402
from pipelines import captioned_folder, condition_folder, tiny_sd_pipeline  # noqa: E402

SMALL = dict(batch_size=3, max_steps=2, num_samples=2, sample_steps=2, checkpoint_every=0)
STEPS = ["--steps", "2", "--device", "cpu"]


def grey_images(folder: Path, n: int, value: int | None = None, seed: int = 0) -> Path:
    """``n`` 16x16 greyscale PNGs named 00..: random, or all ``value``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        pixels = rng.integers(0, 256, (16, 16), dtype=np.uint8) if value is None else np.full((16, 16), value, np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


@pytest.fixture(scope="module")
def depth(tmp_path_factory):
    """The teacher widened for one condition channel and finetuned on six 16x16 pairs (a full export)."""
    root = tmp_path_factory.mktemp("depth")
    targets, inputs = grey_images(root / "targets", 6), grey_images(root / "inputs", 6, seed=1)
    config = TrainConfig.teacher_task(
        out=str(root / "run"), data=str(targets), cond_data=str(inputs), resolution=16, **SMALL
    )
    train(config.replace(lora_rank=0), progress=False)
    return root / "run" / "export", targets, inputs


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    """A tiny SD pipeline and three exports of its UNet: a LoRA, a full finetune, and a LoRA widened for
    conditions (its run folder keeps the encoded pairs, a latents file with concat)."""
    root = tmp_path_factory.mktemp("sd")
    pipeline = tiny_sd_pipeline(root / "pipeline", prediction_type="v_prediction")
    images = captioned_folder(root / "images", n=6)
    cond = condition_folder(images, root / "cond")
    config = TrainConfig(pretrained=str(pipeline), data=str(images), resolution=8, **SMALL)
    for name, rank, conditions in (("lora", 4, None), ("full", 0, None), ("cond", 4, str(cond))):
        train(config.replace(out=str(root / "runs" / name), lora_rank=rank, cond_data=conditions), progress=False)
    return root, pipeline, images


def refused(capsys, argv: list[str], *fragments: str, folder: Path | None = None) -> str:
    """``argv`` ends in one line ``d2f CMD: error: ...`` holding every fragment, status 2, and writes nothing
    into ``folder``."""
    before = sorted(folder.rglob("*")) if folder else None
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith(f"d2f {argv[0]}: error: "), err
    for fragment in fragments:
        assert fragment in err[-1], (fragment, err[-1])
    if folder:
        assert sorted(folder.rglob("*")) == before
    return err[-1]


def sample_argv(export, cond, out, *more) -> list[str]:
    return ["sample", "--model", str(export), "--cond-data", str(cond), *STEPS, "--num-samples", "4", "--out", str(out)]


# 2: a conditions file is read under concat; a file of conditions alone under latents; anything else refused.
def test_sample_reads_a_files_conditions_from_concat(depth, tmp_path, capsys):
    export, targets, inputs = depth
    pairs = load_dataset(str(targets), 16, 1, cond=str(inputs))
    encoded, alone, mixed = tmp_path / "pairs.safetensors", tmp_path / "alone.safetensors", tmp_path / "m.safetensors"
    save_file({"latents": pairs.images, "concat": pairs.concat}, str(encoded))  # what d2f encode --cond-data writes
    save_file({"latents": pairs.concat}, str(alone))  # d2f train --cond-data's conditions file
    save_file({"latents": pairs.images, "labels": torch.zeros(6, dtype=torch.int64)}, str(mixed))
    grids = {}
    for name, cond in (("folder", inputs), ("encoded", encoded), ("alone", alone)):
        assert main(sample_argv(export, cond, tmp_path / f"{name}.png")) == 0
        grids[name] = (tmp_path / f"{name}.png").read_bytes()
    assert grids["encoded"] == grids["folder"] == grids["alone"]  # the conditions, never the targets
    refused(capsys, sample_argv(export, mixed, tmp_path / "x.png"), str(mixed), "no concat", folder=tmp_path)
    # d2f train and d2f eval --task dense read a conditions file by the same rule.
    save_file({"latents": pairs.images}, str(tmp_path / "targets.safetensors"))
    data = load_dataset(str(tmp_path / "targets.safetensors"), 16, 1, cond=str(encoded))
    assert torch.equal(data.concat, pairs.concat)


# 3
@pytest.mark.parametrize("count", ["0", "-5"])
def test_a_count_below_one_with_conditions_is_refused(depth, tmp_path, capsys, count):
    export, _, inputs = depth
    argv = sample_argv(export, inputs, tmp_path / "g.png")
    argv[argv.index("--num-samples") + 1] = count
    refused(capsys, argv, f"num_samples={count} must be a positive integer", folder=tmp_path)


# 9
@pytest.mark.parametrize(
    ("command", "export"),
    [("sample", "lora"), ("sample", "full"), ("eval", "lora"), ("eval", "full"), ("pairs", "lora")],
)
def test_an_export_of_a_pipelines_unet_points_to_the_pipeline(sd, tmp_path, capsys, command, export):
    root = sd[0]
    out = {
        "sample": ["--out", str(tmp_path / "g.png")],
        "eval": [],
        "pairs": ["--out", str(tmp_path / "p.safetensors")],
    }
    argv = [command, "--model", str(root / "runs" / export / "export"), *STEPS, "--num-samples", "4", *out[command]]
    how = "pipe.load_lora_weights" if export == "lora" else "unet=d2f.load"
    refused(capsys, argv, "StableDiffusionPipeline", how, "D2FScheduler.from_pretrained", folder=tmp_path)


def test_a_conditioned_pipeline_export_is_refused_before_its_conditions_are_read(sd, tmp_path, capsys):
    root, _, images = sd
    argv = sample_argv(root / "runs/cond/export", images, tmp_path / "g.png")
    refused(capsys, argv, "StableDiffusionPipeline", "d2f eval --task dense samples it", folder=tmp_path)


# 10b
DEVICES = ["meta", "xla"] + ([] if torch.backends.mps.is_available() else ["mps"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("command", ["sample", "eval", "encode"])
def test_a_device_that_cannot_run_the_network_is_refused(sd, tmp_path, capsys, command, device):
    root, pipeline, images = sd
    if command == "encode":
        argv = ["encode", "--pretrained", str(pipeline), "--data", str(images), "--resolution", "8"]
        argv += ["--out", str(tmp_path / "l.safetensors"), "--device", device]
    else:
        argv = [command, "--device", device, "--steps", "2", "--num-samples", "4"]
        argv += ["--out", str(tmp_path / ("g.png" if command == "sample" else "r.json"))]
    refused(capsys, argv, f"device={device!r}", "'cpu'", folder=tmp_path)


# 11a
@pytest.mark.parametrize("layout", ["latents", "concat", "npy"])
def test_a_nonfinite_condition_is_named_with_its_file(depth, tmp_path, capsys, layout):
    export = depth[0]
    bad = torch.rand(4, 1, 16, 16)
    bad[2, 0, 3, 3] = math.nan if layout != "npy" else math.inf
    if layout == "npy":
        path = tmp_path / "c.npy"
        np.save(path, bad.numpy())
    else:
        path = tmp_path / "c.safetensors"
        tensors = {"latents": bad} if layout == "latents" else {"latents": torch.rand(4, 1, 16, 16), "concat": bad}
        save_file(tensors, str(path))
    message = refused(capsys, sample_argv(export, path, tmp_path / "g.png"), str(path), folder=tmp_path)
    assert "latents" in message if layout != "concat" else "concat" in message
    assert "model" not in message


# 11b
def test_dense_eval_of_a_model_without_conditions_says_so(depth, tmp_path, capsys):
    _, targets, inputs = depth
    argv = ["eval", "--task", "dense", "--model", "teacher", "--data", str(targets), "--cond-data", str(inputs)]
    refused(capsys, [*argv, *STEPS], "teacher", "trained with conditions", folder=tmp_path)
    argv[argv.index("teacher")] = str(targets)
    refused(capsys, [*argv, *STEPS], f"model={str(targets)!r}: no d2f.json there", folder=tmp_path)


# 11c
@pytest.mark.parametrize(("kind", "image"), [("black", 0), ("grey", 0), ("one black", 3)])
def test_constant_depth_targets_are_named_not_the_prediction(depth, tmp_path, capsys, kind, image):
    export, _, inputs = depth
    targets = grey_images(tmp_path / "t", 6, value={"black": 0, "grey": 128}.get(kind))
    if kind == "one black":
        Image.fromarray(np.zeros((16, 16), np.uint8)).save(targets / "03.png")
    argv = ["eval", "--task", "dense", "--model", str(export), "--data", str(targets), "--cond-data", str(inputs)]
    message = refused(capsys, [*argv, *STEPS, "--num-samples", "6"], f"data={str(targets)!r}", f"target {image}")
    assert "prediction" not in message
    with pytest.raises(ValueError, match="gt image 1: .*no depth"):
        depth_metrics(torch.rand(2, 1, 4, 4), torch.cat([torch.rand(1, 1, 4, 4) + 0.1, torch.zeros(1, 1, 4, 4)]))


# 11d: the folder is probed when the output path is made (d2f._files.output_path), before any sampling.
def read_only_folder_run(folder: Path, argv: list[str]) -> subprocess.CompletedProcess:
    """``d2f argv`` with ``folder`` read-only: a read-only bind mount for root (whom permissions do not stop),
    else a folder without write permission."""
    if os.geteuid() != 0:
        folder.chmod(0o555)
        command = [sys.executable, "-m", "d2f", *argv]
    else:
        mount = 'mount --bind "$0" "$0" && mount -o remount,ro,bind "$0" && exec "$@"'
        if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode:
            pytest.skip("root without a mount namespace: no read-only folder to write to")
        command = ["unshare", "-m", "sh", "-c", mount, str(folder), sys.executable, "-m", "d2f", *argv]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=120)
    finally:
        folder.chmod(0o755)


@pytest.mark.parametrize(("command", "name"), [("sample", "g.png"), ("eval", "r.json"), ("pairs", "p.safetensors")])
def test_a_read_only_out_is_refused_before_sampling(tmp_path, command, name):
    """A million Euler steps would take minutes: the refusal comes before the first."""
    folder = tmp_path / "ro"
    folder.mkdir()
    argv = [command, "--steps", "1000000", "--solver", "euler", "--num-samples", "4", "--out", str(folder / name)]
    run = read_only_folder_run(folder, [*argv, "--device", "cpu"])
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith(f"d2f {command}: error: [Errno ") and last.endswith(f": '{folder / name}'"), last
    assert ".tmp-" not in last and list(folder.iterdir()) == []


# The adversarial pass: what it found beyond the numbered defects.
@pytest.mark.parametrize(
    ("tensor", "fragment"),
    [
        (torch.rand(4, 16), "latents has shape (4, 16)"),
        (torch.rand(4, 1, 1, 16, 16), "latents has shape (4, 1, 1, 16, 16)"),
        (torch.rand(4, 3, 16, 16), "3 channels"),
        (torch.rand(0, 1, 16, 16), "no conditions"),
        (torch.ones(4, 1, 16, 16, dtype=torch.int64), "dtype torch.int64"),
        (torch.ones(4, 1, 16, 16, dtype=torch.bool), "dtype torch.bool"),
    ],
    ids=["2-D", "5-D", "channels", "empty", "int64", "bool"],
)
def test_a_conditions_file_the_export_cannot_take_is_refused_by_name(depth, tmp_path, capsys, tensor, fragment):
    path = tmp_path / "c.safetensors"
    save_file({"latents": tensor}, str(path))
    refused(capsys, sample_argv(depth[0], path, tmp_path / "g.png"), str(path), fragment, folder=tmp_path)


def test_resolution_must_agree_with_a_conditions_latents_file(depth, tmp_path, capsys):
    path = tmp_path / "c.safetensors"
    save_file({"latents": torch.rand(4, 1, 16, 16)}, str(path))
    argv = [*sample_argv(depth[0], path, tmp_path / "g.png"), "--resolution", "32"]
    refused(capsys, argv, "resolution=32", "16x16", str(path), folder=tmp_path)


def test_lora_names_a_lora_export(depth, tmp_path, capsys):
    argv = ["sample", *STEPS, "--lora", str(depth[0]), "--out", str(tmp_path / "g.png")]
    refused(capsys, argv, f"lora={str(depth[0])!r} is a full export", "--model", folder=tmp_path)
    argv[argv.index("--lora") + 1] = str(tmp_path / "none")
    refused(capsys, argv, f"lora={str(tmp_path / 'none')!r}: no d2f.json there", folder=tmp_path)


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"null_class": -3}, "null_class=-3"),
        ({"null_class": 99}, "null_class=99"),
        ({"objective": "bogus"}, "objective='bogus'"),
        ({"resolution": 0}, "resolution=0"),
        ({"cond_channels": -1}, "cond_channels=-1"),
        ({"cond_channels": 3}, "cond_channels=3"),
    ],
    ids=["null-class-negative", "null-class-beyond-embeddings", "objective", "resolution", "cond-negative", "cond-lie"],
)
def test_a_doctored_export_is_refused_naming_its_d2f_json(depth, tmp_path, capsys, changes, fragment):
    export = tmp_path / "export"
    shutil.copytree(depth[0], export)
    meta = json.loads((export / "d2f.json").read_text())
    (export / "d2f.json").write_text(json.dumps({**meta, **changes}))
    cond = tmp_path / "c.safetensors"
    save_file({"latents": torch.rand(4, max(changes.get("cond_channels", 1), 1), 16, 16)}, str(cond))
    refused(capsys, sample_argv(export, cond, tmp_path / "g.png"), fragment, "d2f.json")


def test_dense_eval_refuses_conditions_its_model_cannot_take(depth, sd, tmp_path, capsys):
    export, *_ = depth
    data = tmp_path / "held_out.safetensors"
    save_file({"latents": torch.rand(4, 1, 16, 16), "concat": torch.rand(4, 3, 16, 16)}, str(data))
    argv = ["eval", "--task", "dense", "--model", str(export), "--data", str(data), *STEPS, "--num-samples", "4"]
    refused(capsys, argv, f"data={str(data)!r}", "conditions have 3 channels", "1 condition channel")
    root = sd[0]
    argv = ["eval", "--task", "dense", "--model", str(root / "runs/cond/export"), *STEPS, "--num-samples", "4"]
    refused(capsys, [*argv, "--data", str(root / "runs/cond/latents.safetensors")], "latents file", "image pairs")


@pytest.mark.parametrize(
    "argv",
    [["sample", "--resolution", "100000"], ["eval", "--num-samples", str(10**9)]],
    ids=["resolution", "num-samples"],
)
def test_samples_beyond_the_machines_memory_are_refused(tmp_path, capsys, argv):
    out = ["--out", str(tmp_path / ("g.png" if argv[0] == "sample" else "r.json"))]
    refused(capsys, [*argv, *STEPS, *out], "GiB", "more than this machine", folder=tmp_path)


def test_a_seed_torch_cannot_take_is_refused(tmp_path, capsys):
    argv = ["sample", *STEPS, "--seed", str(2**70), "--out", str(tmp_path / "g.png")]
    refused(capsys, argv, f"seed={2**70}", folder=tmp_path)


@pytest.mark.gpu
def test_a_cuda_device_beyond_the_machines_is_refused(tmp_path, capsys):
    index = torch.cuda.device_count()
    argv = ["sample", "--steps", "2", "--device", f"cuda:{index}", "--out", str(tmp_path / "g.png")]
    refused(capsys, argv, f"device='cuda:{index}'", f"{index} CUDA device", folder=tmp_path)
