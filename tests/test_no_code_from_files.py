"""No file d2f reads can run code: a planted malicious pickle is refused wherever d2f loads weights.

Each pickle below creates a marker file when unpickled; every test asserts that d2f refuses the file with
a clear error and that the marker never appears.
"""

import importlib.util
import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

import d2f  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402

# d2f/kernels is installed from the top-level kernels/ folder (a package-dir mapping), so find it by name.
SOURCES = [Path(d2f.__file__).parent, Path(importlib.util.find_spec("d2f.kernels").submodule_search_locations[0])]


class Payload:
    """Unpickling this calls open(marker, "w"): harmless, and visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps({"weight": Payload(marker)}))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    small = dict(resolution=16, batch_size=2, max_steps=1, num_samples=2, sample_steps=1, checkpoint_every=1)
    train(TrainConfig.teacher_task(out=str(root / "full"), lora_rank=0, **small), progress=False)
    train(TrainConfig.teacher_task(out=str(root / "lora"), lora_rank=4, **small), progress=False)
    return root


def test_the_real_files_load(runs):
    for kind in ("full", "lora"):
        d2f.load(runs / kind / "export")


def test_pickled_unet_weights_are_refused(runs, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(runs / "full" / "export", export)
    (export / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    plant(export / "unet" / "diffusion_pytorch_model.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match="safetensors only, never from a pickled"):
        d2f.load(export)
    assert not (tmp_path / "pwned").exists()


def test_pickled_adapter_is_refused(runs, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(runs / "lora" / "export", export)
    (export / "adapter" / "adapter_model.safetensors").unlink()
    plant(export / "adapter" / "adapter_model.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match="safetensors only, never from a pickled"):
        d2f.load(export)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("case", ["real shards", "pickled .bin shard", "shard outside the folder", "pickle renamed"])
def test_sharded_unet_index_and_every_shard_are_checked(runs, tmp_path, case):
    """diffusers loads whatever shards a safetensors index names, ``.bin`` included, even with
    ``use_safetensors=True``; d2f checks the index and parses every shard before diffusers sees the folder."""
    from d2f.networks.models import load_unet

    unet = d2f.load(runs / "full" / "export").net
    folder = tmp_path / "unet"
    unet.save_pretrained(folder, max_shard_size="40KB")  # diffusers' own sharded layout
    index = folder / "diffusion_pytorch_model.safetensors.index.json"
    document = json.loads(index.read_text())
    shards = sorted(set(document["weight_map"].values()))
    assert len(shards) > 1
    if case == "real shards":
        loaded = load_unet(folder)
        assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), unet.state_dict().values()))
        return
    if case == "pickle renamed":
        plant(folder / shards[-1], tmp_path / "pwned")
        match = f"{shards[-1]}: not a readable safetensors file"
    else:
        bad = shards[-1].replace(".safetensors", ".bin") if case == "pickled .bin shard" else "../elsewhere.safetensors"
        plant(folder / bad, tmp_path / "pwned")
        document["weight_map"] = {k: bad if v == shards[-1] else v for k, v in document["weight_map"].items()}
        index.write_text(json.dumps(document))
        match = f"names the shard {bad!r}; d2f loads only .safetensors shards"
    with pytest.raises(ValueError, match=re.escape(match)):
        load_unet(folder)
    assert not (tmp_path / "pwned").exists()


def test_unreadable_json_and_nan_weights_name_their_file(runs, tmp_path):
    from d2f.networks.models import load_unet

    folder = tmp_path / "unet"
    shutil.copytree(runs / "full" / "export" / "unet", folder)
    config = folder / "config.json"
    text = config.read_text()
    config.write_text(text[:-20])
    with pytest.raises(ValueError, match=re.escape(f"{config}: not a readable JSON file")):
        load_unet(folder)
    config.write_text(text)
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    name = sorted(weights)[3]
    weights[name][0] = torch.nan
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match=re.escape(f"{folder}: the weight {name} holds NaN or inf")):
        load_unet(folder)


@pytest.mark.parametrize("component", ["text_encoder", "vae"])
def test_a_pickled_pipeline_component_is_refused(tmp_path, component):
    """Validation images load the base pipeline's VAE and text encoder: each passes the same gate."""
    from d2f.networks.models import check_pipeline_folder
    from pipelines import tiny_sd_pipeline

    folder = tiny_sd_pipeline(tmp_path / "pipeline")
    weights = {"text_encoder": "model", "vae": "diffusion_pytorch_model"}[component]
    (folder / component / f"{weights}.safetensors").unlink()
    plant(folder / component / f"{weights}.bin", tmp_path / "pwned")
    with pytest.raises(ValueError, match=f"{component}: no {weights}.safetensors; d2f loads weights from safetensors"):
        check_pipeline_folder(folder, skip=("unet",))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("file", ["trainable.safetensors", "ema.safetensors", "optimizer.safetensors"])
def test_pickle_in_place_of_a_checkpoint_file_is_refused(runs, tmp_path, file):
    out = tmp_path / "run"
    shutil.copytree(runs / "lora", out)
    config = TrainConfig.from_dict(json.loads((out / "config.json").read_text())).replace(out=str(out), max_steps=2)
    plant(out / "checkpoints" / "step-00000001" / file, tmp_path / "pwned")
    with pytest.raises(ValueError, match="a checkpoint file is missing or broken"):
        train(config, resume="latest", progress=False)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("suffix", [".safetensors", ".npy"])
def test_pickled_latents_are_refused(tmp_path, suffix):
    data = tmp_path / f"latents{suffix}"
    if suffix == ".npy":
        np.save(data, np.array([Payload(tmp_path / "pwned")], dtype=object), allow_pickle=True)
    else:
        torch.save({"latents": torch.zeros(2, 1, 16, 16)}, data)  # a torch pickle under a safetensors name
    with pytest.raises(ValueError, match="not a readable latents file"):
        train(TrainConfig.teacher_task(out=str(tmp_path / "run"), data=str(data), resolution=16), progress=False)
    assert not (tmp_path / "pwned").exists()


def test_json_documents_refuse_unknown_keys(runs, tmp_path):
    export = tmp_path / "export"
    shutil.copytree(runs / "full" / "export", export)
    meta = json.loads((export / "d2f.json").read_text())
    meta["prediction_typ"] = meta.pop("prediction_type")
    (export / "d2f.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="unknown key 'prediction_typ' \\(did you mean 'prediction_type'\\?\\)"):
        d2f.load(export)
    meta["prediction_type"] = meta.pop("prediction_typ")
    for key, value, message in (
        ("align_input", "yes", "align_input='yes' is a str; expected bool"),
        ("lora_rank", True, "lora_rank=True is a bool; expected int"),
        ("kind", "qlora", "kind='qlora' is not one of"),
    ):
        (export / "d2f.json").write_text(json.dumps({**meta, key: value}))
        with pytest.raises(ValueError, match=re.escape(message)):
            d2f.load(export)
    (export / "d2f.json").write_text(json.dumps({**meta, "train_config": {**meta["train_config"], "lr": "fast"}}))
    with pytest.raises(ValueError, match="train_config: lr='fast' is not allowed"):
        d2f.load(export)
    state = runs / "lora" / "checkpoints" / "step-00000001" / "state.json"
    document = json.loads(state.read_text())
    document["lossess"] = []
    bad = tmp_path / "ckpt"
    shutil.copytree(state.parent, bad)
    (bad / "state.json").write_text(json.dumps(document))
    from d2f.training.checkpoint import read_state

    with pytest.raises(ValueError, match="unknown key 'lossess' \\(did you mean 'losses'\\?\\)"):
        read_state(bad)
    document.pop("lossess")
    (bad / "state.json").write_text(json.dumps({**document, "step": "7"}))
    with pytest.raises(ValueError, match="step='7' is a str; expected int"):
        read_state(bad)
    with pytest.raises(ValueError, match="unknown training setting 'lora_rnk'; did you mean 'lora_rank'"):
        TrainConfig.from_dict({"lora_rnk": 4})
    with pytest.raises(ValueError, match="lora_rank='4' is not allowed"):
        TrainConfig.from_dict({"lora_rank": "4"})  # a mistyped value is refused, not coerced


def test_no_unpickling_call_in_the_source():
    """The static half of the promise: no torch.load, pickle.load or allow_pickle=True anywhere in d2f."""
    pattern = re.compile(r"torch\.load\(|pickle\.loads?\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False")
    offenders = [
        f"{path}:{i}"
        for root in SOURCES
        for path in root.rglob("*.py")
        for i, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
