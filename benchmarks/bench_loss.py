"""fm_loss forward + backward (v-prediction, mean): four implementations.

- ``reference``: the naive eager port of the reference implementation's formulas (reference_port.py);
- ``torch``: d2f's torch path (gradient computed in the forward sweep);
- ``compile``: torch.compile of the same math written as plain differentiable ops;
- ``triton``: d2f's fused kernel (CUDA only), its checks read at the call (a host synchronisation between the
  forward and the backward);
- ``torch deferred`` and ``triton deferred``: the same inside ``d2f.deferred_checks()``, the checks read with
  the loss after the backward, as d2f's trainer reads them: the call itself never waits for the device.

GB/s counts the minimal traffic: model output, data and noise read once, the gradient written once.
"""

import pytest
import torch

import d2f
from common import DEVICE, DTYPES, SHAPES, dtype_ids, needs_cuda, run, shape_ids
from d2f.parametrization import residual_coefficients_checked
from reference_port import ReferencePort

SCHEDULE = d2f.Schedule.scaled_linear()


def inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    data, noise, out = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(3))
    t = (torch.rand(shape[0], generator=g) * 0.9 + 0.07).to(DEVICE)  # inside [t_min, tau_0]
    return out.requires_grad_(True), data, noise, t


@torch.compile(dynamic=False)
def compiled_loss(o, data, noise, p, q, b):
    view = (-1,) + (1,) * (o.ndim - 1)
    r = b.view(view) * o.float() + p.view(view) * data.float() + q.view(view) * noise.float()
    return (r * r).mean()


def make_step(impl, o, data, noise, t):
    if impl == "reference":
        port = ReferencePort(SCHEDULE.alphas_cumprod)
        port_t = t.to(torch.float32)
        port.to(DEVICE)
        return lambda: port.v_loss(o, data, noise, port_t).backward()
    if impl == "compile":
        p, q, b = (c.float() for c in residual_coefficients_checked(t.double(), "v_prediction"))
        return lambda: compiled_loss(o, data, noise, p, q, b).backward()
    backend, _, deferred = impl.partition(" ")
    if not deferred:
        return lambda: d2f.fm_loss(o, data, noise, t, "v_prediction", backend=backend).backward()

    def step():
        with d2f.deferred_checks() as checks:
            loss = d2f.fm_loss(o, data, noise, t, "v_prediction", backend=backend)
            loss.backward()
            checks.read(loss)

    return step


IMPLS = [
    "reference",
    "torch",
    "torch deferred",
    "compile",
    pytest.param("triton", marks=needs_cuda),
    pytest.param("triton deferred", marks=needs_cuda),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
def test_fm_loss_fwd_bwd(benchmark, impl, dtype, shape):
    o, data, noise, t = inputs(shape, dtype)
    step = make_step(impl, o, data, noise, t)
    benchmark.group = f"fm_loss fwd+bwd {shape_ids[SHAPES.index(shape)]} {dtype_ids[DTYPES.index(dtype)]}"

    def once():
        o.grad = None
        step()

    run(benchmark, once, 4 * o.numel() * o.element_size())


@pytest.mark.parametrize("impl", ["reference", "compile"])
def test_baselines_compute_the_same_loss(impl):
    """A baseline is only a baseline if it computes the same number."""
    o, data, noise, t = inputs((4, 4, 16, 16), torch.float32)
    expected = d2f.fm_loss(o, data, noise, t, "v_prediction", backend="torch")
    if impl == "reference":
        got = ReferencePort(SCHEDULE.alphas_cumprod).to(DEVICE).v_loss(o, data, noise, t)
    else:
        p, q, b = (c.float() for c in residual_coefficients_checked(t.double(), "v_prediction"))
        got = compiled_loss(o, data, noise, p, q, b)
    torch.testing.assert_close(got, expected)
