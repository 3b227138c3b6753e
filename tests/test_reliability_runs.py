"""Run folders and data folders under abuse: a process SIGKILLed while it writes the latents file, a validation
pipeline that cannot load, links out of the data folder, a full disk under a checkpoint, text embeddings of
another width, and the awkward metadata, names and folders users hand d2f. Each case ends in a run that
works or in one line naming the file and the value, with the folder left as it was; tiny real pipelines
throughout (``pipelines.py``)."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")
pytest.importorskip("peft")
pytest.importorskip("transformers")

from safetensors.torch import load_file, save_file  # noqa: E402

from d2f._files import built_in_place, write_json  # noqa: E402
from d2f.cli import main  # noqa: E402
from d2f.data.captions import find_captions, read_captioned  # noqa: E402
from d2f.data.encode import encode  # noqa: E402
from d2f.data.images import read_folder  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.lock import LOCK_NAME  # noqa: E402
from d2f.training.loop import train  # noqa: E402
from nets import teacher_flags  # noqa: E402
from pipelines import captioned_folder, tiny_sd_pipeline  # noqa: E402

R = 8
TINY = ["--resolution", str(R), "--batch-size", "4", "--warmup-steps", "0", "--lora-rank", "4"]
TINY += ["--num-samples", "2", "--sample-steps", "1", "--max-steps", "1", "--no-progress"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-runs")
    tiny_sd_pipeline(root / "sd")
    tiny_sd_pipeline(root / "sdxl", xl=True)
    captioned_folder(root / "data", n=4)
    encode(root / "sd", root / "data", R, root / "sd-latents.safetensors", progress=False)
    encode(root / "sdxl", root / "data", R, root / "sdxl-latents.safetensors", progress=False)
    return root


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped), as a killed writer's is."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def refused(capsys, argv: list[str], *parts: str) -> str:
    """``d2f ...`` ends with status 2 and one line naming each of ``parts``, no traceback."""
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"d2f {argv[0]}: error: ")]
    assert status == 2, err[-3000:]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().endswith(errors[0]), err[-3000:]  # nothing after it: the message is one line
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


def train_argv(pipeline: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--pretrained", str(pipeline), "--data", str(data), *TINY, "--out", str(out), *extra]


# Runs a d2f command (argv[2:]) that SIGKILLs itself when it renames a temporary file whose name starts with
# argv[1] into place: the file is written whole and fsynced, and the rename that would publish it never comes.
KILLER = """
import os, signal, sys
replace = os.replace

def dying_replace(src, dst, *args, **kwargs):
    if os.path.basename(str(src)).startswith(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
    return replace(src, dst, *args, **kwargs)

os.replace = dying_replace
from d2f.cli import main
sys.exit(main(sys.argv[2:]))
"""


def killed(prefix: str, argv: list[str]) -> None:
    run = subprocess.run([sys.executable, "-c", KILLER, prefix, *argv], capture_output=True, text=True, timeout=300)
    assert run.returncode == -signal.SIGKILL, run.stderr[-3000:]


# 5. A temporary file of a killed writer never blocks the output it was writing.


def test_a_dead_writers_temporary_file_goes_when_its_output_is_written_again(tmp_path, capsys):
    target = tmp_path / "report.json"
    pid = dead_pid()
    dead = tmp_path / f".report.json.tmp-{pid}"
    alive = tmp_path / f".report.json.tmp-{os.getppid()}"  # a live process may be writing it right now
    other = tmp_path / f".other.json.tmp-{pid}"  # another output's: left for its own writer to clean up
    for path in (dead, alive, other):
        path.write_bytes(b"half a file")
    write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert not dead.exists() and alive.exists() and other.exists()
    assert f"removed {dead.name}" in capsys.readouterr().err


@pytest.mark.slow
def test_a_folder_built_in_place_replaces_the_old_one_whole_or_leaves_it_as_it_was(tmp_path):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    with pytest.raises(OSError, match=r"No space left on device \(nothing written\): '.*out'"):
        with built_in_place(folder) as tmp:
            (tmp / "new.txt").write_text("half")
            raise OSError(28, "No space left on device")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in folder.iterdir()] == ["old.txt"]
    with built_in_place(folder) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in folder.iterdir()] == ["new.txt"]


def test_a_run_killed_while_writing_its_latents_is_rerun_by_the_same_command(root, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(root / "sd", root / "data", out)
    killed(".latents.safetensors.tmp-", argv)
    leftovers = [p.name for p in out.iterdir() if p.name.startswith(".latents.safetensors.tmp-")]
    assert len(leftovers) == 1 and not (out / "latents.safetensors").exists()

    refused(capsys, [*argv, "--resume"], "--resume: no complete checkpoint", "run it without --resume")
    assert main(argv) == 0
    assert f"removed 1 half-written file(s) left by an interrupted run: {leftovers[0]}" in capsys.readouterr().err
    assert (out / "latents.safetensors").is_file() and (out / "export").is_dir()
    assert not [p.name for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_a_killed_encode_leaves_nothing_once_the_same_output_is_encoded(root, tmp_path, capsys):
    out = tmp_path / "latents.safetensors"
    argv = ["encode", "--pretrained", str(root / "sd"), "--data", str(root / "data"), "--resolution", str(R)]
    argv += ["--out", str(out)]
    killed(".latents.safetensors.tmp-", argv)
    (leftover,) = tmp_path.iterdir()
    assert leftover.name.startswith(".latents.safetensors.tmp-")
    assert main(argv) == 0
    assert f"removed {leftover.name}" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["latents.safetensors"]


def test_a_run_folder_holding_only_a_dead_writers_file_is_not_an_earlier_run(root, tmp_path, capsys):
    """Also where the killed process had the pid this one has now (a restarted container gives out the same
    pids): under the run's lock, every temporary file in the folder is a leftover; a resume clears them from
    ``validation/`` too."""
    out = tmp_path / "run"
    out.mkdir()
    for name in (f".latents.safetensors.tmp-{dead_pid()}", f".config.json.tmp-{os.getpid()}"):
        (out / name).write_bytes(b"half a file")
    argv = train_argv(root / "sd", root / "sd-latents.safetensors", out, "--checkpoint-every", "1")
    assert main(argv) == 0
    assert "removed 2 half-written file(s) left by an interrupted run" in capsys.readouterr().err
    leftover = out / "validation" / f".step-00000002.png.tmp-{dead_pid()}"
    leftover.parent.mkdir()
    leftover.write_bytes(b"half a file")
    assert main([*argv, "--max-steps", "2", "--resume"]) == 0
    err = capsys.readouterr().err
    assert f"removed 1 half-written file(s) left by an interrupted run: validation/{leftover.name}" in err
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]


# 6. Whatever keeps the validation pipeline from loading is refused before the data is encoded or anything
# is written.


def custom_code(folder: Path, marker: Path) -> None:
    """A feature extractor whose class lives in a Python file in the pipeline folder (the file, if it ever ran,
    would create ``marker``)."""
    (folder / "feature_extractor").mkdir()
    (folder / "feature_extractor" / "extractor.py").write_text(f"open({str(marker)!r}, 'w')\nclass Extractor: ...\n")
    (folder / "feature_extractor" / "preprocessor_config.json").write_text("{}")
    index = json.loads((folder / "model_index.json").read_text())
    index["feature_extractor"] = ["extractor", "Extractor"]
    (folder / "model_index.json").write_text(json.dumps(index))


def pickled_text_encoder(folder: Path, marker: Path) -> None:
    weights = folder / "text_encoder" / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "text_encoder" / "pytorch_model.bin")
    weights.unlink()


def no_tokenizer(folder: Path, marker: Path) -> None:
    shutil.rmtree(folder / "tokenizer")


def tokenizer_without_length(folder: Path, marker: Path) -> None:
    config = folder / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "model_max_length"}))


def unreadable_vae_config(folder: Path, marker: Path) -> None:
    config = folder / "vae" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "block_out_channels": "wide"}))


@pytest.mark.parametrize(
    "doctor, data, named",
    [
        (custom_code, "folder", "custom code"),
        (pickled_text_encoder, "latents", "text_encoder"),
        (no_tokenizer, "latents", "no tokenizer/ folder"),
        (tokenizer_without_length, "latents", "tokenizer: sets no model_max_length"),
        (unreadable_vae_config, "latents", "(vae/)"),
    ],
    ids=["custom-code", "pickled-text-encoder", "no-tokenizer", "tokenizer-without-length", "unreadable-vae-config"],
)
def test_a_validation_pipeline_that_cannot_load_is_refused_before_anything_is_written(
    root, tmp_path, capsys, doctor, data, named
):
    """With a captioned folder the data is not encoded first; with a latents file d2f did not write (nothing to
    fingerprint) nothing but the lock is written. The same folder then takes a run without validation."""
    pipeline = tmp_path / "pipeline"
    shutil.copytree(root / "sd", pipeline)
    marker = tmp_path / "the-code-ran"
    doctor(pipeline, marker)
    if data == "folder":
        source = root / "data"
    else:  # the latents without d2f's metadata: a file from elsewhere, not checked against the pipeline
        source = tmp_path / "latents.safetensors"
        save_file(load_file(str(root / "sd-latents.safetensors")), str(source))
    out = tmp_path / "run"
    argv = train_argv(pipeline, source, out, "--validation-prompt", "a cat", "--validation-every", "1")
    refused(capsys, argv, "validation", str(pipeline), named)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME] and not marker.exists()
    if data == "latents":
        assert main(argv[: argv.index("--validation-prompt")]) == 0


# 7. Links do not bring in files from outside the data folder.


def linked_file(folder: Path, outside: Path, layout: str) -> str:
    (folder / "link.png").symlink_to(outside / "x.png")
    if layout == "txt":
        (folder / "link.txt").write_text("a linked image")
    else:
        with (folder / "metadata.jsonl").open("a") as f:
            f.write(json.dumps({"file_name": "link.png", "text": "a linked image"}) + "\n")
    return "link.png"


def linked_folder(folder: Path, outside: Path, layout: str) -> str:
    (folder / "sub").symlink_to(outside, target_is_directory=True)
    if layout == "jsonl":
        with (folder / "metadata.jsonl").open("a") as f:
            f.write(json.dumps({"file_name": "sub/x.png", "text": "a linked image"}) + "\n")
    return "sub"


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
@pytest.mark.parametrize("link", [linked_file, linked_folder], ids=["file", "folder"])
def test_a_link_out_of_a_captioned_folder_is_refused_by_name(tmp_path, layout, link):
    folder = captioned_folder(tmp_path / "data", n=2, formats=layout)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(folder / "image-00.png", outside / "x.png")
    (outside / "x.txt").write_text("a caption")
    name = link(folder, outside, layout)
    with pytest.raises(ValueError, match=rf"{name}.* outside {re.escape(str(folder))}"):
        read_captioned(folder, R)


@pytest.mark.parametrize("link", [linked_file, linked_folder], ids=["file", "folder"])
def test_a_link_out_of_an_image_folder_is_refused_by_name(tmp_path, link):
    folder = captioned_folder(tmp_path / "data", n=2, formats="txt")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(folder / "image-00.png", outside / "x.png")
    name = link(folder, outside, "txt")
    with pytest.raises(ValueError, match=rf"{name}.* outside {re.escape(str(folder))}"):
        read_folder(folder, R, 3)


@pytest.mark.parametrize("link", [linked_file, linked_folder], ids=["file", "folder"])
def test_a_link_out_of_a_cond_data_folder_is_refused_before_encoding(tmp_path, link):
    """``d2f encode --cond-data``: the condition folder is held to the same rule as the data folder."""
    folder = captioned_folder(tmp_path / "data", n=2, formats="txt")
    cond = tmp_path / "cond"
    cond.mkdir()
    for name in ("image-00.png", "image-01.png"):
        shutil.copy(folder / name, cond / name)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(folder / "image-00.png", outside / "x.png")
    name = link(cond, outside, "none")
    with pytest.raises(ValueError, match=rf"cond_data: {name}.* outside {re.escape(str(cond))}"):
        encode(tiny_sd_pipeline(tmp_path / "pipe"), folder, R, cond_data=cond, progress=False)


def test_links_inside_the_folder_and_link_loops_are_read_as_before(tmp_path):
    """An alias of an image in the folder is an image of the folder (named, it is read under its name); a link
    to the folder itself or a dangling loop adds nothing."""
    folder = captioned_folder(tmp_path / "data", n=2)
    (folder / "alias.png").symlink_to("image-00.png")
    (folder / "loop").symlink_to(".", target_is_directory=True)
    (folder / "a.png").symlink_to("b.png")
    (folder / "b.png").symlink_to("a.png")
    with (folder / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "alias.png", "text": "the same image"}) + "\n")
    images = read_captioned(folder, R)
    assert images.files == ["alias.png", "image-00.png", "image-01.png"]
    assert torch.equal(images.images[0], images.images[1])
    with pytest.warns(UserWarning, match=r"ignored 1 file\(s\) not .png/.jpg/.jpeg \(metadata.jsonl\)"):
        assert sorted(read_folder(folder, R, 3)) == ["alias.png", "image-00.png", "image-01.png"]


# 10c. A full disk under a checkpoint: one line naming it, nothing half-written.

# As test_crash_safety's: every file write past FSIZE bytes fails with EFBIG, as on a full disk.
FULL_DISK = """
import resource, signal, sys
from d2f.cli import main
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_a_full_disk_under_a_checkpoint_is_one_line_and_leaves_no_checkpoint_folder(tmp_path):
    """100 kB: the config, the zero-shot grid and the lock fit; the checkpoint's weights (200 kB) do not."""
    out = tmp_path / "run"
    argv = ["train", *teacher_flags(), "--resolution", "16", "--batch-size", "4", "--warmup-steps", "0"]
    argv += ["--lora-rank", "4"]
    argv += ["--num-samples", "2", "--sample-steps", "1", "--max-steps", "1", "--checkpoint-every", "1"]
    argv += ["--no-progress", "--out", str(out)]
    run = subprocess.run(
        [sys.executable, "-c", FULL_DISK, "100000", *argv], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 2, run.stderr[-3000:]
    checkpoint = out / "checkpoints" / "step-00000001"
    line = run.stderr.splitlines()[-1]
    # safetensors >= 0.5 reports the write's own EFBIG; older ones an EIO: either way one line naming the file.
    pattern = r"d2f train: error: \[Errno (27|5)\] .* writing trainable\.safetensors \(nothing written\)"
    assert re.match(pattern, line), line
    assert line.endswith(f"(nothing written): '{checkpoint}'"), line
    assert "Traceback" not in run.stderr
    assert list((out / "checkpoints").iterdir()) == []


# 10f. Text embeddings the UNet cannot take are refused by name before the first step.


def narrowed(source: Path, target: Path, key: str, width: int) -> Path:
    tensors = load_file(str(source))
    for name in (key, f"null_{key}"):
        tensors[name] = tensors[name][..., :width].contiguous()
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize(
    "kind, key, width, message",
    [
        ("sd", "encoder_hidden_states", 8, "encoder_hidden_states 8 wide; .* cross_attention_dim=12"),
        ("sdxl", "encoder_hidden_states", 8, "encoder_hidden_states 8 wide; .* cross_attention_dim=12"),
        ("sdxl", "text_embeds", 4, r"text_embeds 4 wide .* takes 6 \(projection_class_embeddings_input_dim"),
    ],
)
def test_text_embeddings_of_another_width_are_refused_before_training(root, tmp_path, kind, key, width, message):
    latents = narrowed(root / f"{kind}-latents.safetensors", tmp_path / "narrow.safetensors", key, width)
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), pretrained=str(root / kind), data=str(latents), resolution=R, max_steps=1)
    with pytest.raises(ValueError, match=f"data='{latents}' holds {message}"):
        train(config.replace(lora_rank=4, batch_size=4, num_samples=2, sample_steps=1), progress=False)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def test_text_embeddings_without_a_token_axis_are_refused(root, tmp_path):
    tensors = load_file(str(root / "sd-latents.safetensors"))
    tensors["encoder_hidden_states"] = tensors["encoder_hidden_states"][:, 0].contiguous()
    tensors["null_encoder_hidden_states"] = tensors["null_encoder_hidden_states"][0].contiguous()
    latents = tmp_path / "flat.safetensors"
    save_file(tensors, str(latents))
    config = TrainConfig(out=str(tmp_path / "run"), pretrained=str(root / "sd"), data=str(latents), resolution=R)
    with pytest.raises(ValueError, match=r"encoder_hidden_states of shape \(4, 12\); .* \(samples, tokens, width\)"):
        train(config.replace(lora_rank=4, batch_size=4, max_steps=1), progress=False)


# The adversarial pass: what users' folders hold.


def test_metadata_with_a_byte_order_mark_reads_as_without_one(tmp_path):
    """Windows editors save UTF-8 with a BOM; the datasets library reads such files, and so does d2f."""
    folder = captioned_folder(tmp_path / "data", n=3)
    metadata = folder / "metadata.jsonl"
    expected = find_captions(folder)
    metadata.write_bytes(b"\xef\xbb\xbf" + metadata.read_bytes())
    assert find_captions(folder).captions == expected.captions


def test_a_metadata_line_naming_a_column_twice_is_refused(tmp_path):
    """JSON would keep the last value silently; which caption was meant is unknowable."""
    folder = captioned_folder(tmp_path / "data", n=1)
    (folder / "metadata.jsonl").write_text('{"file_name": "image-00.png", "text": "a cat", "text": "a dog"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl line 1: the key 'text' appears twice"):
        find_captions(folder)


def test_a_file_name_in_another_unicode_form_is_named_with_a_hint(tmp_path):
    """macOS writes decomposed names (NFD); a metadata.jsonl typed elsewhere names them composed (NFC)."""
    folder = captioned_folder(tmp_path / "data", n=1)
    decomposed = unicodedata.normalize("NFD", "café.png")
    (folder / "image-00.png").rename(folder / decomposed)
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "café.png", "text": "a cup"}) + "\n")
    with pytest.raises(ValueError, match="written with other Unicode code points"):
        find_captions(folder)


def test_a_metadata_path_that_is_no_file_says_what_it_is(tmp_path):
    folder = captioned_folder(tmp_path / "data", n=1)
    (folder / "metadata.jsonl").rename(tmp_path / "moved")
    (folder / "metadata.jsonl").mkdir()
    with pytest.raises(ValueError, match=r"metadata.jsonl: not a regular file \(a folder\?\)"):
        find_captions(folder)


@pytest.mark.parametrize("which", ["data", "cond_data"])
def test_a_run_folder_inside_its_data_folder_is_refused(root, tmp_path, which):
    """The run's own PNGs (zero_shot.png, samples.png) would be read as training data by its next run or resume."""
    images = tmp_path / "images"
    conditions = tmp_path / "conditions"
    for folder in (images, conditions):
        shutil.copytree(root / "data", folder, ignore=shutil.ignore_patterns("*.jsonl"))
    out = (images if which == "data" else conditions) / "runs" / "first"
    config = TrainConfig.teacher_task(out=str(out), data=str(images), cond_data=str(conditions), resolution=R)
    with pytest.raises(ValueError, match=f"out='{out}' lies inside {which}="):
        train(config.replace(lora_rank=4, batch_size=4, max_steps=1), progress=False)
    assert [p.name for p in out.iterdir()] == [LOCK_NAME]


def read_only(folder: Path):
    """Make ``folder`` refuse new files: without write permission, or (as root, whom permissions do not stop)
    immutable; skips the test where neither holds."""
    folder.chmod(0o555)
    if os.access(folder, os.W_OK) and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode:
        pytest.skip("no way to make a folder read-only here")
    return folder


def writable(folder: Path) -> None:
    subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
    folder.chmod(0o755)


def test_an_output_in_a_read_only_folder_is_refused_before_the_encode(root, tmp_path, capsys):
    folder = tmp_path / "read-only"
    folder.mkdir()
    out = read_only(folder) / "latents.safetensors"
    try:
        argv = ["encode", "--pretrained", str(root / "sd"), "--data", str(root / "data"), "--resolution", str(R)]
        refused(capsys, [*argv, "--out", str(out)], "(cannot write there)", str(out))
        assert list(folder.iterdir()) == []
    finally:
        writable(folder)


def test_a_file_where_a_resumed_run_writes_its_validation_folder_is_refused_before_training(root, tmp_path):
    out = tmp_path / "run"
    config = TrainConfig(out=str(out), pretrained=str(root / "sd"), data=str(root / "sd-latents.safetensors"))
    config = config.replace(resolution=R, lora_rank=4, batch_size=4, num_samples=2, sample_steps=1, checkpoint_every=1)
    train(config.replace(max_steps=1), progress=False)
    (out / "validation").write_text("not a folder")
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME}
    with pytest.raises(ValueError, match=f"{out / 'validation'} is a file; the run writes its validation into"):
        train(config.replace(max_steps=2, validation_prompts=("a",), validation_every=1), "latest", progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != LOCK_NAME} == before
