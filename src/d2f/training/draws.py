"""Where every random number of a training run comes from: the data order and each sample's draws.

Both are functions of the run's seed and a position in the global data stream alone, so that every rank,
step and micro-batch finds its samples and draws from the step number: a data-parallel run draws exactly
what one process with the whole batch would, and resuming needs no sampler or generator state.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

from ..schedule import Schedule
from .config import TrainConfig
from .objectives import draw_time


def seed_of(*parts: Any) -> int:
    """A seed from ints and strings that is the same in every process (Python's str hash is not)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**62 - 1)


class Stream:
    """The data order: epoch ``e`` is ``randperm(N)`` seeded by ``(seed, e)``; position ``p`` of the global
    stream is sample ``perm_{p // N}[p % N]``."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self._perms: dict[int, torch.Tensor] = {}

    def indices(self, positions: torch.Tensor) -> torch.Tensor:
        epochs, offsets = positions // self.size, positions % self.size
        out = torch.empty_like(positions)
        for epoch in epochs.unique().tolist():
            if epoch not in self._perms:
                g = torch.Generator().manual_seed(seed_of(self.seed, "epoch", epoch))
                self._perms = {epoch: torch.randperm(self.size, generator=g)}  # keep one epoch in memory
            mask = epochs == epoch
            out[mask] = self._perms[epoch][offsets[mask]]
        return out


def positions(config: TrainConfig, step: int, micro: int, rank: int, world: int) -> torch.Tensor:
    """The stream positions of one micro-batch: ``batch_size`` samples of this rank at this step."""
    first = ((step * config.grad_accum + micro) * world + rank) * config.batch_size
    return torch.arange(first, first + config.batch_size)


def draws(
    config: TrainConfig, where: torch.Tensor, shape: tuple[int, ...], prediction_type: str, schedule: Schedule
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, time (t, or the integer timestep k for diffusion) and the dropout coin of the samples at stream
    positions ``where``, each from its own generator seeded by ``(seed, position)``."""
    noise, times, drop = [], [], []
    for p in where.tolist():
        g = torch.Generator().manual_seed(seed_of(config.seed, "sample", p))
        noise.append(torch.randn(shape, generator=g))
        drop.append(bool(torch.rand((), generator=g) < config.cond_dropout))
        times.append(draw_time(config.objective, config.resolved_t_sampler, g, prediction_type, schedule))
    return torch.stack(noise), torch.cat(times), torch.tensor(drop)
