"""The trainer on the embedded teacher: objectives, LoRA and full, resume, data parallel, export, CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

import d2f  # noqa: E402
from d2f import NonFiniteError  # noqa: E402
from d2f.cli import main  # noqa: E402
from d2f.networks.teachers import teacher_path  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402
from nets import teacher_flags, tiny_cond_unet, tiny_unet  # noqa: E402

SMALL = dict(
    resolution=16, batch_size=4, max_steps=2, num_samples=4, sample_steps=2, checkpoint_every=0, warmup_steps=1
)


def config(tmp_path, name="run", **changes):
    return TrainConfig.teacher_task(**{**SMALL, "out": str(tmp_path / name), **changes})


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("objective", ["d2f", "fm", "diffusion"])
@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_each_objective_trains_exports_and_loads(tmp_path, objective, lora_rank):
    metrics = train(config(tmp_path, objective=objective, lora_rank=lora_rank), progress=False)
    out = tmp_path / "run"
    for name in ("samples.png", "loss.png", "metrics.json", "config.json", "zero_shot.png", "export/d2f.json"):
        assert (out / name).is_file(), name
    assert np.isfinite(metrics["final_loss"]) and metrics["steps"] == 2
    assert metrics["zero_shot_max_abs_diff_vs_ddim"] < 1e-4  # the converted teacher *is* DDIM
    field = d2f.load(out / "export")
    assert field.prediction_type == ("velocity" if objective == "fm" else "v_prediction")
    assert field.align_input == (objective != "fm")
    # Its grids start at the lowest t its training drew: logit-normal reaches t = 0 for these prediction types,
    # diffusion's timesteps stop at T-1. The scheduler config the export writes says the same.
    meta = json.loads((out / "export" / "d2f.json").read_text())
    assert meta["t_min"] == field.t_min == (field.schedule.t_min if objective == "diffusion" else 0.0)
    if objective != "fm":
        scheduler = d2f.D2FScheduler.from_pretrained(out / "export", subfolder="scheduler")
        assert scheduler.config.t_min == field.t_min
    x = field.sample(torch.randn(2, 1, 16, 16), d2f.uniform_grid(2, 0.0, 1.0), class_labels=torch.tensor([3, 7]))
    assert x.shape == (2, 1, 16, 16) and bool(x.isfinite().all())


def test_exports_written_before_t_min_was_recorded_start_where_their_training_did():
    """The embedded teacher's d2f.json predates the key: its diffusion training's lowest time is timestep T-1."""
    teacher = d2f.load("teacher")
    assert "t_min" not in json.loads((teacher_path() / "d2f.json").read_text())
    assert teacher.t_min == teacher.schedule.t_min > 0.06
    assert torch.equal(teacher.grid("uniform", 4), d2f.uniform_grid(4, teacher.schedule.t_min))


def test_lora_export_round_trip_restores_adapter_and_full_convs(tmp_path):
    train(config(tmp_path, lora_rank=4, max_steps=3, resolution=24), progress=False)
    meta = json.loads((tmp_path / "run" / "export" / "d2f.json").read_text())
    assert meta["kind"] == "lora" and meta["base"] == "teacher" and meta["resolution"] == 24
    teacher, tuned = d2f.load("teacher"), d2f.load(tmp_path / "run" / "export")
    assert not torch.equal(teacher.net.conv_in.weight, tuned.net.conv_in.weight)
    assert not torch.equal(teacher.net.conv_out.weight, tuned.net.conv_out.weight)
    assert any("lora_B" in n and p.abs().max() > 0 for n, p in tuned.net.named_parameters())
    x, labels = torch.randn(2, 1, 24, 24), torch.tensor([1, 2])
    assert not torch.allclose(teacher(x, 0.5, class_labels=labels), tuned(x, 0.5, class_labels=labels))
    # The EMA weights were exported: loading twice gives the same field.
    again = d2f.load(tmp_path / "run" / "export")
    torch.testing.assert_close(again(x, 0.5, class_labels=labels), tuned(x, 0.5, class_labels=labels))


@pytest.mark.parametrize("lora_rank", [4, 0], ids=["lora", "full"])
def test_resume_is_bitwise_exact(tmp_path, lora_rank):
    """6 steps straight == 3 steps, then --resume in a new process, 3 more: weights, EMA, optimizer, bit for bit."""
    base = dict(lora_rank=lora_rank, max_steps=6, checkpoint_every=3, num_samples=2, sample_steps=1)
    train(config(tmp_path, "straight", **base), progress=False)
    train(config(tmp_path, "split", **{**base, "max_steps": 3}), progress=False)
    flags = [
        *teacher_flags(),
        "--resolution",
        "16",
        "--batch-size",
        "4",
        "--warmup-steps",
        "1",
        "--checkpoint-every",
        "3",
        "--num-samples",
        "2",
        "--sample-steps",
        "1",
        "--lora-rank",
        str(lora_rank),
        "--max-steps",
        "6",
    ]
    resumed = subprocess.run(
        [sys.executable, "-m", "d2f", "train", *flags, "--no-progress", "--out", str(tmp_path / "split"), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for file in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
        a = tensors(tmp_path / "straight" / "checkpoints" / "step-00000006" / file)
        b = tensors(tmp_path / "split" / "checkpoints" / "step-00000006" / file)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (file, key)
    straight = json.loads((tmp_path / "straight" / "checkpoints" / "step-00000006" / "state.json").read_text())
    split = json.loads((tmp_path / "split" / "checkpoints" / "step-00000006" / "state.json").read_text())
    assert straight["losses"] == split["losses"]


@pytest.mark.slow
def test_two_process_data_parallel_matches_one_process(tmp_path):
    """accelerate launch, 2 CPU processes x batch 4 == 1 process x batch 8 (same samples, same draws)."""
    common = [
        *teacher_flags(),
        "--max-steps",
        "2",
        "--resolution",
        "16",
        "--checkpoint-every",
        "2",
        "--num-samples",
        "2",
        "--sample-steps",
        "1",
        "--warmup-steps",
        "1",
        "--lora-rank",
        "4",
        "--no-progress",
    ]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "d2f",
        "train",
    ]
    dp = subprocess.run(
        launch + common + ["--batch-size", "4", "--out", str(tmp_path / "dp")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert dp.returncode == 0, dp.stderr[-3000:]
    assert json.loads((tmp_path / "dp" / "metrics.json").read_text())["processes"] == 2
    train(
        config(tmp_path, "single", lora_rank=4, batch_size=8, checkpoint_every=2, num_samples=2, sample_steps=1),
        progress=False,
    )
    dp_step, single_step = (tmp_path / name / "checkpoints" / "step-00000002" for name in ("dp", "single"))
    # Same samples, noise and t: both steps' mean losses agree to float rounding (other draws move them by ~1e-2).
    losses = [json.loads((s / "state.json").read_text())["losses"] for s in (dp_step, single_step)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # The weights differ by reduction order only (2 processes x 1 thread against 1 process x all threads). AdamW
    # divides each gradient element by its own size, so an element whose gradient nearly cancels over the batch
    # gets an update whose size rounding decides, bounded by the lr of each step. Such elements are rare
    # (1 in 2304 seen on a 2-core AMD EPYC); every other element must agree tightly.
    a, b = tensors(dp_step / "trainable.safetensors"), tensors(single_step / "trainable.safetensors")
    lr_sum = sum(TrainConfig.teacher_task(lora_rank=4, warmup_steps=1).lr_at(step) for step in range(2))
    loose = sum(int((~torch.isclose(a[k], b[k], rtol=1e-4, atol=1e-5)).sum()) for k in a)
    assert loose <= 1e-3 * sum(a[k].numel() for k in a), f"{loose} elements differ beyond float rounding"
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= lr_sum


def test_conditioned_unets_encoder_hidden_states_and_concat(tmp_path):
    """A UNet2DConditionModel fed text embeddings, and a UNet2DModel with concat channels, from latents."""
    from diffusers import DDIMScheduler
    from safetensors.torch import save_file

    torch.manual_seed(0)
    cond_unet = tiny_cond_unet(channels=2, cross_attention_dim=6)
    concat_unet = tiny_unet(in_channels=3, out_channels=2)
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="epsilon")
    for name, unet in (("text", cond_unet), ("concat", concat_unet)):
        unet.save_pretrained(tmp_path / name / "unet")
        scheduler.save_pretrained(tmp_path / name / "scheduler")
    n = 6
    save_file(
        {
            "latents": torch.randn(n, 2, 8, 8),
            "encoder_hidden_states": torch.randn(n, 3, 6),
            "null_encoder_hidden_states": torch.zeros(1, 3, 6),
        },
        str(tmp_path / "text.safetensors"),
    )
    save_file(
        {"latents": torch.randn(n, 2, 8, 8), "concat": torch.randn(n, 1, 8, 8)}, str(tmp_path / "concat.safetensors")
    )
    for name in ("text", "concat"):
        metrics = train(
            config(
                tmp_path,
                f"run-{name}",
                pretrained=str(tmp_path / name),
                resolution=8,
                data=str(tmp_path / f"{name}.safetensors"),
                lora_rank=0,
                cond_dropout=0.5 if name == "text" else 0.0,
            ),
            progress=False,
        )
        assert np.isfinite(metrics["final_loss"])
        assert metrics["zero_shot_max_abs_diff_vs_ddim"] < 1e-4


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_bf16_mixed_precision_keeps_trainable_weights_fp32(tmp_path, monkeypatch, mixed_precision):
    """Under bf16 autocast the training forward's convolutions compute in bf16 (observed inside the forward) while
    the weights the optimiser updates stay fp32; without it they compute in fp32."""
    forward, seen = torch.nn.Conv2d.forward, set()

    def observed(self, x):
        out = forward(self, x)
        if torch.is_grad_enabled():  # the training step's forward, not sampling or validation
            seen.add(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv2d, "forward", observed)
    metrics = train(config(tmp_path, mixed_precision=mixed_precision, checkpoint_every=2), progress=False)
    weights = tensors(tmp_path / "run" / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert np.isfinite(metrics["final_loss"]) and all(w.dtype == torch.float32 for w in weights.values())
    assert seen == {torch.bfloat16 if mixed_precision == "bf16" else torch.float32}, seen


def test_image_folder_counts_unreadable_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(
            folder / f"{i}.png"
        )
    (folder / "broken.png").write_bytes(b"not a png")
    (folder / "empty.jpg").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 2 unreadable file"):
        metrics = train(config(tmp_path, data=str(folder), lora_rank=0), progress=False)
    assert np.isfinite(metrics["final_loss"])


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contradicts objective='diffusion'"):
        TrainConfig.teacher_task(objective="diffusion", t_sampler="uniform")
    with pytest.raises(ValueError, match="did you mean 'max_steps'"):
        TrainConfig.from_dict({"max_step": 3})
    for lr in (0, math.inf, math.nan, True):
        with pytest.raises(ValueError, match=f"lr={lr!r} is not allowed: None .* or a number in \\(0, inf\\)"):
            TrainConfig.teacher_task(lr=lr)
    with pytest.raises(ValueError, match="resolution=15: 15x15 samples do not fit this UNet2DModel, whose 2 down"):
        train(config(tmp_path, resolution=15), progress=False)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".d2f.lock"]  # refused before writing anything
    with pytest.raises(ValueError, match="mixed_precision='fp16' is refused on the CPU"):
        train(config(tmp_path, mixed_precision="fp16"), progress=False)
    with pytest.raises(ValueError, match="no such file or folder"):
        train(config(tmp_path, data=str(tmp_path / "missing")), progress=False)
    with pytest.raises(ValueError, match="labels \\[12\\] do not occur in mnist"):
        train(config(tmp_path, classes=(3, 12)), progress=False)
    np.save(tmp_path / "two.npy", np.zeros((4, 2, 16, 16), dtype=np.float32))
    with pytest.raises(ValueError, match="but the model takes 1 input channel"):
        train(config(tmp_path, data=str(tmp_path / "two.npy")), progress=False)


def test_default_lr_depends_on_capacity():
    """Without --lr, LoRA and full finetuning get the lr the settings study picked for each."""
    from d2f.training.config import DEFAULT_LR_FULL, DEFAULT_LR_LORA

    assert TrainConfig.teacher_task().resolved_lr == DEFAULT_LR_LORA
    assert TrainConfig.teacher_task(lora_rank=0).resolved_lr == DEFAULT_LR_FULL != DEFAULT_LR_LORA
    assert TrainConfig.teacher_task(lora_rank=0, lr=5e-4).resolved_lr == 5e-4
    assert TrainConfig.teacher_task(lora_rank=0, warmup_steps=10).lr_at(4) == pytest.approx(DEFAULT_LR_FULL / 2)
    assert TrainConfig.from_dict(TrainConfig.teacher_task().to_dict()).lr is None
    with pytest.raises(ValueError, match="lr='fast' is not allowed: None"):
        TrainConfig.teacher_task(lr="fast")


def test_checkpoints_are_protected(tmp_path):
    train(config(tmp_path, checkpoint_every=1, num_samples=2, sample_steps=1), progress=False)
    with pytest.raises(ValueError, match="holds files of an earlier run .* pass --resume to continue it"):
        train(config(tmp_path, checkpoint_every=1), progress=False)
    with pytest.raises(ValueError, match="different lr"):
        train(config(tmp_path, lr=0.5, max_steps=3), resume="latest", progress=False)
    with pytest.raises(ValueError, match="no complete checkpoint"):
        train(config(tmp_path, "fresh"), resume="latest", progress=False)
    latest = tmp_path / "run" / "checkpoints" / "step-00000002"
    data = (latest / "trainable.safetensors").read_bytes()
    (latest / "trainable.safetensors").write_bytes(data[: len(data) // 2])
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="missing or broken"):
        train(config(tmp_path, max_steps=3), resume="latest", progress=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before
    # A half-written checkpoint folder (no state.json) is never picked up.
    (tmp_path / "run" / "checkpoints" / ".tmp-step-00000009-1").mkdir()
    (tmp_path / "run" / "checkpoints" / "step-00000009").mkdir()
    from d2f.training.checkpoint import latest_checkpoint

    assert latest_checkpoint(tmp_path / "run") == latest


def test_the_captioned_digits_need_a_pipeline_and_say_how_to_run_the_teacher(tmp_path):
    """The main job's data with the pixel teacher (the main job before): refused by name, with the data it takes."""
    with pytest.raises(
        ValueError,
        match=r"data='captioned-digits' is a captioned image folder, which needs a "
        r"text-to-image pipeline as pretrained .* teacher is not one: give it data 'mnist'",
    ):
        train(TrainConfig(out=str(tmp_path / "run"), pretrained="teacher", max_steps=1), progress=False)
    assert not (tmp_path / "run" / "captioned-digits").exists()


def test_cli_flags_and_sample(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--bogus-flag"])
    assert exit_info.value.code == 2 and "--bogus-flag" in capsys.readouterr().err
    assert main(["train", "--objective", "diffusion", "--t-sampler", "uniform", "--out", str(tmp_path / "x")]) == 2
    assert "contradicts objective='diffusion'" in capsys.readouterr().err
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "d2f",
            "train",
            *teacher_flags(),
            "--max-steps",
            "2",
            "--batch-size",
            "4",
            "--resolution",
            "16",
            "--num-samples",
            "2",
            "--sample-steps",
            "2",
            "--no-progress",
            "--out",
            str(tmp_path / "cli"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    grid = tmp_path / "grid.png"
    assert (
        main(
            [
                "sample",
                "--model",
                str(tmp_path / "cli" / "export"),
                "--steps",
                "3",
                "--num-samples",
                "4",
                "--guidance",
                "2",
                "--out",
                str(grid),
            ]
        )
        == 0
    )
    assert grid.stat().st_size > 0


def test_embedded_teacher_is_small_and_loads():
    weights = teacher_path() / "unet" / "diffusion_pytorch_model.safetensors"
    assert weights.stat().st_size <= 5 * 2**20
    field = d2f.load("teacher")
    assert field.prediction_type == "v_prediction" and field.schedule == d2f.Schedule.scaled_linear(
        prediction_type="v_prediction"
    )


def test_mnist_images_and_labels_line_up():
    """500 digits per class; a class's mean image is that digit (1s are thin, 0s are hollow)."""
    from d2f.data.images import mnist

    data = mnist(28)
    assert data.labels.bincount().tolist() == [500] * 10
    ink = [(data.images[data.labels == c] > 0).float().mean().item() for c in range(10)]
    assert ink[1] == min(ink)
    centre = [data.images[data.labels == c][:, 0, 12:16, 12:16].mean().item() for c in range(10)]
    assert centre[0] == min(centre)


@pytest.fixture
def nan_at_training_call():
    """Make the UNet return NaN on its ``n``-th training forward (a diverged network, not bad data), or
    (``gradient=True``) keep the output and make its gradient NaN: a finite loss whose update diverges.
    ``onward``: every training forward from the ``n``-th on."""
    from diffusers.models.unets.unet_2d import UNet2DOutput

    calls, handles = {"n": 0, "at": None, "gradient": False, "onward": False}, []

    def hook(module, args, output):
        if type(module).__name__ != "UNet2DModel" or not module.training:
            return None
        calls["n"] += 1
        if not (calls["n"] == calls["at"] or (calls["onward"] and calls["n"] > calls["at"])):
            return None
        if calls["gradient"]:
            output.sample.register_hook(lambda grad: grad * torch.nan)
            return None
        return UNet2DOutput(sample=output.sample * torch.nan)

    def arm(n, gradient=False, onward=False):
        calls.update(at=n, gradient=gradient, onward=onward)
        handles.append(torch.nn.modules.module.register_module_forward_hook(hook))

    yield arm
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("objective", ["d2f", "diffusion"])
def test_nonfinite_loss_stops_with_step_batch_and_checkpoint(tmp_path, nan_at_training_call, objective):
    nan_at_training_call(3)
    with pytest.raises(FloatingPointError) as info:
        train(config(tmp_path, objective=objective, max_steps=4, checkpoint_every=2), progress=False)
    message = str(info.value)
    assert "non-finite loss nan at step 3" in message
    assert f"last good checkpoint: {tmp_path / 'run' / 'checkpoints' / 'step-00000002'}" in message
    from d2f.training.draws import Stream

    expected = Stream(5000, 0).indices(torch.arange(8, 12)).tolist()  # step 3 = stream positions 8..11
    assert f"batch indices (into the data set) {expected}" in message


def test_nan_noise_at_step_k_is_reported_with_its_step_and_indices(tmp_path, monkeypatch):
    """The step's checks stay on the device and are read with its loss (d2f.deferred): a NaN in the noise of
    step 3 is still reported as step 3's, with its batch, before its update, and nothing is exported."""
    import d2f.training.loop as loop

    calls = {"n": 0}

    def draws(*args, **kwargs):
        noise, times, drop = real(*args, **kwargs)
        calls["n"] += 1
        return (noise * math.nan if calls["n"] == 3 else noise), times, drop

    real = loop.draws
    monkeypatch.setattr(loop, "draws", draws)
    with pytest.raises(NonFiniteError) as info:
        train(config(tmp_path, max_steps=4, checkpoint_every=2), progress=False)
    from d2f.training.draws import Stream

    expected = Stream(5000, 0).indices(torch.arange(8, 12)).tolist()  # step 3 = stream positions 8..11
    assert str(info.value) == (
        f"d2f train: step 3, batch indices (into the data set) {expected}: network_input: noise contains NaN or inf"
    )
    assert info.value.tensor == "noise"
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-00000002"]
    assert not (tmp_path / "run" / "export").exists()


def test_nonfinite_skip_leaves_the_weights_of_that_step_untouched(tmp_path, nan_at_training_call):
    nan_at_training_call(2)
    metrics = train(config(tmp_path, "skip", max_steps=3, checkpoint_every=1, on_nonfinite="skip"), progress=False)
    assert metrics["skipped_steps"] == [2] and np.isfinite(metrics["final_loss"])
    ckpt = tmp_path / "skip" / "checkpoints"
    for file in ("trainable.safetensors", "ema.safetensors"):
        a, b = tensors(ckpt / "step-00000001" / file), tensors(ckpt / "step-00000002" / file)
        assert all(torch.equal(a[k], b[k]) for k in a), file
    a, c = (
        tensors(ckpt / "step-00000002" / "trainable.safetensors"),
        tensors(ckpt / "step-00000003" / "trainable.safetensors"),
    )
    assert not all(torch.equal(a[k], c[k]) for k in a)  # training went on after the skipped step


@pytest.mark.parametrize("on_nonfinite", ["stop", "skip"])
def test_a_diverged_update_never_becomes_a_checkpoint_or_export(tmp_path, nan_at_training_call, on_nonfinite):
    """The loss of step 2 is finite but its update makes every weight NaN: the step-2 checkpoint is refused,
    and the error names step 1 as the last good one (whose weights are finite). With ``skip`` the NaN losses
    of later steps would be skipped, but the checkpoint check stops the run all the same."""
    nan_at_training_call(2, gradient=True)
    with pytest.raises(FloatingPointError) as info:
        train(config(tmp_path, max_steps=4, checkpoint_every=1, on_nonfinite=on_nonfinite), progress=False)
    last = tmp_path / "run" / "checkpoints" / "step-00000001"
    assert "the weights after step 2 hold NaN or inf" in str(info.value)
    assert f"Last good checkpoint: {last};" in str(info.value)
    assert sorted(p.name for p in last.parent.iterdir()) == ["step-00000001"]
    for file in ("trainable.safetensors", "ema.safetensors"):
        assert all(bool(torch.isfinite(v).all()) for v in tensors(last / file).values())
    assert not (tmp_path / "run" / "export").exists()


def test_a_run_whose_every_step_is_skipped_exports_nothing(tmp_path, nan_at_training_call):
    nan_at_training_call(1, onward=True)
    with pytest.raises(FloatingPointError, match="every step of this run \\(1 to 3\\) had a non-finite loss"):
        train(config(tmp_path, max_steps=3, on_nonfinite="skip"), progress=False)
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_gradient_checkpointing_computes_the_same_update(tmp_path, monkeypatch, lora_rank):
    """Recomputing activations in backward changes memory, not the result (measured here: bit for bit). diffusers'
    UNet2DModel has it from 0.32 on; before that (pyproject.toml allows 0.30) d2f refuses the flag by name.

    Equal updates alone would also pass with the flag ignored, so the test counts the ResNet blocks' forwards: with
    checkpointing, backward runs each checkpointed block's forward a second time."""
    from diffusers import UNet2DModel
    from diffusers.models.resnet import ResnetBlock2D

    if not UNet2DModel._supports_gradient_checkpointing:
        with pytest.raises(ValueError, match="gradient_checkpointing=True: UNet2DModel does not support it"):
            train(config(tmp_path, lora_rank=lora_rank, gradient_checkpointing=True), progress=False)
        return
    forward = ResnetBlock2D.forward
    calls = {}

    def counted(self, *args, **kwargs):
        if torch.is_grad_enabled():  # training forwards and backward's recomputation, not sampling
            calls[flag] += 1
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(ResnetBlock2D, "forward", counted)
    runs = {}
    for flag in (False, True):
        name, calls[flag] = f"gc-{flag}", 0
        train(
            config(tmp_path, name, lora_rank=lora_rank, checkpoint_every=2, gradient_checkpointing=flag), progress=False
        )
        runs[flag] = tensors(tmp_path / name / "checkpoints" / "step-00000002" / "trainable.safetensors")
    assert runs[True].keys() == runs[False].keys()
    assert all(torch.equal(runs[True][k], runs[False][k]) for k in runs[True])
    assert calls[False] > 0 and calls[True] >= 1.5 * calls[False], calls


def test_the_defaults_that_depend_on_the_network_and_the_data():
    """guidance None: 3 where the run can guide (a null class or prompt), 1 where it cannot; t_sampler None:
    diffusion-matched for d2f on an epsilon network, logit-normal otherwise; the teacher task keeps the old ones."""
    from d2f.training.config import DEFAULT_GUIDANCE, TEACHER_TASK

    config = TrainConfig()
    assert config.guidance_for(True) == DEFAULT_GUIDANCE == 3.0 and config.guidance_for(False) == 1.0
    assert TrainConfig(guidance=1.5).guidance_for(True) == 1.5 == TrainConfig(guidance=1.5).guidance_for(False)
    assert config.t_sampler_for("epsilon") == "diffusion-matched"
    assert config.t_sampler_for("v_prediction") == config.t_sampler_for("sample") == "logit-normal"
    assert TrainConfig(objective="fm").t_sampler_for("epsilon") == "logit-normal"  # fm reads the output as velocity
    assert TrainConfig(objective="diffusion").t_sampler_for("epsilon") is None
    assert TrainConfig(t_sampler="uniform").t_sampler_for("epsilon") == "uniform"
    teacher = TrainConfig.teacher_task(max_steps=7)
    assert {k: getattr(teacher, k) for k in TEACHER_TASK} == {**TEACHER_TASK, "max_steps": 7}
    for bad in ("3", True, float("nan")):
        with pytest.raises(ValueError, match=r"guidance=.* is not allowed: None \(the default for the data\)"):
            TrainConfig(guidance=bad)
