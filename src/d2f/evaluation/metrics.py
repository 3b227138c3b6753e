"""FID, KID, precision and recall (k-NN) in the classifier's feature space, and class accuracy of samples."""

from __future__ import annotations

import numpy as np
import torch

from .classifier import LeNet, to_input


@torch.no_grad()
def features(classifier: LeNet, images: torch.Tensor, resolution: int | None = None, batch: int = 500) -> torch.Tensor:
    return torch.cat(
        [classifier.features(to_input(images[i : i + batch], resolution)) for i in range(0, len(images), batch)]
    )


def _sqrt_psd(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def fid(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance of Gaussians fitted to two feature sets, in float64.

    ``tr(sqrt(S_a S_b))`` is computed as ``tr(sqrt(S_a^(1/2) S_b S_a^(1/2)))``, which is symmetric PSD, so
    an eigendecomposition suffices and no scipy is needed.
    """
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    x, y = a.double().numpy(), b.double().numpy()
    mu_x, mu_y = x.mean(0), y.mean(0)
    cov_x, cov_y = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root_x = _sqrt_psd(cov_x)
    cross = np.trace(_sqrt_psd(root_x @ cov_y @ root_x))
    return float(((mu_x - mu_y) ** 2).sum() + np.trace(cov_x) + np.trace(cov_y) - 2 * cross)


def kid(
    a: torch.Tensor, b: torch.Tensor, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Kernel inception distance (Bińkowski et al., 2018) in float64: with the cubic polynomial kernel
    ``k(x, y) = (x·y / d + 1)^3`` on ``d``-dimensional features, the unbiased estimate of the squared MMD on
    ``m = min(subset_size, |a|, |b|)`` samples drawn without replacement from each set,

        MMD² = Σ_{i≠j} k(a_i, a_j) / (m(m-1)) + Σ_{i≠j} k(b_i, b_j) / (m(m-1)) - 2 Σ_{i,j} k(a_i, b_j) / m²,

    repeated over ``subsets`` draws from ``Generator().manual_seed(seed)``. Returns the mean over the subsets and
    their (population) standard deviation, the error bar torch-fidelity reports. Unlike FID it has no bias that
    grows as the sets shrink, so rows scored on a few thousand samples can be told apart. Non-finite features are
    refused: a NaN score would hide which images broke."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"KID compares feature sets of one width: got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] < 2 or b.shape[0] < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {a.shape[0]} and {b.shape[0]}")
    for name, value in (("subsets", subsets), ("subset_size", subset_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "subsets" else 2):
            raise ValueError(f"{name}={value!r} is not allowed: an integer >= {1 if name == 'subsets' else 2}")
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
        raise ValueError("KID of non-finite features: some images gave NaN or inf features")
    m = min(subset_size, a.shape[0], b.shape[0])
    x, y, d = a.double(), b.double(), a.shape[1]
    generator = torch.Generator().manual_seed(seed)
    estimates = []
    for _ in range(subsets):
        p = x[torch.randperm(len(x), generator=generator)[:m]]
        q = y[torch.randperm(len(y), generator=generator)[:m]]
        kpp, kqq, kpq = ((u @ v.T / d + 1) ** 3 for u, v in ((p, p), (q, q), (p, q)))
        within = (kpp.sum() - kpp.diagonal().sum() + kqq.sum() - kqq.diagonal().sum()) / (m * (m - 1))
        estimates.append(within - 2 * kpq.mean())
    values = torch.stack(estimates)
    return float(values.mean()), float(values.std(correction=0))


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Kynkäänniemi et al. (2019): the share of fake samples inside the real set's k-NN balls, and back."""

    def radii(x: torch.Tensor) -> torch.Tensor:
        d = torch.cdist(x, x)
        return d.kthvalue(k + 1, dim=1).values  # k-th neighbour, skipping the point itself

    def coverage(points: torch.Tensor, support: torch.Tensor) -> float:
        return float((torch.cdist(points, support) <= radii(support)[None, :]).any(1).float().mean())

    real, fake = real.double(), fake.double()
    return coverage(fake, real), coverage(real, fake)


@torch.no_grad()
def class_accuracy(classifier: LeNet, images: torch.Tensor, labels: torch.Tensor, resolution=None) -> float:
    pred = torch.cat(
        [classifier(to_input(images[i : i + 500], resolution)).argmax(1) for i in range(0, len(images), 500)]
    )
    return float((pred == labels.to(pred.device)).float().mean())


def score(classifier: LeNet, real_features: torch.Tensor, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """The experiments' cell: FID and KID (its mean and standard deviation over subsets) against ``real_features``,
    and the classifier's accuracy on ``labels``."""
    fake = features(classifier, images)
    kid_mean, kid_std = kid(real_features, fake)
    return {
        "fid": fid(real_features, fake),
        "kid": kid_mean,
        "kid_std": kid_std,
        "class_accuracy": class_accuracy(classifier, images, labels),
    }
