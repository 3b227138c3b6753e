"""Widening a pretrained UNet's first convolution to take condition channels (image-to-X finetuning).

Marigold's recipe for depth (Ke et al., CVPR 2024): the condition image is concatenated to the noisy target
along the channels, and ``conv_in`` grows to take both. d2f appends the condition after the target
(``D2FVelocity(concat=...)``), so the widened kernel is ``W' = [W_target, W_cond]`` over ``[z, c]``. Two
initialisations, each keeping the pretrained model's output at the start where it can:

- ``marigold``: both halves are the pretrained kernel, halved: ``W' [z, c] = W (z + c) / 2``, which is
  ``W z`` when ``c = z``, so the first layer sees the scale it was trained on. It needs as many condition
  channels as target channels.
- ``zero``: ``W' = [W, 0]``: ``W' [z, c] = W z`` for every ``c``; the condition is ignored until training
  moves the new weights (the bias is unchanged either way).

diffusers' InstructPix2Pix training script widens ``conv_in`` the second way; ``register_to_config`` records
the new ``in_channels``, so a full export loads with ``from_pretrained`` as it is.
"""

from __future__ import annotations

import torch

from .._checks import check_choice, check_positive_int

COND_INITS = ("marigold", "zero")


def widen_conv_in(unet: torch.nn.Module, cond_channels: int, init: str) -> None:
    """Give ``unet.conv_in`` ``cond_channels`` more input channels, initialised by ``init`` (``COND_INITS``),
    and record the new ``in_channels`` in the UNet's config."""
    check_positive_int("cond_channels", cond_channels)
    check_choice("cond_init", init, COND_INITS)
    old = unet.conv_in
    if init == "marigold" and cond_channels != old.in_channels:
        raise ValueError(
            f"cond_init='marigold' copies the pretrained kernel for the condition, so the condition needs the "
            f"target's {old.in_channels} channel(s), not {cond_channels}; use cond_init='zero'"
        )
    new = torch.nn.Conv2d(
        old.in_channels + cond_channels,
        old.out_channels,
        old.kernel_size,
        old.stride,
        old.padding,
        old.dilation,
        old.groups,
        old.bias is not None,
        old.padding_mode,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with torch.no_grad():
        if init == "marigold":
            new.weight.copy_(torch.cat([old.weight, old.weight], dim=1) / 2)
        else:
            new.weight.zero_()
            new.weight[:, : old.in_channels].copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=new.in_channels)
