"""``d2f.data.encode`` on tiny local SD and SDXL pipelines and generated captioned folders: the file holds
what the pipeline's own VAE and text encoders (and SDXL's ``encode_prompt`` and ``_get_add_time_ids``) give
for the same preprocessed images and captions; the crop, the flip and the seeded sample; clear errors."""

import json
import os
import re
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers import DiffusionPipeline  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from d2f.data import datasets as data_module  # noqa: E402
from d2f.data.captions import find_captions, read_captioned  # noqa: E402
from d2f.data.encode import check_encoded, encode, read_encoded  # noqa: E402
from pipelines import captioned_folder, tiny_sd_pipeline  # noqa: E402

R = 16  # the tiny VAE keeps the image's size: 4 x 16 x 16 latents
KEYS = {
    "sd": {"latents", "encoder_hidden_states", "null_encoder_hidden_states"},
    "sdxl": {"latents", "encoder_hidden_states", "null_encoder_hidden_states", "text_embeds", "null_text_embeds"}
    | {"time_ids"},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode")
    tiny_sd_pipeline(root / "sd")
    tiny_sd_pipeline(root / "sdxl", xl=True)
    captioned_folder(root / "jsonl")
    captioned_folder(root / "txt", formats="txt")
    return root


def load_pipeline(folder):
    pipe = DiffusionPipeline.from_pretrained(folder, use_safetensors=True, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("layout", ["jsonl", "txt"])
@pytest.mark.parametrize("kind", ["sd", "sdxl"])
def test_the_file_holds_the_pipelines_own_encoding(root, kind, layout):
    out = root / f"{kind}-{layout}.safetensors"
    result = encode(root / kind, root / layout, R, out=out, batch_size=5, progress=False)
    tensors = load_file(str(out))
    assert set(tensors) == KEYS[kind] and all(t.dtype == torch.float32 for t in tensors.values())
    images = read_captioned(root / layout, R)
    assert images.files == [f"image-{i:02d}.png" for i in range(12)]
    assert images.captions == read_captioned(root / ("txt" if layout == "jsonl" else "jsonl"), R).captions
    pipe = load_pipeline(root / kind)

    with torch.no_grad():
        mean = pipe.vae.encode(images.images).latent_dist.mean
        expected_latents = mean * pipe.vae.config.scaling_factor
        torch.testing.assert_close(tensors["latents"], expected_latents, rtol=0, atol=1e-6)
        if kind == "sd":
            ids = pipe.tokenizer(images.captions, padding="max_length", max_length=77, truncation=True).input_ids
            own = pipe.text_encoder(torch.tensor(ids))[0]
            prompt, negative = pipe.encode_prompt(images.captions, "cpu", 1, True)
            empty = pipe.text_encoder(torch.tensor(pipe.tokenizer([""], padding="max_length", max_length=77).input_ids))
            torch.testing.assert_close(negative[0], empty[0][0], rtol=0, atol=1e-6)
        else:
            prompt, negative, pooled, negative_pooled = pipe.encode_prompt(
                images.captions, device="cpu", do_classifier_free_guidance=True
            )
            ids = pipe.tokenizer_2(images.captions, padding="max_length", max_length=77, truncation=True).input_ids
            own = pipe.text_encoder_2(torch.tensor(ids), output_hidden_states=True)
            torch.testing.assert_close(
                tensors["encoder_hidden_states"][..., 4:], own.hidden_states[-2], rtol=0, atol=1e-6
            )
            torch.testing.assert_close(tensors["text_embeds"], own.text_embeds, rtol=0, atol=1e-6)
            torch.testing.assert_close(tensors["text_embeds"], pooled, rtol=0, atol=1e-6)
            # force_zeros_for_empty_prompt (SDXL base's setting): the pipeline guides with zeros
            torch.testing.assert_close(tensors["null_text_embeds"], negative_pooled[0], rtol=0, atol=0)
            for i in range(12):
                size, crop = tuple(images.original_sizes[i].tolist()), tuple(images.crops_top_left[i].tolist())
                want = pipe._get_add_time_ids(size, crop, (R, R), torch.float32, text_encoder_projection_dim=6)
                assert torch.equal(tensors["time_ids"][i : i + 1], want)
            # image-03 is 40 wide and 20 high: resized to 32 x 16, its center square starts at column 8
            assert tensors["time_ids"][3].tolist() == [20, 40, 0, 8, R, R]
    if kind == "sd":
        torch.testing.assert_close(tensors["encoder_hidden_states"], own, rtol=0, atol=1e-6)
    torch.testing.assert_close(tensors["encoder_hidden_states"], prompt, rtol=0, atol=1e-6)
    torch.testing.assert_close(tensors["null_encoder_hidden_states"], negative[0], rtol=0, atol=1e-6)

    document = read_encoded(out)
    assert {k: v for k, v in result.items() if k not in ("seconds", "tensors")} == document
    assert (
        document["kind"] == kind
        and document["images"] == 12
        and document["null"] == ("zeros" if kind == "sdxl" else "empty prompt")
    )
    assert document["captions"] == {"jsonl": "metadata.jsonl", "txt": ".txt"}[layout]
    trainer = data_module.latents(out)  # what d2f train reads
    assert torch.equal(trainer.images, tensors["latents"]) and trainer.null_encoder_hidden_states.shape == (77, 12)


def test_sdxl_without_force_zeros_drops_to_the_empty_prompt(root, tmp_path):
    folder = tmp_path / "sdxl"
    shutil.copytree(root / "sdxl", folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    data = captioned_folder(tmp_path / "data", n=2)
    result = encode(folder, data, R, progress=False)
    pipe = load_pipeline(folder)
    with torch.no_grad():
        _, negative, _, negative_pooled = pipe.encode_prompt(["a", "b"], device="cpu", do_classifier_free_guidance=True)
    assert result["null"] == "empty prompt" and negative.abs().sum() > 0
    torch.testing.assert_close(result["tensors"]["null_encoder_hidden_states"], negative[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(result["tensors"]["null_text_embeds"], negative_pooled[0], rtol=0, atol=1e-6)


def known_image(folder, width=60, height=20, caption="x"):
    """Red, then white, blue and red in 10-pixel bands across the middle third: the center crop of a 60 x 20
    image is the white and blue bands."""
    folder.mkdir(parents=True, exist_ok=True)
    pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
    pixels[..., 0] = 255
    pixels[:, width // 3 : width // 2] = 255
    pixels[:, width // 2 : 2 * width // 3] = torch.tensor([0, 0, 255], dtype=torch.uint8)
    Image.fromarray(pixels.numpy(), "RGB").save(folder / "band.png")
    (folder / "band.txt").write_text(caption)
    return folder


def test_center_crop_and_resize_of_a_known_image(tmp_path):
    folder = known_image(tmp_path / "data")
    images = read_captioned(folder, 10)
    image = images.images[0]
    assert image.shape == (3, 10, 10)
    white, blue = torch.ones(3, 10, 3), torch.tensor([-1.0, -1.0, 1.0])[:, None, None].expand(3, 10, 3)
    torch.testing.assert_close(image[..., 1:4], white, rtol=0, atol=1e-6)  # bands' edges blend (antialiasing)
    torch.testing.assert_close(image[..., 6:9], blue, rtol=0, atol=1e-6)
    assert images.original_sizes.tolist() == [[20, 60]] and images.crops_top_left.tolist() == [[0, 10]]
    assert images.captions == ["x"] and images.files == ["band.png"]
    # The same pixels as d2f's image-folder loader (the same decoding and resize).
    with pytest.warns(UserWarning, match="ignored 1 file"):
        assert torch.equal(data_module.image_folder(folder, 10, 3).images, images.images)
    flipped = read_captioned(folder, 10, flip=True, seed=0)
    assert flipped.flipped.tolist() == [True]
    assert torch.equal(flipped.images[0], image.flip(-1))
    assert flipped.crops_top_left.tolist() == [[0, 10]]  # 30 - 10 - 10: the crop is centered


def test_flip_is_seeded(root):
    plain = read_captioned(root / "jsonl", R)
    first, again = read_captioned(root / "jsonl", R, flip=True, seed=0), read_captioned(root / "jsonl", R, flip=True)
    other = read_captioned(root / "jsonl", R, flip=True, seed=1)
    assert torch.equal(first.images, again.images) and torch.equal(first.flipped, again.flipped)
    assert 0 < int(first.flipped.sum()) < 12 and not torch.equal(first.flipped, other.flipped)
    for i in range(12):
        assert torch.equal(first.images[i], plain.images[i].flip(-1) if first.flipped[i] else plain.images[i])
    # A flipped image's crop starts where the square lies in the mirrored resized image.
    for i in torch.nonzero(first.flipped).flatten().tolist():
        (top, left), (height, width) = plain.crops_top_left[i].tolist(), plain.original_sizes[i].tolist()
        resized_width = max(R, round(width * R / min(height, width)))
        assert first.crops_top_left[i].tolist() == [top, resized_width - left - R]
    a = encode(root / "sd", root / "jsonl", R, flip=True, seed=0, progress=False)
    b = encode(root / "sd", root / "jsonl", R, flip=True, seed=0, batch_size=3, progress=False)
    torch.testing.assert_close(a["tensors"]["latents"], b["tensors"]["latents"], rtol=0, atol=1e-6)
    assert a["flip"] is True


def test_sample_is_a_seeded_draw_around_the_mean(root):
    a = encode(root / "sd", root / "jsonl", R, sample=True, seed=3, batch_size=5, progress=False)
    b = encode(root / "sd", root / "jsonl", R, sample=True, seed=3, batch_size=12, progress=False)
    c = encode(root / "sd", root / "jsonl", R, sample=True, seed=4, progress=False)
    torch.testing.assert_close(a["tensors"]["latents"], b["tensors"]["latents"], rtol=0, atol=1e-6)
    assert not torch.allclose(a["tensors"]["latents"], c["tensors"]["latents"])
    vae = load_pipeline(root / "sd").vae
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        dist = vae.encode(read_captioned(root / "jsonl", R).images).latent_dist
    noise = torch.stack([torch.randn(4, R, R, generator=g) for _ in range(12)])
    expected = (dist.mean + dist.std * noise) * vae.config.scaling_factor
    torch.testing.assert_close(a["tensors"]["latents"], expected, rtol=0, atol=1e-6)


def test_shift_factor_is_subtracted_before_scaling(root, tmp_path):
    folder = tmp_path / "sd"
    shutil.copytree(root / "sd", folder)
    config = json.loads((folder / "vae/config.json").read_text())
    (folder / "vae/config.json").write_text(json.dumps({**config, "shift_factor": 0.25, "scaling_factor": 0.5}))
    shifted = encode(folder, root / "txt", R, progress=False)
    plain = encode(root / "sd", root / "txt", R, progress=False)
    expected = (plain["tensors"]["latents"] / 0.18215 - 0.25) * 0.5
    torch.testing.assert_close(shifted["tensors"]["latents"], expected, rtol=1e-5, atol=1e-6)
    assert (shifted["shift_factor"], shifted["scaling_factor"]) == (0.25, 0.5)


def test_a_reused_file_must_match_its_data_and_settings(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root / "txt", data)
    out = data / "latents.safetensors"  # inside the data folder: not data itself
    encode(root / "sd", data, R, out=out, progress=False)
    assert check_encoded(out, root / "sd", data, R)["images"] == 12
    with pytest.raises(ValueError, match=re.escape("resolution=16 then, 8 now")):
        check_encoded(out, root / "sd", data, 8)
    with pytest.raises(ValueError, match=re.escape("flip=False then, True now")):
        check_encoded(out, root / "sd", data, R, flip=True)
    with pytest.raises(ValueError, match="kind='sd' then, 'sdxl' now"):
        check_encoded(out, root / "sdxl", data, R)
    (data / "image-04.txt").write_text("a new caption")
    os.utime(data / "image-04.txt", ns=(1, 1))
    with pytest.raises(ValueError, match=f"{re.escape(str(out))} was encoded from other data.*data_fingerprint="):
        check_encoded(out, root / "sd", data, R)


def without(root, tmp_path, component, how):
    folder = tmp_path / "pipeline"
    shutil.copytree(root / ("sdxl" if component.endswith("_2") else "sd"), folder)
    if how == "folder":
        shutil.rmtree(folder / component)
    else:
        index = json.loads((folder / "model_index.json").read_text())
        index.pop(component)
        (folder / "model_index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("how", ["folder", "index"])
@pytest.mark.parametrize("component", ["vae", "text_encoder", "tokenizer_2"])
def test_a_pipeline_without_a_vae_or_text_encoder_is_refused(root, tmp_path, component, how):
    folder = without(root, tmp_path, component, how)
    why = "no such folder" if how == "folder" else "model_index.json names none"
    with pytest.raises(ValueError, match=re.escape(f"{folder}: the pipeline has no {component}/ ({why})")):
        encode(folder, root / "txt", R, progress=False)


def test_a_pipeline_of_the_other_kind_is_refused(root, tmp_path):
    with pytest.raises(ValueError, match=r"is an SDXL pipeline \(StableDiffusionXLPipeline, with text_encoder_2"):
        encode(root / "sdxl", root / "txt", R, kind="sd", progress=False)
    with pytest.raises(ValueError, match=r"is an SD 1.x/2.x pipeline .*but kind='sdxl' asks for an SDXL one"):
        encode(root / "sd", root / "txt", R, kind="sdxl", progress=False)
    with pytest.raises(ValueError, match="not a diffusers pipeline folder .no model_index.json."):
        encode(tmp_path, root / "txt", R, progress=False)


def test_bad_captions_are_refused_naming_the_file(root, tmp_path):
    txt = tmp_path / "txt"
    shutil.copytree(root / "txt", txt)
    (txt / "image-03.txt").unlink()
    (txt / "image-07.txt").unlink()
    with pytest.raises(ValueError, match=re.escape(f"{txt}: 2 image(s) have no caption (no .txt beside them")):
        encode(root / "sd", txt, R, progress=False)
    with pytest.raises(ValueError, match=r"no caption \(.*\): image-03.png, image-07.png$"):
        find_captions(txt)

    jsonl = tmp_path / "jsonl"
    shutil.copytree(root / "jsonl", jsonl)
    metadata = jsonl / "metadata.jsonl"
    columns = "the line has the columns ['file_name', 'text']"
    with pytest.raises(ValueError, match=re.escape(f"{metadata} line 1: no caption column 'caption'; {columns}")):
        encode(root / "sd", jsonl, R, caption_column="caption", progress=False)
    lines = metadata.read_text().splitlines()
    metadata.write_text("\n".join([*lines, json.dumps({"file_name": "gone.png", "text": "x"})]))
    with pytest.raises(ValueError, match=re.escape(f"{metadata} line 13: file_name='gone.png' names a file that")):
        find_captions(jsonl)
    metadata.write_text("\n".join(lines[1:]))  # the first line named image-11.png
    with pytest.raises(ValueError, match=re.escape(f"1 image(s) have no caption (not named in {metadata}): image-11")):
        find_captions(jsonl)
    for line, message in [
        ("{not json", "line 1: not a JSON object"),
        (json.dumps({"file_name": "../x.png", "text": "x"}), "file_name='../x.png'; expected a path inside"),
        (json.dumps({"file_name": "image-11.png", "text": ["a", "b"]}), "text=['a', 'b'] is a list; expected a str"),
        (json.dumps({"name": "image-11.png"}), "line 1: no 'file_name'; the line has the columns ['name']"),
    ]:
        metadata.write_text("\n".join([line, *lines[1:]]))
        with pytest.raises(ValueError, match=re.escape(message)):
            find_captions(jsonl)


def test_unreadable_files_and_long_captions_are_counted(root, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(root / "txt", data)
    (data / "broken.png").write_bytes(b"not a png")
    (data / "broken.txt").write_text("broken")
    (data / "empty.png").write_bytes(b"")
    (data / "empty.txt").write_text("empty")
    (data / "notes.md").write_text("notes")
    (data / ".DS_Store").write_bytes(b"\0")
    (data / "image-05.txt").write_text("b" * 100)  # 100 tokens, over the tokenizer's 77
    message = (
        r"skipped 2 unreadable file\(s\) \[not an image: 1 \(broken.png\); empty: 1 \(empty.png\)\]; "
        r"ignored 1 file\(s\) that are neither an image nor a caption \(notes.md\); loaded 12 image\(s\)"
    )
    with pytest.warns(UserWarning) as caught:
        result = encode(root / "sd", data, R, batch_size=5, progress=False)
    texts = [str(w.message) for w in caught]
    assert any(re.search(message, t) for t in texts), texts
    assert any("1 caption(s) are longer than the tokenizer's model_max_length" in t for t in texts), texts
    assert result["images"] == 12 and result["skipped"] == {"not an image": 1, "empty": 1}
    assert result["truncated"] == 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(resolution=0), "resolution=0 is not allowed: a positive integer"),
        (dict(batch_size=0), "batch_size=0 is not allowed: a positive integer"),
        (dict(flip="yes"), "flip='yes' must be True or False"),
        (dict(sample=1), "sample=1 must be True or False"),
        (dict(seed=-1), "seed=-1 is not allowed"),
        (dict(out="latents.npy"), "out='latents.npy': the latents file is written as .safetensors"),
        (dict(kind="sd3"), "kind='sd3' is not allowed"),
        (dict(caption_column=""), "caption_column='': the name of a column"),
    ],
)
def test_bad_arguments_are_refused(root, kwargs, message):
    kwargs = {"resolution": R, **kwargs}
    with pytest.raises(ValueError, match=re.escape(message)):
        encode(root / "sd", root / "jsonl", progress=False, **kwargs)


def test_paired_conditions_are_encoded_cropped_and_flipped_with_their_targets(root, tmp_path):
    """Conditions that are copies of their targets (saved as JPEG-named PNGs: any suffix pairs) encode to the
    targets' own latents, flip included; a missing partner is refused, counted on each side; a changed
    condition folder makes a reused file stale."""
    cond = tmp_path / "cond"
    cond.mkdir()
    for image in sorted((root / "jsonl").glob("*.png")):
        shutil.copy(image, cond / image.with_suffix(".jpeg").name)
    out = tmp_path / "pairs.safetensors"
    report = encode(root / "sd", root / "jsonl", R, out, flip=True, seed=2, cond_data=cond, progress=False)
    tensors = load_file(str(out))
    assert tensors["concat"].shape == tensors["latents"].shape == (12, 4, R, R)
    torch.testing.assert_close(tensors["concat"], tensors["latents"], rtol=0, atol=0)
    assert report["cond_data"] == str(cond.resolve()) and report["cond_fingerprint"]
    check_encoded(out, root / "sd", root / "jsonl", R, flip=True, seed=2, cond_data=cond)
    with pytest.raises(ValueError, match="cond_fingerprint="):
        check_encoded(out, root / "sd", root / "jsonl", R, flip=True, seed=2)
    (cond / "image-03.jpeg").rename(cond / "other.jpeg")
    message = r"1 in data, not in cond_data \(.*cond\): image-03; 1 in cond_data, not in data \(.*jsonl\): other"
    with pytest.raises(ValueError, match=message):
        encode(root / "sd", root / "jsonl", R, cond_data=cond, progress=False)
