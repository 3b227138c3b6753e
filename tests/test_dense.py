"""Affine-invariant depth metrics against values computed by hand, and the depth task's ground truth."""

import math

import pytest
import torch

from d2f.evaluation.dense import align_scale_shift, depth_metrics, ensemble


def test_alignment_and_metrics_by_hand():
    """One image, g = [1, 2, 3, 4], p = [1, 2, 3, 5]: the normal equations give s = 26/35, b = 16/35, so
    p' = [42, 68, 94, 146] / 35; a second image, an affine copy of its truth, scores perfectly; a pixel with
    g = 0 is not valid and is ignored."""
    gt = torch.tensor([[1.0, 2, 3, 4, 0], [2.0, 4, 6, 8, 0]])
    pred = torch.tensor([[1.0, 2, 3, 5, 99], [-1.0, -3, -5, -7, 99]])  # image 2: p = -(g - 1), so s = -1, b = 1
    aligned = align_scale_shift(pred, gt, gt > 0)
    torch.testing.assert_close(aligned[0, :4], torch.tensor([42.0, 68, 94, 146], dtype=torch.float64) / 35)
    torch.testing.assert_close(aligned[1, :4], gt[1, :4].double())
    errors = [0.2, 2 / 35, 11 / 35, 6 / 35]  # |p' - g| of image 1
    abs_rel = sum(e / g for e, g in zip(errors, [1, 2, 3, 4])) / 4
    rmse = math.sqrt(sum(e * e for e in errors) / 4)
    metrics = depth_metrics(pred, gt)
    assert metrics["abs_rel"] == pytest.approx(abs_rel / 2)  # the mean over images; image 2 scores 0
    assert metrics["rmse"] == pytest.approx(rmse / 2)
    assert metrics["delta1"] == 1.0  # image 1's worst ratio is 1.2 < 1.25


def test_delta1_counts_the_pixels_off_by_a_quarter_or_more():
    """p = g except one pixel twice its truth: alignment cannot remove it entirely, and delta1 counts it."""
    gt = torch.tensor([[1.0, 1, 1, 1, 1, 1, 1, 10]])
    pred = gt.clone()
    pred[0, 0] = 3.0
    aligned = align_scale_shift(pred, gt)
    ratio = torch.maximum(aligned / gt, gt / aligned)
    assert depth_metrics(pred, gt)["delta1"] == pytest.approx(float((ratio < 1.25).double().mean()))
    assert depth_metrics(pred, gt)["delta1"] < 1


def test_ensemble_is_the_median_after_aligning_members_to_each_other():
    g = torch.Generator().manual_seed(0)
    truth = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) + 0.5
    noise = [torch.zeros_like(truth), 0.05 * torch.randn(truth.shape, generator=g, dtype=torch.float64), 0 * truth]
    samples = torch.stack([2 * truth + 1 + noise[0], 0.5 * truth - 3 + noise[1], -truth + noise[2]])
    merged = ensemble(samples)
    assert depth_metrics(merged, truth)["abs_rel"] < 1e-12  # two of three members agree after alignment
    assert depth_metrics(samples[1], truth)["abs_rel"] > 1e-3  # the noisy member alone does not


def test_bad_predictions_are_refused():
    gt = torch.tensor([[1.0, 2, 3]])
    with pytest.raises(ValueError, match="pred holds NaN or inf"):
        depth_metrics(torch.tensor([[1.0, math.nan, 2]]), gt)
    with pytest.raises(ValueError, match="image 0: its prediction is constant"):
        depth_metrics(torch.tensor([[2.0, 2, 2]]), gt)
    with pytest.raises(ValueError, match=r"pred has shape \(1, 2\) and gt \(1, 3\)"):
        depth_metrics(torch.tensor([[2.0, 1]]), gt)


def test_the_depth_tasks_ground_truth_is_one_plus_the_distance_to_the_stroke():
    from d2f.evaluation.depth import distance_depth

    image = -torch.ones(1, 1, 5, 5)
    image[0, 0, 1, 1] = 1.0
    image[0, 0, 3, 4] = 0.5
    depth = distance_depth(image)[0, 0]
    assert depth[1, 1] == depth[3, 4] == 1
    assert depth[0, 0] == pytest.approx(1 + math.sqrt(2))
    assert depth[4, 0] == pytest.approx(1 + math.sqrt(9 + 1))  # to (1, 1): 3 down, 1 across
    assert depth[4, 4] == 2  # to (3, 4)
    with pytest.raises(ValueError, match="every image needs a pixel above 0"):
        distance_depth(-torch.ones(1, 1, 3, 3))
