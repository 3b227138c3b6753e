"""What the network is conditioned on: class labels (with a null class) or text embeddings, and concat
channels; how conditioning dropout replaces them in training, and which conditions a sample grid uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .data import Dataset
from .models import Network


@dataclass
class Conditioning:
    """What the network is conditioned on, and how conditioning dropout replaces it."""

    null_class: int | None  # class labels are fed when this is set
    text: bool  # encoder_hidden_states are fed

    @staticmethod
    def plan(config: TrainConfig, network: Network, data: Dataset) -> Conditioning:
        unet = network.unet
        num_classes = getattr(unet.config, "num_class_embeds", None)
        null_class = None
        if num_classes:
            if network.null_class is None:
                raise ValueError(
                    f"{network.source} takes class labels but names no null class; d2f trains class-conditional "
                    "UNets that reserve their last label as the null class (as the embedded teacher does)"
                )
            null_class = network.null_class
            if data.labels is not None and int(data.labels.max()) >= null_class:
                raise ValueError(
                    f"data={config.data!r} has labels up to {int(data.labels.max())}; the model takes labels "
                    f"< {null_class} (label {null_class} is its null class)"
                )
        text = type(unet).__name__ == "UNet2DConditionModel"
        if text and data.encoder_hidden_states is None:
            raise ValueError(f"{network.source} is a UNet2DConditionModel: the data must carry encoder_hidden_states")
        if text and config.cond_dropout > 0 and data.null_encoder_hidden_states is None:
            raise ValueError("cond_dropout > 0 needs null_encoder_hidden_states in the latents file")
        return Conditioning(null_class, text)

    def kwargs(self, data: Dataset, indices: torch.Tensor, drop: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The network's conditioning kwargs for the samples ``indices``, dropped to null where ``drop``."""
        cond: dict[str, torch.Tensor] = {}
        if self.null_class is not None:
            if data.labels is None:
                labels = torch.full(indices.shape, self.null_class)  # unlabeled data: unconditional finetuning
            else:
                labels = torch.where(drop, self.null_class, data.labels[indices])
            cond["class_labels"] = labels.to(device)
        if self.text:
            states = data.encoder_hidden_states[indices].clone()
            if bool(drop.any()):
                states[drop] = data.null_encoder_hidden_states.to(states.dtype)
            cond["encoder_hidden_states"] = states.to(device)
        return cond


@dataclass
class SampleRequest:
    """What to sample: ``n`` draws at ``size``, with conditions taken from the data (classes in turn, the
    first text embeddings and concat channels)."""

    n: int
    size: tuple[int, int]
    cond: dict[str, torch.Tensor]
    concat: torch.Tensor | None

    @staticmethod
    def make(conditioning: Conditioning, data: Dataset, n: int, size: tuple[int, int], device) -> SampleRequest:
        pick = torch.arange(n) % len(data)
        cond: dict[str, torch.Tensor] = {}
        if conditioning.null_class is not None:
            classes = data.labels.unique() if data.labels is not None else torch.tensor([conditioning.null_class])
            cond["class_labels"] = classes[torch.arange(n) % classes.numel()].to(device)
        if conditioning.text:
            cond["encoder_hidden_states"] = data.encoder_hidden_states[pick].to(device)
        concat = data.concat[pick].to(device) if data.concat is not None else None
        if concat is not None:
            size = tuple(concat.shape[-2:])
        return SampleRequest(n, size, cond, concat)

    def noise(self, channels: int, seed: int, device) -> torch.Tensor:
        """The request's starting noise: one draw of ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.n, channels, *self.size, generator=g).to(device)
