"""One classifier-free-guided Euler step of the sampler (v-prediction), after the network call.

Reads the float32 state and the unconditional and conditional outputs; writes the next state (float32)
and the next network input (in the outputs' dtype): guidance, conversion, update and rescale.

- ``reference``: the naive eager port (time looked up in the table, implied data and noise predictions);
- ``torch``: ``d2f.solvers.ode_step`` on its torch path;
- ``compile``: torch.compile of the same math as plain ops;
- ``triton``: the fused kernel (CUDA only).
"""

import pytest
import torch

import d2f
from common import DEVICE, DTYPES, SHAPES, dtype_ids, needs_cuda, run, shape_ids
from d2f.solvers import EULER, ode_step
from reference_port import ReferencePort

SCHEDULE = d2f.Schedule.scaled_linear()
T0, T1, G = 0.4, 0.45, 7.5


def coefficients():
    a, b = d2f.velocity_coefficients(T0, "v_prediction")
    return float(a), float(b), T1 - T0, G, float(d2f.scale(T1))


@torch.compile(dynamic=False)
def compiled_step(x, o_u, o_c, a: float, b: float, h: float, g: float, s_next: float):
    o = o_u.float() + g * (o_c.float() - o_u.float())
    x_new = x + h * (a * x + b * o)
    return x_new, (s_next * x_new).to(o_u.dtype)


def make_step(impl, x, o_u, o_c):
    a, b, h, g, s_next = coefficients()
    if impl == "reference":
        port = ReferencePort(SCHEDULE.alphas_cumprod).to(DEVICE)
        t = torch.full((x.shape[0],), T0, device=DEVICE)
        t_next = torch.full((x.shape[0],), T1, device=DEVICE)
        return lambda: port.cfg_euler_step(x, o_u, o_c, t, t_next, g)
    if impl == "compile":
        return lambda: compiled_step(x, o_u, o_c, a, b, h, g, s_next)
    return lambda: ode_step(EULER, x, o_u, o_c, None, a, b, h, g, s_next, o_u.dtype, backend=impl)


IMPLS = ["reference", "torch", "compile", pytest.param("triton", marks=needs_cuda)]


def inputs(shape, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(DEVICE)
    o_u, o_c = (torch.randn(shape, generator=g).to(DEVICE, dtype) for _ in range(2))
    return x, o_u, o_c


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_ids)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_ids)
def test_cfg_euler_step(benchmark, impl, dtype, shape):
    x, o_u, o_c = inputs(shape, dtype)
    benchmark.group = f"cfg euler step {shape_ids[SHAPES.index(shape)]} {dtype_ids[DTYPES.index(dtype)]}"
    elements = x.numel()
    run(benchmark, make_step(impl, x, o_u, o_c), elements * (4 + 4 + 3 * o_u.element_size()))


@pytest.mark.parametrize("impl", ["reference", "compile"])
def test_baselines_compute_the_same_step(impl):
    x, o_u, o_c = inputs((2, 4, 16, 16), torch.float32)
    expected = make_step("torch", x, o_u, o_c)()
    for got, want in zip(make_step(impl, x, o_u, o_c)(), expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
