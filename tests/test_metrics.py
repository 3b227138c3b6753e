"""d2f.evaluation.metrics on sets small enough to score by hand (the committed classifier's scores are in
test_evaluation.py)."""

import math
import re

import pytest
import torch
import torch.nn.functional as F

from d2f.evaluation.metrics import class_accuracy, features, fid, kid, precision_recall, score


def points(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def corners(sx: float, sy: float) -> torch.Tensor:
    return torch.tensor([[sx, sy], [sx, -sy], [-sx, sy], [-sx, -sy]], dtype=torch.float64)


def test_fid_of_sets_with_hand_computed_moments():
    """Four corners (±1, ±2) have mean 0 and covariance diag(4/3, 16/3) (divided by n - 1). Shifted by (3, 4) and
    doubled, FID = 25 + sum (s_a - s_b)^2 = 25 + 4/3 + 16/3. Rotated by 45 degrees instead, the covariances do not
    commute: with M = S_a^(1/2) S_b S_a^(1/2) = [[40/9, -16/3], [-16/3, 160/9]], tr sqrt(M) = sqrt(tr M + 2 sqrt(det M))
    = sqrt(328)/3, so FID = 40/3 - 2 sqrt(328)/3."""
    a = corners(1, 2)
    assert fid(a, 2 * a + torch.tensor([3.0, 4.0], dtype=torch.float64)) == pytest.approx(25 + 20 / 3, rel=1e-12)
    c = math.sqrt(0.5)
    rotated = a @ torch.tensor([[c, c], [-c, c]], dtype=torch.float64)
    assert fid(a, rotated) == pytest.approx((40 - 2 * math.sqrt(328)) / 3, rel=1e-9)
    assert fid(a[:2], a[2:]) == pytest.approx(4.0, abs=1e-9)  # two samples each suffice: means 2 apart, same cov
    for one, other in ((a[:1], a), (a, a[:1])):
        n, m = len(one), len(other)
        with pytest.raises(ValueError, match=f"FID needs at least 2 samples per set, got {n} and {m}$"):
            fid(one, other)


def test_precision_and_recall_count_the_ball_boundary_as_inside():
    """k = 1: real {0, 1, 2, 3} has radii 1. Fake 0.5 lies inside, fake 4 exactly on real 3's ball, 5 and 10
    outside: precision 2/4. Fake radii are 3.5, 1, 1, 5 (0.5's nearest is 4), and fake 0.5's ball holds every real
    point: recall 1. The default k is the paper's 3."""
    real, fake = points(0, 1, 2, 3), points(0.5, 4, 5, 10)
    assert precision_recall(real, fake, k=1) == (0.5, 1.0)
    assert precision_recall(fake, real, k=1) == (1.0, 0.5)
    wide = points(0, 1, 2, 3, 4, 5, 6, 7)
    assert precision_recall(wide, fake) == precision_recall(wide, fake, k=3) != precision_recall(wide, fake, k=2)


class Pixels(torch.nn.Module):
    """A stand-in for the LeNet that is scored by hand: its features are two pixels of its 28x28 input, and its
    class is the first pixel's value v in [-1, 1] read as round(4.5 * (v + 1))."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, 0, 0, :2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.one_hot((4.5 * (x[:, 0, 0, 0] + 1)).round().long(), 10).float()


def test_class_accuracy_features_and_score_cover_every_batch():
    """1001 flat 16x16 images (three batches of 500 at most), image i of class i % 10 with the value that class
    reads as; the last 101 labels are wrong, so the accuracy is 900/1001."""
    classes = torch.arange(1001) % 10
    values = classes.double() / 4.5 - 1
    images = values[:, None, None, None].expand(-1, 1, 16, 16).float()
    labels = torch.where(torch.arange(1001) < 900, classes, (classes + 1) % 10)
    classifier = Pixels()
    assert class_accuracy(classifier, images, labels) == pytest.approx(900 / 1001)
    expected = values[:, None].expand(-1, 2).float()
    torch.testing.assert_close(features(classifier, images, batch=300), expected)
    real = corners(1, 2).float()
    kid_mean, kid_std = kid(real, expected)
    assert score(classifier, real, images, labels) == {
        "fid": pytest.approx(fid(real, expected), rel=1e-6),
        "kid": pytest.approx(kid_mean, rel=1e-6),
        "kid_std": pytest.approx(kid_std, rel=1e-6),
        "class_accuracy": pytest.approx(900 / 1001),
    }


def test_kid_of_sets_with_a_hand_computed_kernel():
    """1-D features (d = 1), k(x, y) = (xy + 1)^3: within {0, 1}, k(0, 1) = 1; within {2, 3}, k(2, 3) = 343; across,
    k = 1, 1, 27, 64 (mean 23.25). Unbiased MMD² = 1 + 343 - 2 * 23.25 = 297.5, whichever order a subset takes."""
    value, spread = kid(points(0, 1), points(2, 3), subsets=5)
    assert value == pytest.approx(297.5) and spread == pytest.approx(0.0, abs=1e-9)
    assert kid(points(2, 3), points(0, 1), subsets=1) == (pytest.approx(297.5), 0.0)  # symmetric


def test_kid_is_unbiased_near_zero_for_one_distribution_and_grows_with_a_shift():
    """Two draws of one Gaussian: the unbiased estimate averages to about 0 (it may go below), unlike FID's positive
    bias; a shifted draw scores far above the spread, and the subsets see a spread."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(400, 4, generator=g), torch.randn(400, 4, generator=g)
    same, same_spread = kid(a, b, subsets=20, subset_size=100)
    shifted, _ = kid(a, b + 1.0, subsets=20, subset_size=100)
    assert abs(same) < 3 * same_spread and same_spread > 0
    assert shifted > 20 * same_spread


def test_kid_in_two_dimensions_on_sets_of_unequal_size():
    """d = 2, k(x, y) = (x·y / 2 + 1)^3; a = {(1, 1), (2, 0)}, b = three copies of (0, 1), so m = 2 and every subset
    of b is the same pair. Within a, k = (2 / 2 + 1)^3 = 8; within b, (1 / 2 + 1)^3 = 3.375; across, 3.375 and 1
    (mean 2.1875). MMD² = 8 + 3.375 - 2 * 2.1875 = 7, in either order (the smaller set may be either)."""
    a = torch.tensor([[1.0, 1.0], [2.0, 0.0]], dtype=torch.float64)
    b = torch.tensor([[0.0, 1.0]] * 3, dtype=torch.float64)
    assert kid(a, b, subsets=3) == (pytest.approx(7.0), pytest.approx(0.0, abs=1e-12))
    assert kid(b, a, subsets=3) == (pytest.approx(7.0), pytest.approx(0.0, abs=1e-12))


def test_kid_draws_its_subsets_from_its_own_seed_and_defaults_to_torch_fidelitys_protocol():
    """The subsets come from ``seed`` alone, whatever the global generator's state; the defaults are torch-fidelity's
    (100 subsets of at most 1000, seed 0), which only sets of more than 1000 samples tell apart."""
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(60, 3, generator=g), torch.randn(60, 3, generator=g) + 0.5
    torch.manual_seed(0)
    first = kid(a, b, subsets=4, subset_size=10, seed=7)
    torch.manual_seed(1)
    assert kid(a, b, subsets=4, subset_size=10, seed=7) == first
    assert kid(a, b, subsets=4, subset_size=10, seed=8) != first
    big_a, big_b = torch.randn(1002, 2, generator=g), torch.randn(1002, 2, generator=g)
    protocol = kid(big_a, big_b, subsets=100, subset_size=1000, seed=0)
    assert kid(big_a, big_b) == protocol
    assert protocol not in (
        kid(big_a, big_b, subsets=101),
        kid(big_a, big_b, subset_size=1001),
        kid(big_a, big_b, seed=1),
    )


def test_kid_refuses_what_it_cannot_score_by_name():
    a = torch.zeros(4, 2, dtype=torch.float64)
    cases = [
        ((torch.zeros(1, 4), torch.zeros(3, 4)), {}, "KID needs at least 2 samples per set, got 1 and 3"),
        ((torch.zeros(3, 4), torch.zeros(1, 4)), {}, "KID needs at least 2 samples per set, got 3 and 1"),
        ((torch.zeros(4), torch.zeros(4, 4)), {}, "KID compares feature sets of one width: got shapes (4,) and (4, 4)"),
        ((torch.zeros(4, 4), torch.zeros(4)), {}, "KID compares feature sets of one width: got shapes (4, 4) and (4,)"),
        ((a, a[:, :1]), {}, "KID compares feature sets of one width: got shapes (4, 2) and (4, 1)"),
        ((a, a), {"subsets": 0}, "subsets=0 is not allowed: an integer >= 1"),
        ((a, a), {"subsets": True}, "subsets=True is not allowed: an integer >= 1"),
        ((a, a), {"subsets": 2.0}, "subsets=2.0 is not allowed: an integer >= 1"),
        ((a, a), {"subset_size": 1}, "subset_size=1 is not allowed: an integer >= 2"),
        ((a, a), {"subset_size": True}, "subset_size=True is not allowed: an integer >= 2"),
        (
            (a, torch.cat([a[:-1], torch.full((1, 2), float("nan"), dtype=torch.float64)])),
            {},
            "KID of non-finite features: some images gave NaN or inf features",
        ),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            kid(*args, **kwargs)
    assert kid(a, a, subsets=1, subset_size=2) == (0.0, 0.0)  # the smallest subsets allowed
