"""The prompt-following metric on images whose answers are known: real digits under their own measured
attributes, the same digits under prompts for other digits or other attributes, and noise."""

import pytest
import torch

from d2f.data.digit_captions import NAMES, SLANT, THICKNESS, captioned_digits
from d2f.evaluation.classifier import load_classifier, split
from d2f.evaluation.prompts import Prompt, evaluation_prompts, prompt_following, real_features


@pytest.fixture(scope="module")
def held_out():
    """The classifier's 500 held-out digits at 28 px with prompts that name their digit and measured attributes."""
    digits = captioned_digits(28)
    _, held = split(digits.images, digits.labels)
    index = torch.nonzero(held)[:, 0].tolist()
    prompts = [
        Prompt(
            f"a {digits.thickness[i]} {NAMES[digits.labels[i]]}",
            int(digits.labels[i]),
            digits.thickness[i],
            digits.slant[i],
        )
        for i in index
    ]
    return digits.images[index], prompts


def test_evaluation_prompts_cover_every_digit_and_attribute_combination():
    prompts = evaluation_prompts()
    assert len(prompts) == 120 and len({p.text for p in prompts}) == 120
    for digit in range(10):
        asked = {(p.thickness, p.slant) for p in prompts if p.digit == digit}
        assert asked == {(t, s) for t in (None, *THICKNESS) for s in (None, *SLANT)}
    assert Prompt("a thick seven leaning left", 7, "thick", "leaning left") in prompts


def test_real_digits_under_their_own_prompts_score_high_and_under_others_low(held_out):
    images, prompts = held_out
    classifier = load_classifier()
    reference = real_features(classifier, 28)
    own = prompt_following(images, prompts, classifier, reference)
    assert own["digit_accuracy"] > 0.95 and own["thickness_accuracy"] == own["slant_accuracy"] == 1.0
    assert own["n"] == own["thickness_n"] == own["slant_n"] == 500
    # the same images asked for the next digit and the other attribute bins: every score falls
    wrong = [
        Prompt(
            p.text,
            (p.digit + 1) % 10,
            THICKNESS[1 - THICKNESS.index(p.thickness)],
            SLANT[(SLANT.index(p.slant) + 1) % 3],
        )
        for p in prompts
    ]
    other = prompt_following(images, wrong, classifier, reference)
    assert other["digit_accuracy"] < 0.05 and other["thickness_accuracy"] == other["slant_accuracy"] == 0.0
    assert other["fid"] == own["fid"]  # FID does not read the prompts
    noise = prompt_following(torch.rand_like(images) * 2 - 1, prompts, classifier, reference)
    assert noise["fid"] > 10 * own["fid"] and noise["digit_accuracy"] < 0.3


def test_rgb_images_score_as_their_grey_and_attributes_not_asked_are_not_counted(held_out):
    images, prompts = held_out
    bare = [Prompt(p.text, p.digit) for p in prompts[:40]]
    grey = prompt_following(images[:40], bare)
    rgb = prompt_following(images[:40].repeat(1, 3, 1, 1), bare)
    rounded = {k: pytest.approx(rgb[k], rel=1e-6) for k in ("fid", "kid", "kid_std")}  # the channels' mean rounds
    assert grey == {**rgb, **rounded}
    assert grey["thickness_n"] == 0 and grey["thickness_accuracy"] is None


def test_a_count_or_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="3 images for 2 prompts"):
        prompt_following(torch.zeros(3, 1, 28, 28), [Prompt("a one", 1)] * 2)
    with pytest.raises(ValueError, match=r"shape \(2, 2, 28, 28\)"):
        prompt_following(torch.zeros(2, 2, 28, 28), [Prompt("a one", 1)] * 2)
