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
from nets import teacher_flags  # noqa: E402

pytestmark = pytest.mark.slow

SETTINGS = dict(
    resolution=16, batch_size=4, max_steps=4, checkpoint_every=2, warmup_steps=1, lora_rank=4, num_samples=2
)
SETTINGS["sample_steps"] = 1
FLAGS = [*teacher_flags(), *(f"--{k.replace('_', '-')}={v}" for k, v in SETTINGS.items()), "--no-progress"]

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
    train(TrainConfig.teacher_task(out=str(out), **SETTINGS), progress=False)
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
    train(TrainConfig.teacher_task(out=str(out), **SETTINGS), resume="latest", progress=False)
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
    long_run = [sys.executable, "-m", "d2f", "train", *FLAGS, "--max-steps=100000", "--checkpoint-every=2"]
    holder = subprocess.Popen([*long_run, f"--out={out}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ((out / LOCK_NAME).is_file() and (out / LOCK_NAME).read_text() == str(holder.pid)):
            assert holder.poll() is None and time.monotonic() < deadline, "the first run never took the lock"
            time.sleep(0.2)
        before = snapshot(out)
        with pytest.raises(ValueError, match=f"is in use by another d2f run \\(pid {holder.pid}\\)"):
            train(TrainConfig.teacher_task(out=str(out), **SETTINGS), resume="latest", progress=False)
        while latest_checkpoint(out) is None:
            assert holder.poll() is None and time.monotonic() < deadline, "the first run never checkpointed"
            time.sleep(0.2)
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert set(before) <= set(snapshot(out))  # the refused run removed nothing (the holder wrote on)
    # The kernel dropped the dead run's lock: resuming takes the folder at once.
    step = int(latest_checkpoint(out).name.split("-")[1])
    metrics = train(
        TrainConfig.teacher_task(out=str(out), **{**SETTINGS, "max_steps": step + 1}), resume="latest", progress=False
    )
    assert metrics["steps_this_run"] == 1


def snapshot(folder):
    """Every file under ``folder`` (but the lock) with its bytes."""
    files = (p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != LOCK_NAME)
    return {str(p.relative_to(folder)): p.read_bytes() for p in files}


def test_a_run_folder_belongs_to_one_run(tmp_path):
    """A second run is refused in a folder holding any earlier run's files, checkpointed or not; a resume
    that would end before its checkpoint is refused too. Each refusal leaves the folder byte for byte."""
    out = tmp_path / "run"
    train(TrainConfig.teacher_task(out=str(out), **{**SETTINGS, "checkpoint_every": 0, "max_steps": 1}), progress=False)
    before = snapshot(out)
    assert {"config.json", "metrics.json", "zero_shot.png"} <= set(before) and not (out / "checkpoints").exists()
    with pytest.raises(ValueError, match="holds files of an earlier run .*it has no checkpoint, or choose another"):
        train(TrainConfig.teacher_task(out=str(out), **{**SETTINGS, "resolution": 24}), progress=False)
    assert snapshot(out) == before

    out = tmp_path / "checkpointed"
    train(TrainConfig.teacher_task(out=str(out), **{**SETTINGS, "max_steps": 2}), progress=False)
    before = snapshot(out)
    with pytest.raises(ValueError, match="holds files of an earlier run .*pass --resume to continue it"):
        train(TrainConfig.teacher_task(out=str(out), **SETTINGS), progress=False)
    with pytest.raises(ValueError, match="max_steps=1 is below the step of the checkpoint resumed from .* step 2"):
        train(TrainConfig.teacher_task(out=str(out), **{**SETTINGS, "max_steps": 1}), resume="latest", progress=False)
    assert snapshot(out) == before


# Runs a d2f command with every file write limited to FSIZE bytes, as on a full disk: a write past it fails
# with EFBIG (SIGXFSZ is ignored, so the write returns the error instead of killing the process).
FULL_DISK = """
import resource, signal, sys
from d2f.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_a_full_disk_leaves_no_half_written_file(tmp_path, command):
    """The file keeps its earlier content, no temporary file is left, and the error is one line naming it."""
    out = tmp_path / ("grid.png" if command == "sample" else "report.json")
    out.write_bytes(b"an earlier result")
    args = ["--model", "teacher", "--steps", "2", "--num-samples", "4", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK, "64", command, *args], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2, run.stderr[-2000:]
    message = f"d2f {command}: error: [Errno 27] File too large (nothing written): '{out}'"
    assert run.stderr.splitlines()[-1].startswith(message)
    assert "Traceback" not in run.stderr
    assert out.read_bytes() == b"an earlier result" and sorted(p.name for p in tmp_path.iterdir()) == [out.name]
