"""d2f.evaluation.metrics on sets small enough to score by hand (the committed classifier's scores are in
test_evaluation.py)."""

import math

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
    with pytest.raises(ValueError, match="at least 2 samples"):
        kid(points(1.0), points(1.0, 2.0))
    with pytest.raises(ValueError, match="subset_size=1 is not allowed"):
        kid(a, b, subset_size=1)
    with pytest.raises(ValueError, match="one width"):
        kid(a, b[:, :3])
    with pytest.raises(ValueError, match="non-finite"):
        kid(a, torch.cat([b[:-1], torch.full((1, 4), float("nan"))]))
