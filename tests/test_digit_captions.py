"""The captioned digits: the two measures against shapes whose answer is known by hand, the bins, the captions,
and the folder ``d2f encode`` reads."""

import json

import pytest
import torch

from d2f.data.captions import find_captions, load_image
from d2f.data.digit_captions import (
    NAMES,
    PHRASINGS,
    SLANT,
    THICKNESS,
    attributes,
    caption,
    captioned_digits,
    slant,
    thickness,
    words,
    write_digit_folder,
)


def canvas(*pixels):
    """A 28 px image in [-1, 1] with ink (1) at the given (row, column) pixels."""
    image = -torch.ones(1, 1, 28, 28)
    for row, column in pixels:
        image[0, 0, row, column] = 1
    return image


def bar(width, length=20):
    return canvas(*((4 + r, 10 + c) for r in range(length) for c in range(width)))


@pytest.mark.parametrize(
    "width, expected",
    # area w L over boundary pixels: all of them for w <= 2, else area less the (w - 2)(L - 2) interior ones
    [(1, 1.0), (2, 1.0), (3, 60 / 42), (4, 80 / 44), (6, 120 / 48)],
)
def test_thickness_of_a_bar_is_area_over_boundary(width, expected):
    assert thickness(bar(width)).item() == pytest.approx(expected)


@pytest.mark.parametrize("shear, expected", [(1, 1.0), (-1, -1.0), (0, 0.0)])
def test_slant_of_a_line_is_its_shear_with_y_up(shear, expected):
    # row r lies 27 - r up from the bottom, so column 4 + shear * (27 - r) moves right going up when shear > 0
    line = canvas(*((r, 13 + shear * (13 - r)) for r in range(4, 24)))
    assert slant(line).item() == pytest.approx(expected, abs=1e-6)


def test_measures_resize_other_sizes_to_28px_and_average_channels():
    wide = bar(4)
    upsampled = torch.nn.functional.interpolate(wide, size=56, mode="nearest").repeat(1, 3, 1, 1)
    assert thickness(upsampled).item() == pytest.approx(thickness(wide).item(), rel=0.05)
    assert slant(upsampled).item() == pytest.approx(0.0, abs=1e-3)


def test_an_image_without_ink_measures_zero_and_a_wrong_shape_is_refused():
    blank = -torch.ones(2, 1, 28, 28)
    assert thickness(blank).tolist() == [0.0, 0.0] and slant(blank).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"shape \(28, 28\).*\(N, C, H, W\)"):
        thickness(torch.zeros(28, 28))


def test_bins_split_at_their_edges():
    images = torch.cat([bar(1), bar(4), canvas(*((r, 13 - (13 - r)) for r in range(4, 24)))])
    assert attributes(images) == {
        "thickness": ["thin", "thick", "thin"],
        "slant": ["upright", "upright", "leaning left"],
    }


def test_captions_name_the_digit_and_only_the_known_words():
    assert caption(7, "thick", "leaning left", 4) == "a thick seven leaning left"
    assert caption(3, "thin", "upright", 1) == "the digit 3"
    with pytest.raises(ValueError, match=r"thickness='bold'.*one of \('thin', 'thick'\)"):
        caption(1, "bold", "upright", 0)
    texts = {caption(d, t, s, p) for d in range(10) for t in THICKNESS for s in SLANT for p in range(len(PHRASINGS))}
    assert {w for text in texts for w in text.split()} == set(words())
    assert set(NAMES) <= set(words()) and {str(d) for d in range(10)} <= set(words())


def test_captioned_digits_measure_the_originals_and_draw_phrasings_from_the_seed():
    a, b, other = captioned_digits(28, seed=0), captioned_digits(28, seed=0), captioned_digits(28, seed=1)
    assert a.captions == b.captions and a.captions != other.captions
    assert a.images.shape == (5000, 1, 28, 28)
    measured = attributes(a.images)
    assert measured["thickness"] == a.thickness and measured["slant"] == a.slant
    # about half the digits fall on each side of the thickness split; the slant bins are near tertiles
    assert 0.4 < a.thickness.count("thin") / 5000 < 0.6
    assert all(0.25 < a.slant.count(s) / 5000 < 0.4 for s in SLANT)
    for label, text in zip(a.labels[:50], a.captions[:50]):
        assert NAMES[label] in text.split() or str(int(label)) in text.split()


def test_the_folder_is_what_encode_reads_and_its_columns_are_the_measures(tmp_path):
    out = write_digit_folder(tmp_path / "digits", resolution=28)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    found = find_captions(out)
    assert found.source == "metadata.jsonl" and len(found.files) == 5000
    assert found.captions == [row["text"] for row in rows]
    # the images as d2f reads them measure as their columns say (at 28 px the PNGs hold the originals exactly)
    picks = [0, 1234, 4999]
    images = torch.stack([load_image(out / rows[i]["file_name"], 28)[0] for i in picks])
    assert attributes(images) == {k: [rows[i][k] for i in picks] for k in ("thickness", "slant")}
    with pytest.raises(FileExistsError, match="already exists"):
        write_digit_folder(out, resolution=28)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["digits"]


def test_a_smaller_folder_spreads_over_every_class(tmp_path):
    """The shipped digits are sorted by class: ``count`` takes them evenly spaced, not the first ones (all zeros)."""
    out = write_digit_folder(tmp_path / "twenty", resolution=16, count=20)
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [row["digit"] for row in rows] == [d for d in range(10) for _ in range(2)]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{i:05d}.png" for i in range(20)] + ["metadata.jsonl"])
    for count, message in [(0, "count=0 must be a positive integer"), (5001, "count=5001 is more than the 5000")]:
        with pytest.raises(ValueError, match=message):
            write_digit_folder(tmp_path / f"c{count}", resolution=16, count=count)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["twenty"]
