"""fm_loss forward + backward: d2f's torch path against the naive reference port.

GB/s counts the minimal traffic: model output, data and noise read once, the gradient written once.
"""

import pytest
import torch

import d2f
from reference_port import ReferencePort

SCHEDULE = d2f.Schedule.scaled_linear()
SHAPES = [(16, 4, 32, 32), (64, 4, 96, 96)]


def _inputs(shape):
    g = torch.Generator().manual_seed(0)
    data, noise, out = (torch.randn(shape, generator=g) for _ in range(3))
    t = torch.rand(shape[0], generator=g) * 0.9 + 0.07  # inside [t_min, tau_0], where the port is defined
    return out.requires_grad_(True), data, noise, t


def _run(benchmark, shape, step):
    out, data, noise, t = _inputs(shape)

    def once():
        out.grad = None
        step(out, data, noise, t).backward()

    benchmark(once)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(4 * out.numel() * out.element_size() / seconds / 1e9, 2)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_port(benchmark, shape):
    port = ReferencePort(SCHEDULE.alphas_cumprod)
    _run(benchmark, shape, port.v_loss)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_d2f_torch(benchmark, shape):
    _run(benchmark, shape, lambda o, d, n, t: d2f.fm_loss(o, d, n, t, "v_prediction", backend="torch"))


def test_the_port_computes_the_same_loss():
    """The baseline is only a baseline if it computes the same number."""
    out, data, noise, t = _inputs(SHAPES[0])
    port = ReferencePort(SCHEDULE.alphas_cumprod)
    torch.testing.assert_close(port.v_loss(out, data, noise, t), d2f.fm_loss(out, data, noise, t, "v_prediction"))
