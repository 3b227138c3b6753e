"""The Triton kernels against plain torch references, run by Triton's interpreter on the CPU.

conftest.py sets TRITON_INTERPRET=1 before anything imports d2f.kernels. On a CUDA host run with
TRITON_INTERPRET=0 (benchmarks/gpu.sh) every test here compiles the kernels for real on the GPU; the checks
that only make sense there (bf16, large shapes) are marked ``gpu`` and skip without CUDA.
"""

import math
import os
import re

import pytest
import torch

triton = pytest.importorskip("triton")

import d2f  # noqa: E402
from d2f import PREDICTION_TYPES, D2FVelocity, ddim_grid, fm_loss, network_input, uniform_grid  # noqa: E402
from d2f._backend import use_triton  # noqa: E402
from d2f.solvers import CORRECT, EULER, MULTISTEP, PREDICT, SOLVERS, ode_step  # noqa: E402
from nets import TinyNet  # noqa: E402
from test_loss import reference_loss  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Rank 2 to 5, batch 1, sizes that are no multiple of the block (64 when interpreting, 2048 on GPU).
SHAPES = [(1, 5), (3, 130), (2, 3, 67), (4, 2, 9, 11), (2, 3, 2, 5, 7)]
FP16_SUBNORMAL_SPACING = 2.0**-24
LOSS_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make(shape, dtype, seed, device=DEVICE, non_contiguous=False):
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(3):
        v = torch.randn(shape[::-1] if non_contiguous else shape, generator=g)
        v = v.permute(*reversed(range(v.ndim))) if non_contiguous else v
        tensors.append(v.to(device=device, dtype=dtype))
    t = torch.rand(shape[0], generator=g).to(device) * 0.9 + 0.05
    w = torch.rand(shape[0], generator=g).to(device) * 2
    return (*tensors, t, w)


def check_loss(shape, dtype, prediction_type, reduction, weighted, non_contiguous=False, device=DEVICE):
    o, data, noise, t, w = make(shape, dtype, seed=len(shape), device=device, non_contiguous=non_contiguous)
    w = w if weighted else None
    o = o.requires_grad_(True)
    loss = fm_loss(o, data, noise, t, prediction_type, weight=w, reduction=reduction, backend="triton")
    o_ref = o.detach().double().requires_grad_(True)
    ref = reference_loss(o_ref, data, noise, t, prediction_type, w, reduction)
    rtol, atol = LOSS_TOL[dtype]
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=rtol, atol=atol)
    upstream = torch.rand(ref.shape, dtype=torch.float64, device=device) + 0.5
    (loss * upstream.float()).sum().backward()
    (ref * upstream).sum().backward()
    assert o.grad.dtype == dtype and o.grad.shape == o.shape
    # A mean over millions of elements puts fp16 gradients among fp16's subnormals, whose spacing is 2^-24,
    # so no fp16 result can be closer than that; the H100 measured one such spacing apart (the torch path too
    # can only round to it). Mixed-precision training scales the loss (GradScaler) for this reason.
    atol_grad = max(atol * float(o_ref.grad.abs().max()), 2 * FP16_SUBNORMAL_SPACING if dtype == torch.float16 else 0)
    torch.testing.assert_close(o.grad.double(), o_ref.grad, rtol=rtol, atol=atol_grad)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_loss_kernel_matches_float64_reference(prediction_type, reduction, weighted, dtype):
    for shape in SHAPES:
        check_loss(shape, dtype, prediction_type, reduction, weighted)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_kernel_non_contiguous_inputs(prediction_type):
    check_loss((3, 4, 5, 6), torch.float32, prediction_type, "mean", True, non_contiguous=True)


def test_loss_kernel_plain_backward_returns_the_fused_gradient():
    o, data, noise, t, _ = make((2, 3, 40), torch.float32, seed=1)
    o1, o2 = o.clone().requires_grad_(True), o.clone().requires_grad_(True)
    fm_loss(o1, data, noise, t, "v_prediction", backend="triton").backward()
    fm_loss(o2, data, noise, t, "v_prediction", backend="torch").backward()
    torch.testing.assert_close(o1.grad, o2.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_loss_kernel_second_derivatives_match_the_float64_reference(prediction_type, reduction, weighted):
    """Under create_graph=True the kernel's gradient was a constant, so its derivative was silently zero.
    Here a Hessian-vector product, and the derivative through a differentiable upstream gradient."""
    o, data, noise, t, w = make((2, 3, 70), torch.float32, seed=5)
    w = w if weighted else None
    v = torch.randn(o.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE)

    def second_derivatives(loss_fn, o):
        o = o.clone().requires_grad_(True)
        loss = loss_fn(o)
        upstream = (torch.rand(loss.shape, generator=torch.Generator().manual_seed(7)) + 0.5).to(loss)
        upstream.requires_grad_(True)
        (grad,) = torch.autograd.grad(loss, o, grad_outputs=upstream, create_graph=True)
        return grad.detach(), *torch.autograd.grad((grad * v.to(grad)).sum(), (o, upstream))

    got = second_derivatives(
        lambda o: fm_loss(o, data, noise, t, prediction_type, weight=w, reduction=reduction, backend="triton"), o
    )
    ref = second_derivatives(lambda o: reference_loss(o, data, noise, t, prediction_type, w, reduction), o.double())
    for value, expected, what in zip(got, ref, ("gradient", "Hessian-vector product", "upstream derivative")):
        assert bool(expected.abs().max() > 0), what
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("name", ["model_output", "data", "noise"])
@pytest.mark.parametrize("bad", [math.nan, -math.inf])
def test_loss_kernel_flags_non_finite_inputs_by_name(name, bad):
    o, data, noise, t, _ = make((2, 3, 70), torch.float32, seed=2)
    tensors = {"model_output": o, "data": data, "noise": noise}
    tensors[name][1, 2, 66] = bad
    with pytest.raises(ValueError, match=f"fm_loss: {name} contains NaN or inf"):
        fm_loss(*tensors.values(), t, "v_prediction", backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on 1/0 before we raise
def test_loss_kernel_flags_bad_t_and_weight_with_the_torch_messages():
    o, data, noise, t, w = make((2, 10), torch.float32, seed=3)
    with pytest.raises(ValueError, match="gives no velocity at t=0.0"):
        fm_loss(o, data, noise, torch.tensor([0.5, 0.0], device=DEVICE), "epsilon", backend="triton")
    with pytest.raises(ValueError, match="gives no velocity at t=1.0"):
        fm_loss(o, data, noise, 1.0, "sample", backend="triton")
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]; got 1.5"):
        fm_loss(o, data, noise, torch.tensor([0.5, 1.5], device=DEVICE), "velocity", backend="triton")
    with pytest.raises(ValueError, match="weight must be finite and >= 0"):
        fm_loss(o, data, noise, t, "velocity", weight=torch.tensor([1.0, -2.0], device=DEVICE), backend="triton")
    with pytest.raises(ValueError, match="noise requires grad"):
        fm_loss(o, data, noise.requires_grad_(True), t, "velocity", backend="triton")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_loss_kernel_reports_overflow():
    big = torch.full((2, 8), 3e19, device=DEVICE)
    with pytest.raises(ValueError, match="overflowed"):
        fm_loss(big, -big, big, 0.5, "velocity", backend="triton")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_network_input_kernel_matches_torch(dtype, out_dtype):
    for shape in SHAPES:
        _, data, noise, t, _ = make(shape, dtype, seed=4)
        got = network_input(data, noise, t, dtype=out_dtype, backend="triton")
        ref = d2f.align(d2f.interpolate(data.double(), noise.double(), t.double()), t.double())
        assert got.dtype == out_dtype
        tol = 1e-6 if out_dtype == torch.float32 else 1e-3
        torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(got, network_input(data, noise, t, dtype=out_dtype, backend="torch"))


@pytest.mark.parametrize("mode", [EULER, PREDICT, CORRECT])
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("c", [1.0, 0.5], ids=["heun", "midpoint"])
def test_ode_step_kernel_matches_the_torch_step(mode, guided, out_dtype, c):
    g = torch.Generator().manual_seed(mode)
    x, u1 = (torch.randn(3, 4, 9, 7, generator=g).to(DEVICE) for _ in range(2))
    o_u = torch.randn(3, 4, 9, 7, generator=g).to(DEVICE, out_dtype)
    o_c = torch.randn(3, 4, 9, 7, generator=g).to(DEVICE, out_dtype) if guided else None
    args = (mode, x, o_u, o_c, u1 if mode == CORRECT else None, 1.3, -0.7, 0.05, 4.5, 1.2, out_dtype)
    first_k, z_k = ode_step(*args, backend="triton", c=c)
    first_t, z_t = ode_step(*args, backend="torch", c=c)
    assert first_k.dtype == torch.float32 and z_k.dtype == out_dtype
    torch.testing.assert_close(first_k, first_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_k, z_t, rtol=1e-3 if out_dtype == torch.float16 else 1e-5, atol=1e-5)


@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("history", [False, True], ids=["first-step", "with-history"])
def test_multistep_kernel_matches_the_torch_step(guided, out_dtype, history):
    g = torch.Generator().manual_seed(7)
    x, u_prev = (torch.randn(3, 4, 9, 7, generator=g).to(DEVICE) for _ in range(2))
    o_u = torch.randn(3, 4, 9, 7, generator=g).to(DEVICE, out_dtype)
    o_c = torch.randn(3, 4, 9, 7, generator=g).to(DEVICE, out_dtype) if guided else None
    k = 0.75 if history else 0.0
    args = (MULTISTEP, x, o_u, o_c, u_prev if history else None, 1.3, -0.7, 0.05, 4.5, 1.2, out_dtype)
    kernel, torch_step = ode_step(*args, backend="triton", k=k), ode_step(*args, backend="torch", k=k)
    assert [v.dtype for v in kernel] == [torch.float32, out_dtype, torch.float32]
    o = o_u.float() if o_c is None else o_u.float() + 4.5 * (o_c.float() - o_u.float())
    u = 1.3 * x - 0.7 * o
    x_next = x + 0.05 * ((1 + k) * u - (k * u_prev if history else 0))
    for got, ref in zip(kernel, torch_step):
        torch.testing.assert_close(got, ref, rtol=1e-3 if got.dtype == torch.float16 else 1e-5, atol=1e-5)
    torch.testing.assert_close(kernel[0], x_next, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kernel[2], u, rtol=1e-5, atol=1e-5)


# DDIM's step rules as ddim_grid takes them: (n, spacing, steps_offset, set_alpha_to_one).
DDIM_RULES = {"leading": (6, "leading", 1, False), "trailing3": (3, "trailing", 0, True)}  # trailing3: steps with gaps


def guided_sampling_inputs():
    schedule = d2f.Schedule.scaled_linear(prediction_type="v_prediction")
    net = TinyNet().to(DEVICE)
    label = torch.tensor([1.0, -1.0], device=DEVICE)
    uncond = {"label": torch.zeros(1, device=DEVICE)}
    velocity = D2FVelocity(net, schedule, "v_prediction", guidance_scale=3.0, uncond=uncond)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    return velocity, noise, label


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("grid", ["leading", "trailing3", "uniform"])
def test_fused_sampler_equals_the_torch_sampler(solver, grid):
    velocity, noise, label = guided_sampling_inputs()
    schedule = velocity.schedule
    ts = uniform_grid(5, schedule.t_min, 1.0) if grid == "uniform" else ddim_grid(schedule, *DDIM_RULES[grid])
    if solver == "multistep" and ts.ndim == 2:
        with pytest.raises(ValueError, match="solver='multistep' needs steps that chain"):
            velocity.sample(noise, ts, solver=solver, label=label)
        return
    fused = velocity.sample(noise, ts, solver=solver, backend="triton", label=label)
    plain = velocity.sample(noise, ts, solver=solver, backend="torch", label=label)
    generic = velocity.sample(noise, ts, solver=solver, callback=lambda *a: None, label=label)
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, generic, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", DDIM_RULES)
def test_fused_euler_on_the_ddim_grid_is_diffusers_ddim(grid):
    """The fused Euler step with guidance, on DDIM's grid, against diffusers' own DDIMScheduler loop with
    classifier-free guidance on the network's output."""
    from diffusers import DDIMScheduler

    velocity, noise, label = guided_sampling_inputs()
    n, spacing, offset, to_one = DDIM_RULES[grid]
    config = {**velocity.schedule.diffusers_config(), "prediction_type": "v_prediction", "clip_sample": False}
    ddim = DDIMScheduler.from_config(
        {**config, "timestep_spacing": spacing, "steps_offset": offset, "set_alpha_to_one": to_one}
    )
    ddim.set_timesteps(n)
    z = noise.clone()
    with torch.no_grad():
        for k in ddim.timesteps:
            k_in = torch.full((2,), float(k), device=DEVICE)
            o_u, o_c = velocity.net(z, k_in, label=torch.zeros(1, device=DEVICE)), velocity.net(z, k_in, label=label)
            z = ddim.step(o_u + 3.0 * (o_c - o_u), k, z).prev_sample
    ts = ddim_grid(velocity.schedule, *DDIM_RULES[grid])
    fused = velocity.sample(noise, ts, solver="euler", backend="triton", label=label)
    torch.testing.assert_close(d2f.scale(float(ts.reshape(-1)[-1])) * fused, z, rtol=1e-4, atol=1e-4)


def test_dispatch(monkeypatch):
    cpu = torch.zeros(2)
    assert not use_triton("auto", cpu)  # auto uses Triton on CUDA only
    assert not use_triton("torch", cpu)
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert use_triton("triton", cpu)
    # Without the interpreter (the variable is read at each call) a CPU tensor cannot run a kernel.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match=r"^backend='triton' needs CUDA tensors; got a tensor on cpu \(set TRITON_"):
        use_triton("triton", cpu)
    message = "^backend='triton' does not run float64 inputs; use backend='torch' or 'auto'$"
    with pytest.raises(ValueError, match=message):
        use_triton("triton", cpu.double())
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        use_triton("cuda", cpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_loss_kernel_on_gpu(dtype, prediction_type):
    for shape in [*SHAPES, (64, 4, 96, 96)]:
        for reduction in ("mean", "none"):
            check_loss(shape, dtype, prediction_type, reduction, True, device="cuda")
    assert use_triton("auto", torch.zeros(1, device="cuda"))


@pytest.mark.gpu
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ode_step_kernel_on_gpu(out_dtype):
    for mode in (EULER, PREDICT, CORRECT, MULTISTEP):
        x, u1 = torch.randn(2, 4, 96, 96, device="cuda"), torch.randn(2, 4, 96, 96, device="cuda")
        o_u, o_c = (torch.randn(2, 4, 96, 96, device="cuda").to(out_dtype) for _ in range(2))
        args = (mode, x, o_u, o_c, u1, 1.3, -0.7, 0.05, 4.5, 1.2, out_dtype)
        for got, ref in zip(ode_step(*args, backend="triton", k=0.5), ode_step(*args, backend="torch", k=0.5)):
            # The same bf16 inputs on both sides: the fp32 results differ by fp32 rounding only (as on the CPU);
            # a bf16 result by one bf16 rounding of that (2^-8 relative).
            tol = 1e-5 if got.dtype == torch.float32 else 1e-2
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol)


def test_ode_step_kernel_reads_a_non_contiguous_u1():
    """The scheduler's stored first-stage velocity can be channels_last (a channels_last UNet and latents)."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE)
    o = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE)
    u1 = torch.randn(2, 4, 6, 5, generator=g).to(DEVICE).to(memory_format=torch.channels_last)
    assert not u1.is_contiguous()
    args = (CORRECT, x, o, None, u1, 1.3, -0.7, 0.05, 1.0, 1.2, torch.float32)
    for got, ref in zip(ode_step(*args, backend="triton", c=0.5), ode_step(*args, backend="torch", c=0.5)):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_a_step_that_needs_a_gradient_runs_on_torch_or_is_refused():
    x = torch.randn(2, 8, device=DEVICE)
    o = torch.randn(2, 8, device=DEVICE, requires_grad=True)
    args = (EULER, x, o, None, None, 1.3, -0.7, 0.05, 1.0, 1.2, torch.float32)
    first, _ = ode_step(*args, backend="auto")
    first.sum().backward()
    torch.testing.assert_close(o.grad, torch.full_like(o, 0.05 * -0.7))
    message = (
        "backend='triton' does not differentiate the ODE step, and an input requires grad; use backend='auto' or "
        "'torch', or sample under torch.no_grad()"
    )
    with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
        ode_step(*args, backend="triton")
    with torch.no_grad():
        ode_step(*args, backend="triton")
