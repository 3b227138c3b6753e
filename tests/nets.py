"""Small networks for the tests (no diffusers needed)."""

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
