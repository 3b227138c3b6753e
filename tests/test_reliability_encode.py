"""``d2f encode`` (and ``d2f train`` on a pipeline, which runs it) on doctored tiny pipeline folders: every
weights file passes the safetensors gate whatever ``model_index.json`` says its library is; a NaN in a config
value or a weight is refused by name before any image is encoded; the pipeline's fingerprint follows the
weights' bytes, not their modification times; configs the encoders cannot run (a grey VAE, a tokenizer without
``model_max_length``, a scaling factor written as a string) are refused by name. Each refusal is one line with
exit status 2 from the command line, and writes nothing."""

import json
import math
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import AutoencoderKL  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from d2f.cli import main  # noqa: E402
from d2f.data.encode import check_encoded, check_training_latents, encode, read_encoded  # noqa: E402
from d2f.networks.models import check_pipeline_folder  # noqa: E402
from pipelines import captioned_folder, tiny_sd_pipeline, tiny_text_encoder, tiny_vae  # noqa: E402

R = 16
WEIGHTS = {"vae": "diffusion_pytorch_model", "text_encoder": "model", "text_encoder_2": "model"}
CLASSES = {"vae": "AutoencoderKL", "text_encoder": "CLIPTextModel", "text_encoder_2": "CLIPTextModelWithProjection"}


class Payload:
    """Unpickling this calls open(marker, "w"): harmless, and visible."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability-encode")
    tiny_sd_pipeline(root / "sd")
    tiny_sd_pipeline(root / "sdxl", xl=True)
    captioned_folder(root / "data")
    return root


@pytest.fixture
def vae_calls(monkeypatch):
    """How many times the VAE encoded a batch (the real encode runs; only the count is kept)."""
    calls = []
    real = AutoencoderKL.encode

    def counted(self, *args, **kwargs):
        calls.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", counted)
    return calls


def copy(root: Path, tmp_path: Path, kind: str = "sd") -> Path:
    folder = tmp_path / "pipeline"
    shutil.copytree(root / kind, folder)
    return folder


def edit_json(path: Path, **changes) -> None:
    """Set (or, for a value of ``...``, remove) keys of the JSON object in ``path``."""
    document = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            document.pop(key)
        else:
            document[key] = value
    path.write_text(json.dumps(document))


def edit_weights(file: Path, edit) -> None:
    """Rewrite a safetensors file with ``edit(tensors)`` applied (its metadata kept)."""
    from safetensors import safe_open

    with safe_open(str(file), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata=metadata)


def encode_argv(folder: Path, data: Path, out: Path, *extra: str) -> list[str]:
    argv = ["encode", "--pretrained", str(folder), "--data", str(data), "--resolution", str(R), "--out", str(out)]
    return argv + list(extra)


def refused(capsys, argv: list[str], *parts: str) -> str:
    """Run the command line: exit status 2, one line naming every one of ``parts``, no traceback."""
    status = main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith(f"d2f {argv[0]}: error: ")]
    assert status == 2, err
    assert len(errors) == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in errors[0], (part, errors[0])
    return errors[0]


# 1. Every weights file a loader may open passes the safetensors gate, whatever the library string says.


def shard_as_pickle(component: Path, weights: str, marker: Path | None) -> Path:
    """Replace the component's safetensors file by an index naming one pickled ``shard.bin``: its real weights
    saved by ``torch.save`` (without ``marker``), or a pickle that creates ``marker`` when unpickled."""
    single = component / f"{weights}.safetensors"
    state = load_file(str(single))
    single.unlink()
    shard = component / "shard.bin"
    if marker is None:
        torch.save(state, shard)
    else:
        shard.write_bytes(pickle.dumps({"weight": Payload(marker)}))
    index = component / f"{weights}.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {name: "shard.bin" for name in state}}))
    return index


@pytest.fixture
def torch_loads(monkeypatch):
    """The files torch.load was asked to read (it still reads them: a spy, not a stand-in)."""
    calls = []
    real = torch.load

    def spy(f, *args, **kwargs):
        calls.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return calls


@pytest.mark.parametrize("shard", ["torch.save", "marker pickle"])
@pytest.mark.parametrize("kind, component", [("sd", "vae"), ("sd", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_an_unknown_library_string_does_not_skip_the_gate(root, tmp_path, capsys, torch_loads, kind, component, shard):
    folder = copy(root, tmp_path, kind)
    edit_json(folder / "model_index.json", **{component: ["some_lib", CLASSES[component]]})
    marker = tmp_path / "pwned"
    shard_as_pickle(folder / component, WEIGHTS[component], marker if shard == "marker pickle" else None)
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), f"{component}", "some_lib")
    assert not out.exists() and not marker.exists() and torch_loads == []

    # The gate itself, whatever loads the folder next (validation images load it through DiffusionPipeline).
    index = folder / component / f"{WEIGHTS[component]}.safetensors.index.json"
    with pytest.raises(ValueError, match=re.escape(f"{index} names the shard 'shard.bin'")):
        check_pipeline_folder(folder, skip=("unet",))
    assert not marker.exists() and torch_loads == []


def test_train_on_a_pipeline_with_an_unknown_library_string_reads_no_pickle(root, tmp_path, capsys, torch_loads):
    folder = copy(root, tmp_path)
    edit_json(folder / "model_index.json", vae=["some_lib", "AutoencoderKL"])
    marker = tmp_path / "pwned"
    shard_as_pickle(folder / "vae", "diffusion_pytorch_model", marker)
    out = tmp_path / "run"
    argv = ["train", "--pretrained", str(folder), "--data", str(root / "data"), "--out", str(out)]
    argv += ["--resolution", str(R), "--max-steps", "1", "--batch-size", "2", "--num-samples", "1", "--no-progress"]
    refused(capsys, argv, "vae", "some_lib")
    assert not marker.exists() and torch_loads == []
    assert not (out / "latents.safetensors").exists()


def test_a_weights_family_beside_the_librarys_own_is_gated(root, tmp_path):
    """A VAE folder listed as a transformers model with a real ``model.safetensors``: diffusers' loader reads
    ``diffusion_pytorch_model.*`` in it, so those files are gated too."""
    folder = copy(root, tmp_path)
    shutil.copy(folder / "text_encoder" / "model.safetensors", folder / "vae" / "model.safetensors")
    edit_json(folder / "model_index.json", vae=["transformers", "AutoencoderKL"])
    shard_as_pickle(folder / "vae", "diffusion_pytorch_model", tmp_path / "pwned")
    with pytest.raises(ValueError, match="names the shard 'shard.bin'"):
        check_pipeline_folder(folder, skip=("unet",))


# 4. NaN in a config value or a weight: refused by name before any image is encoded, nothing written.


def nan_weight(folder: Path, component: str) -> str:
    """Put a NaN in the first floating-point weight of the component; returns the tensor's name."""
    file = folder / component / f"{WEIGHTS[component]}.safetensors"
    name = sorted(k for k, v in load_file(str(file)).items() if v.is_floating_point())[0]

    def poison(tensors):
        tensors[name].view(-1)[0] = math.nan

    edit_weights(file, poison)
    return name


@pytest.mark.parametrize("kind, component", [("sd", "vae"), ("sd", "text_encoder"), ("sdxl", "text_encoder_2")])
def test_a_nan_weight_is_refused_naming_it_before_encoding(root, tmp_path, capsys, vae_calls, kind, component):
    folder = copy(root, tmp_path, kind)
    name = nan_weight(folder, component)
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), f"{folder / component}", name, "NaN")
    assert not out.exists() and vae_calls == []


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("scaling_factor", math.nan, "scaling_factor=nan"),
        ("scaling_factor", math.inf, "scaling_factor=inf"),
        ("scaling_factor", "0.18215", "scaling_factor='0.18215'"),  # 10e
        ("scaling_factor", 0, "scaling_factor=0"),
        ("scaling_factor", -0.5, "scaling_factor=-0.5"),
        ("scaling_factor", True, "scaling_factor=True"),
        ("scaling_factor", None, "scaling_factor=None"),
        ("shift_factor", math.nan, "shift_factor=nan"),
        ("shift_factor", "0.1", "shift_factor='0.1'"),
    ],
)
def test_a_bad_scaling_or_shift_factor_is_refused_by_name(root, tmp_path, capsys, vae_calls, key, value, message):
    folder = copy(root, tmp_path)
    edit_json(folder / "vae" / "config.json", **{key: value})
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), str(folder / "vae" / "config.json"), message)
    assert not out.exists() and vae_calls == []


def test_finite_weights_that_overflow_are_refused_at_the_first_batch(root, tmp_path, capsys, vae_calls):
    """A VAE weight of 3e38 is finite, but the first convolution overflows to inf and the norms make NaN:
    caught in the first batch's latents, naming its files, nothing written."""
    folder = copy(root, tmp_path)

    def huge(tensors):
        tensors["encoder.conv_in.weight"].fill_(3e38)

    edit_weights(folder / "vae" / "diffusion_pytorch_model.safetensors", huge)
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out, "--batch-size", "4"), "latents", "image-00.png", "NaN")
    assert not out.exists() and len(vae_calls) == 1


# 8. The pipeline's fingerprint follows the weights' bytes, not their names, sizes and modification times.


def test_a_same_shape_text_encoder_with_its_mtime_restored_is_noticed(root, tmp_path):
    folder = copy(root, tmp_path)
    out = tmp_path / "latents.safetensors"
    encode(folder, root / "data", R, out, progress=False)
    assert check_training_latents(out, folder, R) is not None
    file = folder / "text_encoder" / "model.safetensors"
    stat = file.stat()
    torch.manual_seed(1)
    other = tiny_text_encoder(12)
    assert set(other.state_dict()) == set(load_file(str(file)))  # the same tensors, of the same shapes
    edit_weights(file, lambda tensors: tensors.update({k: v.contiguous() for k, v in other.state_dict().items()}))
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file.stat().st_size == stat.st_size and file.stat().st_mtime_ns == stat.st_mtime_ns
    with pytest.raises(ValueError, match="which differ from those of pretrained="):
        check_training_latents(out, folder, R)
    with pytest.raises(ValueError, match="pretrained_fingerprint="):
        check_encoded(out, folder, root / "data", R)


def test_a_file_with_an_earlier_fingerprint_is_refused_asking_to_encode_again(root, tmp_path):
    """Files written before the fingerprint hashed the weights hold a bare hex digest of names, sizes and
    modification times: still readable, refused with a clear request to encode again."""
    out = tmp_path / "latents.safetensors"
    encode(root / "sd", root / "data", R, out, progress=False)
    document = read_encoded(out)
    assert document["pretrained_fingerprint"].startswith("sha256:")
    document["pretrained_fingerprint"] = "0" * 64
    save_file(load_file(str(out)), str(out), metadata={"d2f": json.dumps(document)})
    assert read_encoded(out)["images"] == 12
    for check in (
        lambda: check_training_latents(out, root / "sd", R),
        lambda: check_encoded(out, root / "sd", root / "data", R),
    ):
        with pytest.raises(ValueError, match=re.escape(f"{out} was encoded by an earlier d2f") + ".*encode .* again"):
            check()


# 10. Configs the encoders cannot run, refused by name before anything is encoded.


def test_a_vae_that_takes_other_than_three_channels_is_refused(root, tmp_path, capsys, vae_calls):
    folder = copy(root, tmp_path)
    shutil.rmtree(folder / "vae")
    torch.manual_seed(0)
    vae = tiny_vae(channels=1)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), str(folder / "vae" / "config.json"), "in_channels=1")
    assert not out.exists() and vae_calls == []


@pytest.mark.parametrize(
    "kind, tokenizer, value, message",
    [
        ("sd", "tokenizer", ..., "no model_max_length"),
        ("sdxl", "tokenizer_2", ..., "no model_max_length"),
        ("sd", "tokenizer", 100, "model_max_length=100"),
        ("sd", "tokenizer", 0, "model_max_length=0"),
        ("sd", "tokenizer", "77", "model_max_length='77'"),
    ],
)
def test_a_tokenizer_without_a_usable_model_max_length_is_refused(
    root, tmp_path, capsys, vae_calls, kind, tokenizer, value, message
):
    folder = copy(root, tmp_path, kind)
    config = folder / tokenizer / "tokenizer_config.json"
    edit_json(config, model_max_length=value)
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), str(config), message)
    assert not out.exists() and vae_calls == []


# The adversarial pass: doctored pipeline folders, each refused by name before any image is encoded.


def drop(file: str, name: str):
    # transformers < 4.4x saves CLIPTextModel's weights under a "text_model." prefix.
    return lambda folder: edit_weights(
        folder / file, lambda tensors: tensors.pop(next(k for k in list(tensors) if k.split("text_model.")[-1] == name))
    )


def cast(file: str, dtype: torch.dtype):
    return lambda folder: edit_weights(
        folder / file, lambda tensors: tensors.update({k: v.to(dtype) for k, v in tensors.items()})
    )


def more_tokens(folder: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokenizer.add_tokens(["zz1", "zz2", "zz3"])
    tokenizer.save_pretrained(folder / "tokenizer")


def foreign_component(folder: Path) -> None:
    """A component d2f encode does not load, listed under a library d2f does not know, whose index names a
    pickled shard: the gate refuses it all the same."""
    (folder / "foo").mkdir()
    shutil.copy(folder / "vae" / "config.json", folder / "foo" / "config.json")
    shutil.copy(folder / "vae" / f"{WEIGHTS['vae']}.safetensors", folder / "foo")
    shard_as_pickle(folder / "foo", WEIGHTS["vae"], folder.parent / "pwned")
    edit_json(folder / "model_index.json", foo=["some_lib", "Foo"])


VAE_FILE, TEXT_FILE = "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"
DOCTORED = {
    "an index that is a JSON list": (
        "sd",
        lambda f: (f / "vae" / f"{WEIGHTS['vae']}.safetensors.index.json").write_text("[1, 2]"),
        ["vae/diffusion_pytorch_model.safetensors.index.json", "weight_map must map"],
    ),
    "a foreign component with a pickled shard": (
        "sd",
        foreign_component,
        ["foo/diffusion_pytorch_model.safetensors.index.json", "names the shard 'shard.bin'"],
    ),
    "force_zeros_for_empty_prompt a string": (
        "sdxl",
        lambda f: edit_json(f / "model_index.json", force_zeros_for_empty_prompt="false"),
        ["model_index.json", "force_zeros_for_empty_prompt='false' must be true or false"],
    ),
    "a text encoder without config.json": (
        "sd",
        lambda f: (f / "text_encoder" / "config.json").unlink(),
        ["text_encoder: no CLIPTextModel loads from it (RuntimeError"],
    ),
    "an unknown activation": (
        "sd",
        lambda f: edit_json(f / "text_encoder" / "config.json", hidden_act="bogus"),
        ["text_encoder: no CLIPTextModel loads from it (KeyError: 'bogus')"],
    ),
    "a truncated tokenizer.json": (
        "sd",
        lambda f: (f / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0", "trunc'),
        ["tokenizer: no CLIPTokenizer loads from it (JSONDecodeError"],
    ),
    "a VAE config that does not fit its weights": (
        "sd",
        lambda f: edit_json(f / "vae" / "config.json", block_out_channels=[16]),
        ["vae: no AutoencoderKL loads from it (ValueError"],
    ),
    "a VAE weight missing": (
        "sd",
        drop(VAE_FILE, "encoder.conv_in.weight"),
        ["vae: the weight(s) encoder.conv_in.weight of its AutoencoderKL are in none", "at random"],
    ),
    "a text-encoder weight missing": (
        "sd",
        drop(TEXT_FILE, "embeddings.token_embedding.weight"),
        ["text_encoder: the weight(s) ", "embeddings.token_embedding.weight of its CLIPTextModel"],
    ),
    "int8 VAE weights": ("sd", cast(VAE_FILE, torch.int8), [VAE_FILE, "is I8; AutoencoderKL weights are floating"]),
    "bool VAE weights": ("sd", cast(VAE_FILE, torch.bool), [VAE_FILE, "is BOOL"]),
    "a tokenizer with tokens its encoder lacks": (
        "sd",
        more_tokens,
        ["tokenizer: 59 tokens, but text_encoder has vocab_size=56"],
    ),
    "a tokenizer without a vocabulary": (
        "sd",
        lambda f: [(f / "tokenizer" / name).unlink(missing_ok=True) for name in ("tokenizer.json", "vocab.json")],
        ["tokenizer: no tokenizer.json or vocab.json"],
    ),
    "SDXL tokenizers of two lengths": (
        "sdxl",
        lambda f: edit_json(f / "tokenizer_2" / "tokenizer_config.json", model_max_length=64),
        ["the tokenizers pad to different lengths ({'tokenizer': 77, 'tokenizer_2': 64})"],
    ),
}


@pytest.mark.parametrize("case", DOCTORED)
def test_a_doctored_pipeline_is_refused_by_name_before_encoding(root, tmp_path, capsys, vae_calls, case):
    kind, doctor, parts = DOCTORED[case]
    folder = copy(root, tmp_path, kind)
    if "tokenizer.json" in case and not (folder / "tokenizer" / "tokenizer.json").is_file():
        pytest.skip("this transformers saves the slow tokenizer's files only: there is no tokenizer.json to doctor")
    doctor(folder)
    out = tmp_path / "latents.safetensors"
    line = refused(capsys, encode_argv(folder, root / "data", out), str(folder))
    component = re.split(r"[:/]", parts[0])[0]
    # Older diffusers and transformers refuse these inside from_pretrained, before d2f's own check reads the
    # weights: still one line naming the component, in the loader's words.
    loader_refused = f"{component}: no " in line and " loads from it (" in line
    assert all(part in line for part in parts) or loader_refused, (parts, line)
    assert not out.exists() and vae_calls == [] and not (tmp_path / "pwned").exists()


def test_a_scaling_factor_whose_latents_overflow_is_refused_at_the_first_batch(root, tmp_path, capsys, vae_calls):
    folder = copy(root, tmp_path)
    edit_json(folder / "vae" / "config.json", scaling_factor=1e308)  # finite, but not in float32 times a latent
    out = tmp_path / "latents.safetensors"
    refused(capsys, encode_argv(folder, root / "data", out), f"{folder / 'vae'}: the scaled latents", "NaN or inf")
    assert not out.exists() and len(vae_calls) == 1


@pytest.mark.parametrize(
    "case",
    ["vae float64", "vae float16", "vae bfloat16", "text_encoder float16", "extra tensors", "slow tokenizer files"],
)
def test_what_the_loaders_take_as_it_is_still_encodes(root, tmp_path, case):
    """Other floating-point dtypes, unused extra tensors and the slow tokenizer's files load as the pipeline
    loads them: finite latents, float64 ones bit for bit the float32 file's."""
    from pipelines import VOCAB

    folder = copy(root, tmp_path)
    if case.startswith("vae "):
        cast(VAE_FILE, getattr(torch, case.split()[1]))(folder)
    elif case == "text_encoder float16":
        cast(TEXT_FILE, torch.float16)(folder)
    elif case == "extra tensors":
        for file in (VAE_FILE, TEXT_FILE):
            edit_weights(folder / file, lambda tensors: tensors.update(extra=torch.zeros(3)))
    else:
        (folder / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
        (folder / "tokenizer" / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(VOCAB)}))
        (folder / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    tensors = encode(folder, root / "data", R, progress=False)["tensors"]
    assert all(bool(torch.isfinite(t).all()) for t in tensors.values())
    expected = encode(root / "sd", root / "data", R, progress=False)["tensors"]
    if case in ("vae float64", "extra tensors", "slow tokenizer files"):
        assert all(torch.equal(tensors[k], expected[k]) for k in expected)
