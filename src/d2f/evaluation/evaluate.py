"""``d2f eval``: sample an export and score it against real MNIST digits at the same resolution."""

from __future__ import annotations

import time

import torch

from ..data.images import mnist
from ..networks.sampling import SamplingSettings, sample_export
from .classifier import ASSET, load_classifier
from .metrics import class_accuracy, features, fid, kid, precision_recall


def evaluate(model: str, settings: SamplingSettings, num_samples: int = 1000, k: int = 3) -> dict:
    """FID against all 5000 real digits, precision/recall (k-NN) against ``num_samples`` of them, and
    the classifier's accuracy on the requested classes. Every real and generated image goes through the
    export's resolution on its way to the classifier's 28x28 input."""
    if isinstance(num_samples, int) and not isinstance(num_samples, bool) and num_samples <= k:
        raise ValueError(
            f"num_samples={num_samples} is too few: precision/recall measure each sample's distance to its k={k}th "
            f"nearest neighbour, so d2f eval needs at least {k + 1} samples"
        )
    started = time.perf_counter()
    images, labels, _, meta, settings = sample_export(model, settings, num_samples)
    if images.shape[1] != 1:
        raise ValueError(f"d2f eval scores 1-channel MNIST models; {model} generates {images.shape[1]} channels")
    resolution = meta["resolution"]
    classifier = load_classifier()
    real = mnist(resolution).images
    fake_features, real_features = features(classifier, images), features(classifier, real)
    pick = torch.randperm(len(real), generator=torch.Generator().manual_seed(settings.seed))[:num_samples]
    precision, recall = precision_recall(real_features[pick], fake_features, k)
    return {
        "model": str(model),
        **settings.to_dict(),
        "num_samples": num_samples,
        "resolution": resolution,
        "fid": fid(real_features, fake_features),
        **dict(zip(("kid", "kid_std"), kid(real_features, fake_features, seed=settings.seed))),
        "precision": precision,
        "recall": recall,
        "class_accuracy": None if labels is None else class_accuracy(classifier, images, labels),
        "reference": (
            f"the 5000 MNIST digits shipped with d2f at {resolution}px; precision/recall against {num_samples} of them"
        ),
        "classifier": ASSET.name,
        "seconds": round(time.perf_counter() - started, 1),
    }
