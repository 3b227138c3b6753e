"""Small networks for the tests: an arbitrary convnet (no diffusers needed) and tiny real diffusers UNets."""

import torch


class TinyNet(torch.nn.Module):
    """A small, arbitrary time-conditioned convnet; it records what it was called with."""

    def __init__(self, in_channels=3, out_channels=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv_in = torch.nn.Conv2d(in_channels, 8, 3, padding=1)
        self.time = torch.nn.Linear(2, 8)
        self.conv_out = torch.nn.Conv2d(8, out_channels, 3, padding=1)
        self.calls = []

    def forward(self, z, k, label=None):
        self.calls.append((z.detach().clone(), k.detach().clone(), label))
        kk = k.to(z.dtype)[:, None] / 1000
        h = self.conv_in(z) + self.time(torch.cat([torch.sin(6 * kk), torch.cos(6 * kk)], 1))[:, :, None, None]
        if label is not None:
            h = h + label.to(z.dtype)[:, None, None, None]
        return self.conv_out(torch.tanh(h))


def tiny_unet(in_channels=1, out_channels=1):
    """A real diffusers UNet2DModel, small enough for CPU tests (8x8, two levels of 8 and 16 channels)."""
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=out_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


def tiny_cond_unet(channels=4, cross_attention_dim=12, **config):
    """A real diffusers UNet2DConditionModel (text cross-attention), small enough for CPU tests; ``config`` adds
    keys (SDXL's added conditioning)."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=8,
        in_channels=channels,
        out_channels=channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=4,
        attention_head_dim=2,
        **config,
    )


def teacher_flags() -> list[str]:
    """``d2f train``'s flags for the pixel teacher's task (``TrainConfig.teacher_task``), its default before the
    Stable Diffusion workflow."""
    from d2f.training.config import TEACHER_TASK

    return [f"--{name.replace('_', '-')}={value}" for name, value in TEACHER_TASK.items()]
