"""The evaluation classifier: a LeNet-5-sized MNIST network whose 84-d penultimate layer is the feature
space of d2f's FID, precision and recall.

Its weights ship in ``d2f/assets/mnist_classifier.safetensors``; ``d2f classifier`` retrains them with a
fixed seed. Every image is first brought to the 28x28 input through the resolution it was generated at
(down to ``resolution``, then up to 28x28), for real and generated sets alike, so FIDs compare like with
like at each resolution. Training sees the same path at random resolutions from 12 to 28.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .._files import write_json, write_safetensors

ASSET = Path(__file__).resolve().parent.parent / "assets" / "mnist_classifier.safetensors"
HELD_OUT = 500  # the last 50 digits of each class are never trained on
TRAIN_RESOLUTIONS = (12, 16, 20, 24, 28)


class LeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(self.features(x))


def to_input(images: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """``(N, 1, H, W)`` in [-1, 1] -> the classifier's 28x28 input, through ``resolution`` (default: H)."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"the MNIST classifier takes (N, 1, H, W) images, got shape {tuple(images.shape)}")
    x = images.float().clamp(-1, 1)
    if resolution is not None and x.shape[-1] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    if x.shape[-1] != 28:
        x = F.interpolate(x, size=(28, 28), mode="bilinear", antialias=x.shape[-1] > 28, align_corners=False)
    return x


def split(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks (train, held out): the last 50 of each class are held out."""
    held = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(10):
        held[torch.nonzero(labels == c)[-HELD_OUT // 10 :, 0]] = True
    return ~held, held


def train_classifier(seed: int = 0, epochs: int = 30, out: Path = ASSET) -> dict:
    """Train with a fixed seed, save safetensors and a JSON report beside it; returns the report."""
    from ..data.images import mnist

    data = mnist(28)
    train_mask, held_mask = split(data.images, data.labels)
    images, labels = data.images[train_mask], data.labels[train_mask]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = LeNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(images.shape[0], generator=g)
        for i in range(0, order.numel(), 64):
            batch = order[i : i + 64]
            res = TRAIN_RESOLUTIONS[int(torch.randint(len(TRAIN_RESOLUTIONS), (1,), generator=g))]
            loss = F.cross_entropy(model(to_input(images[batch], res)), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    report = {"seed": seed, "epochs": epochs, "seconds": round(time.perf_counter() - started, 1)}
    with torch.no_grad():
        for res in TRAIN_RESOLUTIONS:
            pred = model(to_input(data.images[held_mask], res)).argmax(1)
            report[f"held_out_accuracy_{res}px"] = round(float((pred == data.labels[held_mask]).float().mean()), 4)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(out, model.state_dict())
    write_json(out.with_suffix(".json"), report)
    return report


def load_classifier(path: Path = ASSET) -> LeNet:
    from safetensors.torch import load_file

    model = LeNet()
    model.load_state_dict(load_file(str(path)))
    return model.eval().requires_grad_(False)
