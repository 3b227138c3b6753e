"""What the network is conditioned on: class labels (with a null class) or text embeddings, and concat
channels; how conditioning dropout replaces them in training, and which conditions a sample grid uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data.images import Dataset
from ..networks.models import Network
from .config import TrainConfig


@dataclass
class Conditioning:
    """What the network is conditioned on, and how conditioning dropout replaces it."""

    null_class: int | None  # class labels are fed when this is set
    text: bool  # encoder_hidden_states are fed
    added: bool = False  # SDXL: added_cond_kwargs (pooled text_embeds and time_ids) are fed too

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
        if text:
            _check_text_width(config, network, data)
        if text and config.cond_dropout > 0 and data.null_encoder_hidden_states is None:
            where = (
                f"pairs={config.pairs!r} hold no empty-prompt embedding (they follow the guided map, which the student "
                "learns without dropout): pass cond_dropout=0"
                if config.pairs is not None
                else "in the latents file"
            )
            raise ValueError(f"cond_dropout={config.cond_dropout} needs null_encoder_hidden_states; {where}")
        added = text and unet.config.addition_embed_type == "text_time"
        if added and (data.text_embeds is None or data.time_ids is None):
            raise ValueError(
                f"{network.source} is an SDXL-type UNet (addition_embed_type='text_time'): the data must carry "
                "text_embeds and time_ids (d2f encode writes them from an SDXL pipeline)"
            )
        if added and config.cond_dropout > 0 and data.null_text_embeds is None:
            raise ValueError("cond_dropout > 0 needs null_text_embeds in the latents file (SDXL)")
        if not added and data.text_embeds is not None:
            raise ValueError(
                f"data={config.data!r} holds SDXL's text_embeds, but {network.source} takes no added conditioning "
                "(an SD 1.x/2.x UNet): encode the data with this model's own pipeline"
            )
        if added:
            _check_pooled_width(config, network, data)
        return Conditioning(null_class, text, added)

    def kwargs(self, data: Dataset, indices: torch.Tensor, drop: torch.Tensor, device) -> dict[str, torch.Tensor]:
        """The network's conditioning kwargs for the samples ``indices``, dropped to null where ``drop``, built on
        ``device`` with ``torch.where`` (no host synchronisation on the coins)."""
        cond: dict[str, torch.Tensor] = {}
        drop = drop.to(device)
        if self.null_class is not None:
            if data.labels is None:  # unlabeled data: unconditional finetuning
                cond["class_labels"] = torch.full(indices.shape, self.null_class, device=device)
            else:
                cond["class_labels"] = torch.where(drop, self.null_class, data.labels[indices].to(device))
        if self.text:
            states = data.encoder_hidden_states[indices].to(device)
            if data.null_encoder_hidden_states is not None:
                null = data.null_encoder_hidden_states.to(device, states.dtype)
                states = torch.where(drop[:, None, None], null, states)
            cond["encoder_hidden_states"] = states
        if self.added:  # dropout replaces the pooled embedding too; the time ids describe the image and stay
            pooled = data.text_embeds[indices].to(device)
            if data.null_text_embeds is not None:
                pooled = torch.where(drop[:, None], data.null_text_embeds.to(device, pooled.dtype), pooled)
            cond["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": data.time_ids[indices].to(device)}
        return cond


def _check_text_width(config: TrainConfig, network: Network, data: Dataset) -> None:
    """Refuse text embeddings the UNet's cross-attention cannot take (a matmul error at the first step
    otherwise): ``(samples, tokens, width)``, the width the UNet's ``encoder_hid_dim`` (where it projects the
    text first) or ``cross_attention_dim`` names."""
    states, unet_config = data.encoder_hidden_states, network.unet.config
    if states.ndim != 3:
        raise ValueError(
            f"data={config.data!r} holds encoder_hidden_states of shape {tuple(states.shape)}; text embeddings "
            "are (samples, tokens, width)"
        )
    key = "encoder_hid_dim" if getattr(unet_config, "encoder_hid_dim", None) is not None else "cross_attention_dim"
    widths = getattr(unet_config, key)
    widths = set(widths) if isinstance(widths, (list, tuple)) else {widths}  # one per block in some UNets
    if widths != {states.shape[-1]}:
        raise ValueError(
            f"data={config.data!r} holds encoder_hidden_states {states.shape[-1]} wide; {network.source} takes "
            f"{key}={getattr(unet_config, key)}: encode the data with this model's own text encoder(s)"
        )


def _check_pooled_width(config: TrainConfig, network: Network, data: Dataset) -> None:
    """Refuse SDXL pooled text embeddings of another width than the UNet's added embedding takes beside the
    six time ids."""
    unet_config = network.unet.config
    width = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    if data.text_embeds.ndim != 2 or data.text_embeds.shape[-1] != width:
        raise ValueError(
            f"data={config.data!r} holds text_embeds {data.text_embeds.shape[-1]} wide (shape "
            f"{tuple(data.text_embeds.shape)}); {network.source} takes {width} (projection_class_embeddings_input_dim="
            f"{unet_config.projection_class_embeddings_input_dim} less six time ids of addition_time_embed_dim="
            f"{unet_config.addition_time_embed_dim})"
        )


@dataclass
class SampleRequest:
    """What to sample: ``n`` draws at ``size``, with conditions taken from the data (classes in turn, the
    first text embeddings and concat channels)."""

    n: int
    size: tuple[int, int]
    cond: dict[str, torch.Tensor]
    concat: torch.Tensor | None
    uncond: dict  # the null condition for classifier-free guidance ({} when the data has none)

    @staticmethod
    def make(conditioning: Conditioning, data: Dataset, n: int, size: tuple[int, int], device) -> SampleRequest:
        pick = torch.arange(n) % len(data)
        cond: dict = {}
        uncond: dict = {}
        if conditioning.null_class is not None:
            classes = data.labels.unique() if data.labels is not None else torch.tensor([conditioning.null_class])
            cond["class_labels"] = classes[torch.arange(n) % classes.numel()].to(device)
            uncond["class_labels"] = torch.tensor([conditioning.null_class], device=device)
        if conditioning.text:
            cond["encoder_hidden_states"] = data.encoder_hidden_states[pick].to(device)
            if data.null_encoder_hidden_states is not None:
                uncond["encoder_hidden_states"] = data.null_encoder_hidden_states[None].to(device)
        if conditioning.added:
            added = {"text_embeds": data.text_embeds[pick], "time_ids": data.time_ids[pick]}
            cond["added_cond_kwargs"] = {k: v.to(device) for k, v in added.items()}
            if data.null_text_embeds is not None:  # as SDXL's pipeline guides: the same time ids in both halves
                null = data.null_text_embeds[None].expand(n, -1)
                uncond["added_cond_kwargs"] = {
                    "text_embeds": null.to(device),
                    "time_ids": cond["added_cond_kwargs"]["time_ids"],
                }
        if set(uncond) != set(cond):  # a null for every condition, or no guidance
            uncond = {}
        concat = data.concat[pick].to(device) if data.concat is not None else None
        if concat is not None:
            size = tuple(concat.shape[-2:])
        return SampleRequest(n, size, cond, concat, uncond)

    def noise(self, channels: int, seed: int, device) -> torch.Tensor:
        """The request's starting noise: one draw of ``torch.Generator().manual_seed(seed)``."""
        g = torch.Generator().manual_seed(seed)
        return torch.randn(self.n, channels, *self.size, generator=g).to(device)
