"""FID, precision and recall (k-NN) in the classifier's feature space, and class accuracy of samples."""

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
    """The experiments' cell: FID against ``real_features`` and the classifier's accuracy on ``labels``."""
    return {
        "fid": fid(real_features, features(classifier, images)),
        "class_accuracy": class_accuracy(classifier, images, labels),
    }
