"""Where every random number of a training run comes from: the data order and each sample's draws.

Both are functions of the run's seed and a position in the global data stream alone, so that every rank,
step and micro-batch finds its samples and draws from the step number: a data-parallel run draws exactly
what one process with the whole batch would, and resuming needs no sampler or generator state.

Each sample's draws (noise, the uniform and normal that make its time, the dropout coin) come from the
counter-based generator Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011):
a 10-round bijection of a 128-bit counter under a 64-bit key. The key is the run's seed; the counter is
(position, stream, index), so any sample's draws are computed where they are needed, all samples of a
micro-batch in one batched tensor computation on the training device, with no generator state and no
per-sample loop. The integers and the uniforms made from them are exact on every device and at any batch
split. The normals and times go through vectorised float math (``log``, ``cos``, ``sigmoid``), which may round
an element in the last bit differently on another device or in another batch layout: a resumed run, which
repeats the layout, is bitwise equal; a data-parallel run equals one process to float rounding.
(Runs of d2f before this generator drew on the CPU from one ``torch.Generator`` per sample; results
committed from then say so.)
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import torch
from torch import Tensor

from .._backend import kernels, use_triton
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


# The draw scheme's name, recorded in checkpoints and results: a run is never resumed under another scheme.
DRAWS = "philox4x32-10 (seed, position)"
PREVIOUS_DRAWS = "cpu torch.Generator per sample (seed, position)"  # d2f before the counter-based draws
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # Philox4x32's multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # its key increments (the golden ratio and sqrt(3) - 1, in 32 bits)
_MASK = 0xFFFFFFFF
NOISE, UNIFORMS, NORMALS = 0, 1, 2  # the counter's stream word: one stream per kind of draw


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """The high and low 32 bits of ``a * b`` for 32-bit ``a`` and ``b`` (int64 tensors holding uint32). The
    product needs 64 unsigned bits: int64 multiplication keeps the low 64 bits of it (two's complement wraps
    on every device torch runs on; Random123's known answers with all-ones inputs test it), and the masks read
    the two halves from that bit pattern."""
    product = a * b
    return (product >> 32) & _MASK, product & _MASK


def philox(key: int, counter: tuple[Tensor, Tensor, Tensor, Tensor]) -> tuple[Tensor, ...]:
    """Philox4x32-10 of the four 32-bit counter words (int64 tensors of one shape) under the 64-bit ``key``:
    four tensors of uint32 values, each a function of its own counter alone."""
    c0, c1, c2, c3 = counter
    k0, k1 = key & _MASK, (key >> 32) & _MASK
    for _ in range(10):
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0, k1 = (k0 + _W0) & _MASK, (k1 + _W1) & _MASK
    return c0, c1, c2, c3


def _bits(key: int, where: Tensor, stream: int, n: int) -> Tensor:
    """``(len(where), n)`` uint32 values (in int64) for the samples at stream positions ``where``."""
    blocks = -(-n // 4)  # one counter gives four values
    index = torch.arange(blocks, device=where.device)
    position = where.to(torch.int64)[:, None].expand(-1, blocks)
    counter = (position & _MASK, position >> 32, torch.full_like(position, stream), index.expand_as(position))
    return torch.stack(philox(key, counter), -1).reshape(len(where), -1)[:, :n]


def uniforms(key: int, where: Tensor, stream: int, n: int, backend: str = "auto") -> Tensor:
    """float32 ``U(0, 1)`` draws ``(len(where), n)``, never 0 or 1: the top 24 bits of each value, centred in its
    bin. ``backend`` as ``d2f.fm_loss`` takes it: ``auto`` runs the one-launch Triton kernel on CUDA."""
    if use_triton(backend, where):
        return kernels().uniforms(key, where, stream, n)
    return _uniforms_torch(key, where, stream, n)


def _uniforms_torch(key: int, where: Tensor, stream: int, n: int) -> Tensor:
    return ((_bits(key, where, stream, n) >> 8).float() + 0.5) * 2.0**-24


def normals(key: int, where: Tensor, stream: int, n: int, backend: str = "auto") -> Tensor:
    """float32 ``N(0, 1)`` draws ``(len(where), n)`` by Box-Muller, a pair of normals from each pair of
    uniforms (``cos`` and ``sin`` of the same angle)."""
    if use_triton(backend, where):
        return kernels().normals(key, where, stream, n)
    u = _uniforms_torch(key, where, stream, 2 * -(-n // 2)).reshape(len(where), -1, 2)
    radius, angle = torch.sqrt(-2 * torch.log(u[..., 0])), 2 * torch.pi * u[..., 1]
    return torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1).reshape(len(where), -1)[:, :n]


def draws(
    config: TrainConfig,
    where: torch.Tensor,
    shape: tuple[int, ...],
    prediction_type: str,
    schedule: Schedule,
    device: torch.device | str = "cpu",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Noise, time (t, or the integer timestep k for diffusion) and the dropout coin of the samples at stream
    positions ``where``, on ``device``: Philox draws keyed by the run's seed at counters ``(position, ...)``."""
    key = seed_of(config.seed, "sample")
    where = where.to(device)
    noise = normals(key, where, NOISE, math.prod(shape), backend).reshape(len(where), *shape)
    coin, u = uniforms(key, where, UNIFORMS, 2, backend).unbind(1)
    z = normals(key, where, NORMALS, 1, backend)[:, 0]
    times = draw_time(config.objective, config.t_sampler_for(prediction_type), u, z, prediction_type, schedule)
    return noise, times, coin < config.cond_dropout
