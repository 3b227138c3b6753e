"""A micro-batch's random draws (noise, t, dropout coin): d2f's counter-based Philox draws, computed in one
batched call on the device, against the per-sample scheme d2f used before (one CPU ``torch.Generator`` seeded
per sample, written here as the baseline), which then copies the noise to the device."""

import pytest
import torch

from common import DEVICE, needs_cuda, sync
from d2f.schedule import Schedule
from d2f.time_samplers import logit_normal_t
from d2f.training.config import TrainConfig
from d2f.training.draws import draws, seed_of

SHAPES = [(32, (1, 24, 24)), (32, (4, 96, 96))]
ids = [f"{n}x{'x'.join(map(str, s))}" for n, s in SHAPES]
CONFIG = TrainConfig.teacher_task(objective="d2f", seed=0)
SCHEDULE = Schedule.linear(1000, 1e-4, 0.02)


def per_sample_generators(where: torch.Tensor, shape: tuple[int, ...]):
    """The earlier scheme: a generator per sample, on the CPU, then one copy to the device."""
    noise, times, drop = [], [], []
    for p in where.tolist():
        g = torch.Generator().manual_seed(seed_of(CONFIG.seed, "sample", p))
        noise.append(torch.randn(shape, generator=g))
        drop.append(bool(torch.rand((), generator=g) < CONFIG.cond_dropout))
        times.append(logit_normal_t(torch.randn(1, generator=g, dtype=torch.float64), "v_prediction"))
    return torch.stack(noise).to(DEVICE), torch.cat(times).to(DEVICE), torch.tensor(drop).to(DEVICE)


SCHEMES = ["per-sample generators", "philox torch", pytest.param("philox triton", marks=needs_cuda)]


@pytest.mark.parametrize(("batch", "shape"), SHAPES, ids=ids)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_draws(benchmark, scheme, batch, shape):
    where = torch.arange(1000, 1000 + batch)
    benchmark.group = f"draws of one micro-batch, {batch} x {shape}"

    def once():
        if scheme == "per-sample generators":
            per_sample_generators(where, shape)
        else:
            draws(CONFIG, where, shape, "v_prediction", SCHEDULE, DEVICE, backend=scheme.split()[1])
        sync()

    benchmark.pedantic(once, rounds=30, warmup_rounds=3)
