"""Crash safety: a run SIGKILLed anywhere in a checkpoint or export resumes bit for bit; one run per --out.

Each crash runs ``d2f train`` in a subprocess whose safetensors writer or ``Path.rename`` is wrapped to
SIGKILL the process at one precise point of the step-4 checkpoint or of the export. ``--resume`` must then
continue from the last complete checkpoint (step 2) to weights bitwise equal to an uninterrupted run.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from d2f.training.checkpoint import latest_checkpoint  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.lock import LOCK_NAME  # noqa: E402
from d2f.training.loop import train  # noqa: E402

pytestmark = pytest.mark.slow

SETTINGS = dict(
    resolution=16, batch_size=4, max_steps=4, checkpoint_every=2, warmup_steps=1, lora_rank=4, num_samples=2
)
SETTINGS["sample_steps"] = 1
FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()] + ["--no-progress"]

# Runs `d2f train` with a kill switch: argv[1] names the point, the rest are d2f's arguments.
KILLER = """
import os, pathlib, signal, sys
import safetensors.torch as st

point, save, rename = sys.argv[1], st.save_file, pathlib.Path.rename

def die():
    os.kill(os.getpid(), signal.SIGKILL)

def save_file(tensors, filename, metadata=None):
    filename = str(filename)
    in_ckpt = ".tmp-step-00000004" in filename
    if point == "checkpoint-folder-created" and in_ckpt:
        die()
    save(tensors, filename, metadata=metadata)
    if point == "checkpoint-mid-write" and in_ckpt and filename.endswith("ema.safetensors"):
        path = pathlib.Path(filename)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # a torn write
        die()
    if point == "export-mid-write" and ".export.tmp" in filename:
        die()

def guarded_rename(self, target):
    if point == "checkpoint-before-rename" and self.name.startswith(".tmp-step-00000004"):
        die()
    if point == "export-before-rename" and self.name.startswith(".export.tmp"):
        die()
    return rename(self, target)

st.save_file, pathlib.Path.rename = save_file, guarded_rename
from d2f.cli import main
sys.exit(main(["train", *sys.argv[2:]]))
"""
POINTS = [
    "checkpoint-folder-created",
    "checkpoint-mid-write",
    "checkpoint-before-rename",
    "export-mid-write",
    "export-before-rename",
]


def tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    train(TrainConfig(out=str(out), **SETTINGS), progress=False)
    return out


@pytest.mark.parametrize("point", POINTS)
def test_sigkill_then_resume_is_bitwise_exact(tmp_path, reference, point, capfd):
    out = tmp_path / "run"
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, point, *FLAGS, f"--out={out}"], capture_output=True, text=True, timeout=300
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    expected_step = 2 if point.startswith("checkpoint") else 4
    assert latest_checkpoint(out).name == f"step-{expected_step:08d}"  # the half-written one is not picked up
    leftovers = [p.name for p in (out / "checkpoints").iterdir()] + [p.name for p in out.glob(".export*")]
    assert any(name.startswith(".") for name in leftovers), leftovers  # the kill did leave debris

    capfd.readouterr()
    train(TrainConfig(out=str(out), **SETTINGS), resume="latest", progress=False)
    assert "half-written folder(s) left by an interrupted run" in capfd.readouterr().err
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.startswith(".")]
    assert not list(out.glob(".export*"))
    for step in ("step-00000002", "step-00000004"):
        for file in ("trainable.safetensors", "ema.safetensors", "optimizer.safetensors"):
            a, b = tensors(reference / "checkpoints" / step / file), tensors(out / "checkpoints" / step / file)
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), (step, file)
    a = tensors(reference / "export" / "adapter" / "adapter_model.safetensors")
    b = tensors(out / "export" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_run_per_out_and_no_stale_lock_after_sigkill(tmp_path):
    out = tmp_path / "run"
    long_run = [sys.executable, "-m", "d2f", "train", *FLAGS, "--max-steps=100000", "--checkpoint-every=0"]
    holder = subprocess.Popen([*long_run, f"--out={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text() == str(holder.pid)):
            assert holder.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        with pytest.raises(ValueError, match=f"is in use by another d2f run \\(pid {holder.pid}\\)"):
            train(TrainConfig(out=str(out), **SETTINGS), progress=False)
        assert not (out / "checkpoints").exists() and not (out / "export").exists()  # the refused run wrote nothing
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    # The kernel dropped the dead run's lock: a new run takes the folder at once.
    metrics = train(TrainConfig(out=str(out), **SETTINGS), progress=False)
    assert metrics["steps"] == 4
