"""Image folders with awkward files: every file is built here with PIL, nothing is downloaded or committed."""

import re
import warnings

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from d2f.data.datasets import load_dataset
from d2f.data.images import pixels

RES = 4  # images are made RES x RES, so no resizing blurs the values checked


def scaled(pixels) -> np.ndarray:
    """8-bit values as the loader's [-1, 1]."""
    return np.asarray(pixels, dtype=np.float32) / 127.5 - 1


def load_one(folder, channels: int) -> np.ndarray:
    """The single image in ``folder``, as ``(H, W, C)``."""
    data = load_dataset(str(folder), RES, channels)
    assert data.images.shape == (1, channels, RES, RES)
    return data.images[0].permute(1, 2, 0).numpy()


def noise(shape, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def transparent_rgba() -> Image.Image:
    """Top-left pixel fully transparent over red junk, top-right opaque blue, the rest black at alpha 128."""
    pixels = np.zeros((RES, RES, 4), dtype=np.uint8)
    pixels[..., 3] = 128
    pixels[0, 0] = (255, 0, 0, 0)
    pixels[0, 1] = (0, 0, 255, 255)
    return Image.fromarray(pixels, mode="RGBA")


def transparent_la() -> Image.Image:
    pixels = np.zeros((RES, RES, 2), dtype=np.uint8)
    pixels[..., 1] = 128
    pixels[0, 0] = (40, 0)  # junk grey under alpha 0
    pixels[0, 1] = (10, 255)
    return Image.fromarray(pixels, mode="LA")


def transparent_palette() -> Image.Image:
    im = Image.new("P", (RES, RES), 2)
    im.putpalette([255, 0, 0, 0, 0, 255, 0, 0, 0])  # entry 0 (red) is the transparent one
    im.putpixel((0, 0), 0)
    im.putpixel((1, 0), 1)
    im.info["transparency"] = 0
    return im


@pytest.mark.parametrize("make", [transparent_rgba, transparent_la, transparent_palette])
@pytest.mark.parametrize("channels", [1, 3])
def test_transparent_pixels_are_composited_onto_white(tmp_path, make, channels):
    im = make()
    im.save(tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").has_transparency_data
    out = load_one(tmp_path, channels)
    np.testing.assert_array_equal(out[0, 0], np.ones(channels))  # white, not the red/grey junk under alpha 0
    opaque = np.asarray(im.convert("RGBA").convert("RGB" if channels == 3 else "L")).reshape(RES, RES, channels)
    np.testing.assert_array_equal(out[0, 1], scaled(opaque[0, 1]))
    if make is not transparent_palette:  # black at alpha 128 over white: about mid grey
        np.testing.assert_allclose(out[1, 1], np.zeros(channels), atol=1.5 / 127.5)


SIXTEEN = np.array([[0, 32768, 65535, 1000]] * RES, dtype=np.uint16)
SIXTEEN_EXPECTED = SIXTEEN.astype(np.float64) / 65535 * 2 - 1


@pytest.mark.parametrize("channels", [1, 3])
def test_sixteen_bit_png_uses_its_full_range(tmp_path, channels):
    Image.fromarray(SIXTEEN).save(tmp_path / "a.png")
    with Image.open(tmp_path / "a.png") as im:
        assert im.mode == "I;16"
        assert np.asarray(im.convert("L"))[0, 1] == 255  # PIL's own conversion clips: why the loader scales
    out = load_one(tmp_path, channels)
    assert abs(out[0, 1, 0]) < 1e-4  # 32768 is mid grey
    for c in range(channels):
        np.testing.assert_allclose(out[..., c], SIXTEEN_EXPECTED, atol=1e-5)


def test_sixteen_bit_modes_in_memory_use_their_full_range():
    # Pillow 13 opens every 16-bit grey PNG as "I;16"; older Pillow gave "I", and "I;16B" is its big-endian twin.
    images = {
        "I": Image.fromarray(SIXTEEN.astype(np.int32)),
        "I;16B": Image.frombytes("I;16B", (RES, RES), SIXTEEN.astype(">u2").tobytes()),
    }
    for mode, im in images.items():
        assert im.mode == mode
        for channels in (1, 3):
            out = pixels(im, channels) / 127.5 - 1
            assert out.shape == (RES, RES, channels)
            np.testing.assert_allclose(out[..., -1], SIXTEEN_EXPECTED, atol=1e-5, err_msg=mode)


@pytest.mark.parametrize("channels", [1, 3])
def test_other_modes_follow_pils_conversion(tmp_path, channels):
    target = "L" if channels == 1 else "RGB"
    palette = Image.fromarray(noise((RES, RES, 3))).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    sources = {
        "cmyk.jpg": Image.fromarray(noise((RES, RES, 4), seed=1), mode="CMYK"),
        "palette.png": palette,
        "grey.png": Image.fromarray(noise((RES, RES), seed=2)),
        "rgb.png": Image.fromarray(noise((RES, RES, 3), seed=3)),
        "bilevel.png": Image.fromarray(noise((RES, RES), seed=4) > 127),
    }
    for name, im in sources.items():
        folder = tmp_path / name
        folder.mkdir()
        im.save(folder / name)
        with Image.open(folder / name) as reopened:
            assert reopened.mode == im.mode, name
            expected = scaled(reopened.convert(target)).reshape(RES, RES, channels)
        np.testing.assert_array_equal(load_one(folder, channels), expected, err_msg=name)


def write_bad_folder(folder):
    """Three good images (in sorted order) and eight files to skip or ignore."""
    folder.mkdir()
    good = [noise((RES, RES, 3), seed=i) for i in range(3)]
    Image.fromarray(good[0]).save(folder / "a.png")
    Image.fromarray(good[1]).save(folder / "b.png")
    (folder / "sub").mkdir()
    Image.fromarray(good[2]).save(folder / "sub" / "c.png")
    (folder / "empty.png").write_bytes(b"")
    (folder / "empty.jpg").write_bytes(b"")
    # Big noise images, so cutting them in half lands in the pixel data, past the headers.
    Image.fromarray(noise((64, 64, 3), seed=5)).save(folder / "whole.png")
    Image.fromarray(noise((64, 64, 3), seed=6)).save(folder / "whole.jpg", quality=90)
    for name in ("whole.png", "whole.jpg"):
        data = (folder / name).read_bytes()
        (folder / name).unlink()
        (folder / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not a png at all")
    (folder / "notes.txt").write_text("captions")
    (folder / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return good


@pytest.mark.parametrize("channels", [1, 3])
def test_bad_files_are_skipped_and_counted(tmp_path, channels):
    good = write_bad_folder(tmp_path / "images")
    with pytest.warns(UserWarning) as record:
        data = load_dataset(str(tmp_path / "images"), RES, channels)
    assert len(record) == 1
    message = str(record[0].message)
    assert "skipped 5 unreadable file(s)" in message
    assert "empty: 2 (empty.jpg, empty.png)" in message
    assert "truncated: 2 (cut_whole.jpg" in message and "cut_whole.png" in message
    assert "not an image: 1 (text.png)" in message
    assert "ignored 2 file(s) not .png/.jpg/.jpeg (.DS_Store, notes.txt)" in message
    assert message.endswith("loaded 3 image(s)")
    target = "L" if channels == 1 else "RGB"
    expected = [scaled(Image.fromarray(g).convert(target)).reshape(RES, RES, channels) for g in good]
    np.testing.assert_array_equal(data.images.permute(0, 2, 3, 1).numpy(), np.stack(expected))


def test_truncated_files_are_skipped_even_when_pil_would_accept_them(tmp_path, monkeypatch):
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)  # as another library might leave it
    write_bad_folder(tmp_path / "images")
    with pytest.warns(UserWarning, match=r"truncated: 2 "):
        data = load_dataset(str(tmp_path / "images"), RES, 3)
    assert len(data) == 3
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is given back


def test_clean_folder_loads_silently_and_bad_only_folder_is_an_error(tmp_path):
    (tmp_path / "clean").mkdir()
    Image.fromarray(noise((RES, RES, 3))).save(tmp_path / "clean" / "a.jpg")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_dataset(str(tmp_path / "clean"), RES, 3)) == 1
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "empty.png").write_bytes(b"")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"), pytest.raises(ValueError, match="no readable"):
        load_dataset(str(tmp_path / "bad"), RES, 3)


def test_exif_orientation_is_applied(tmp_path):
    """A 4x2 photo tagged "rotate 90 CW" (orientation 6) is shown, and loaded, as 2 wide and 4 tall."""
    photo = np.zeros((2, 4), dtype=np.uint8)
    photo[0, 0] = 255  # top-left before rotation; 90 degrees clockwise puts it top-right
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "photo.png", exif=exif)
    images = load_dataset(str(tmp_path), 2, 1).images  # resolution 2: the shorter side is kept as is
    loaded = pixels(Image.open(tmp_path / "photo.png"), 1)[..., 0]
    assert loaded.shape == (4, 2) and loaded[0, 1] == 255 and loaded[0, 0] == 0
    assert images.shape == (1, 1, 2, 2)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("labels", torch.tensor([0, 1, -1, 2]), "labels must be one label >= 0 per sample; got shape (4,), min -1"),
        ("labels", torch.tensor([0.0, 1.0, 2.0, 3.0]), "labels have dtype torch.float32; class labels must be int64"),
        ("labels", torch.tensor([True, False, True, False]), "labels have dtype torch.bool"),
        ("labels", torch.zeros(4, 2, dtype=torch.int64), "labels must be one label >= 0 per sample; got shape (4, 2)"),
        ("concat", torch.full((4, 1, 16, 16), torch.nan), "concat must be finite floating-point values"),
    ],
)
def test_bad_labels_and_conditions_in_a_latents_file_are_named(tmp_path, key, value, message):
    """Refused when read, not inside the network's embedding (on a GPU, a device-side assert)."""
    from safetensors.torch import save_file

    path = tmp_path / "latents.safetensors"
    save_file({"latents": torch.zeros(4, 1, 16, 16), key: value}, str(path))
    with pytest.raises(ValueError, match=re.escape(f"{path}: {message}")):
        load_dataset(str(path), 16, 2 if key == "concat" else 1)


@pytest.mark.parametrize(
    ("tensors", "message"),
    [
        ({"null_encoder_hidden_states": torch.zeros(2, 3, 5)}, "null_encoder_hidden_states has shape (2, 3, 5); it"),
        ({"null_text_embeds": torch.zeros(7)}, "null_text_embeds has shape (7,); it must be one sample's, text_embeds"),
        ({"text_embeds": torch.zeros(4, 7), "time_ids": torch.zeros(4, 5)}, "time_ids has shape (4, 5); SDXL's are"),
    ],
)
def test_null_conditions_and_time_ids_must_fit_the_samples(tmp_path, tensors, message):
    from safetensors.torch import save_file

    path = tmp_path / "latents.safetensors"
    states = {"encoder_hidden_states": torch.zeros(4, 3, 5)}
    save_file({"latents": torch.zeros(4, 4, 8, 8), **states, **tensors}, str(path))
    with pytest.raises(ValueError, match=re.escape(message)):
        load_dataset(str(path), 8, 4)
