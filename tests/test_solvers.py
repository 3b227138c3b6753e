import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from d2f import (
    D2FVelocity,
    NonFiniteError,
    Schedule,
    alpha_sigma,
    diffusion_to_velocity,
    sample,
    scale,
    target_velocity,
    uniform_grid,
)
from d2f.grids import grid_steps
from d2f.parametrization import SINGULAR_TIMES
from d2f.solvers import EULER, MULTISTEP, SOLVERS, ddim_step, ode_step, stage_times
from nets import TinyNet
from strategies import tensor
from test_parametrization import gaussian_oracle

MU, S = 0.5, 2.0


def oracle_field(prediction_type):
    """The exact FM velocity of N(MU, S^2) data, obtained through a diffusion oracle of each type."""

    def field(x, t):
        return diffusion_to_velocity(gaussian_oracle(prediction_type, x, t, MU, S), x, t, prediction_type)

    field.singular_times = SINGULAR_TIMES[prediction_type]
    return field


def exact_flow(x0, t):
    """The Gaussian flow: x_t = sqrt(t^2 S^2 + (1-t)^2) * x0 + t * MU; at t = 1 it is S*x0 + MU."""
    return math.sqrt(t * t * S * S + (1 - t) ** 2) * x0 + t * MU


ORDERS = [("euler", 1), ("heun", 2), ("midpoint", 2), ("multistep", 2)]


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("solver, order", ORDERS)
def test_gaussian_endpoint_converges_at_the_solver_order(prediction_type, solver, order):
    x0 = tensor((64,), seed=1)
    t0 = 0.05  # epsilon cannot start at t = 0
    errors = []
    for n in (8, 16, 32, 64):
        x = sample(oracle_field(prediction_type), exact_flow(x0, t0), uniform_grid(n, t0, 1.0), solver=solver)
        errors.append(float((x - exact_flow(x0, 1.0)).abs().max()))
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    # Midpoint is superconvergent (order 3) at this endpoint for Gaussian data; "at least" is the claim.
    assert all(r > order - 0.25 for r in rates[1:]), (errors, rates)
    assert errors[-1] < (0.2 if order == 1 else 2e-3), errors


@pytest.mark.parametrize("solver, order", ORDERS)
def test_orders_are_exact_on_a_generic_linear_ode(solver, order):
    """dx/dt = t*x from x(0) = 1: x(1) = exp(1/2); no cancellation of the leading error term here."""

    def field(x, t):
        return t * x

    field.singular_times = ()
    errors = [
        abs(float(sample(field, torch.ones(1, dtype=torch.float64), uniform_grid(n), solver=solver)) - math.exp(0.5))
        for n in (16, 32, 64)
    ]
    rates = [math.log2(a / b) for a, b in zip(errors, errors[1:])]
    assert all(abs(r - order) < 0.1 for r in rates), (errors, rates)


@pytest.mark.parametrize("solver", ["heun", "midpoint", "multistep"])
def test_inversion_then_generation_returns_to_the_start(solver):
    field = oracle_field("v_prediction")
    data = exact_flow(tensor((32,), seed=2), 1.0)
    ts = uniform_grid(200, 1.0, 0.0)
    noise = sample(field, data, ts, solver=solver)
    back = sample(field, noise, ts.flip(0), solver=solver)
    # Adams-Bashforth 2's error constant (5/12) is larger than the two-stage solvers' (1/6, 1/24 here).
    assert float((back - data).abs().max()) < (1e-3 if solver == "multistep" else 1e-4)


class CountingField:
    def __init__(self, singular_times):
        self.singular_times = singular_times
        self.times = []

    def __call__(self, x, t):
        self.times.append(t)
        return torch.ones_like(x)


def test_heun_skips_its_corrector_on_a_step_ending_at_a_singular_time():
    field = CountingField(singular_times=(1.0,))
    x = sample(field, torch.zeros(2), [0.5, 0.75, 1.0], solver="heun")
    assert field.times == [0.5, 0.75, 0.75]  # the step ending at t = 1 has no corrector
    torch.testing.assert_close(x, torch.full((2,), 0.5))


def test_multistep_evaluates_once_per_step_at_its_start_and_refuses_steps_that_do_not_chain():
    field = CountingField(singular_times=(1.0,))
    x = sample(field, torch.zeros(2), [0.2, 0.5, 0.75, 1.0], solver="multistep")
    assert field.times == [0.2, 0.5, 0.75]  # never at the singular end
    torch.testing.assert_close(x, torch.full((2,), 0.8))  # a constant velocity is integrated exactly
    table = torch.tensor([[0.2, 0.4], [0.5, 0.7]], dtype=torch.float64)
    with pytest.raises(ValueError, match="and step 1 starts at t=0.5, not where step 0 ended \\(t=0.4\\): a DDIM"):
        sample(field, torch.zeros(2), table, solver="multistep")


def test_multistep_is_adams_bashforth_on_an_uneven_grid():
    """dx/dt = t^2 from x = 0 on the grid 0, 0.1, 0.4, 1: Euler, then x' = x + h*((1 + k)*u - k*u_prev)
    with k = h / (2*h_prev), by hand."""

    def field(x, t):
        return torch.full_like(x, t * t)

    field.singular_times = ()
    ts = [0.0, 0.1, 0.4, 1.0]
    x, u_prev, h_prev = 0.0, None, None
    for t0, t1 in zip(ts, ts[1:]):
        h, u = t1 - t0, t0 * t0
        k = 0.0 if u_prev is None else h / (2 * h_prev)
        x += h * ((1 + k) * u - k * (u_prev or 0.0))
        u_prev, h_prev = u, h
    got = sample(field, torch.zeros(1, dtype=torch.float64), ts, solver="multistep")
    assert float(got) == pytest.approx(x, rel=1e-14)


def test_a_field_without_singular_times_is_not_evaluated_at_either_end():
    field = CountingField(singular_times=())
    del field.singular_times
    with pytest.raises(ValueError, match="step 0 starts at t=0.0, where velocity_fn is singular"):
        sample(field, torch.zeros(2), uniform_grid(4))
    sample(field, torch.zeros(2), uniform_grid(4, 0.1, 1.0), solver="heun")
    assert 1.0 not in field.times and 0.0 not in field.times


def test_callback_sees_every_step_and_the_state_is_float32():
    seen = []
    x = tensor((3,), torch.float16)
    out = sample(lambda s, t: -s, x, uniform_grid(4, 0.2, 0.9), callback=lambda *a: seen.append(a), progress=True)
    assert [i for i, *_ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == pytest.approx(0.2)
    assert out.dtype == torch.float32 and x.dtype == torch.float16
    assert all(state.dtype == torch.float32 for _, _, state, _ in seen)


def test_the_callers_state_is_not_modified():
    x = tensor((5,))
    before = x.clone()
    for solver in SOLVERS:
        sample(lambda s, t: torch.ones_like(s), x, uniform_grid(3, 0.1, 0.9), solver=solver)
    assert torch.equal(x, before)


def test_step_table_carries_the_network_input_across_gaps():
    """With an (n, 2) table the state is rescaled so that z = scale(t) * x stays fixed across a gap."""
    from d2f import scale

    ts = torch.tensor([[0.2, 0.4], [0.5, 0.7]], dtype=torch.float64)
    x = sample(lambda s, t: torch.zeros_like(s), torch.ones(1, dtype=torch.float64), ts)
    assert float(x) == pytest.approx(float(scale(0.4) / scale(0.5)), rel=1e-14)


@pytest.mark.parametrize(
    "ts, message",
    [
        ([0.1, 0.3, 0.2], "strictly monotone"),
        ([0.1, 0.1], "strictly monotone"),
        ([0.5], "1-D grid of >= 2 times"),
        ([0.1, 1.5], "must lie in \\[0, 1\\]"),
    ],
)
def test_bad_grids_are_refused(ts, message):
    with pytest.raises(ValueError, match=message):
        sample(lambda s, t: s, torch.zeros(2), ts)


def test_bad_solver_and_field_output_are_refused():
    with pytest.raises(ValueError, match="solver='rk4' is not supported"):
        sample(lambda s, t: s, torch.zeros(2), [0.2, 0.5], solver="rk4")
    with pytest.raises(ValueError, match="velocity_fn returned tensor\\(\\[0.0\\]"):
        sample(lambda s, t: torch.zeros(1), torch.zeros(2), [0.2, 0.5])


@pytest.mark.parametrize("solver", SOLVERS)
def test_a_plain_field_is_sampled_differentiably(solver):
    """dx/dt = -x over n steps of size h: each step multiplies the state by 1 - h (Euler) or 1 - h + h^2/2
    (Heun and midpoint), so d x(1) / d x0 is that factor to the n-th power, for every entry; multistep's
    factor follows its recurrence x' = x - h*(3/2*x - 1/2*x_prev) after an Euler step."""

    def field(x, t):
        return -x

    field.singular_times = ()
    n, h = 32, 1 / 32
    if solver == "multistep":
        before, factor = 1.0, 1 - h
        for _ in range(n - 1):
            before, factor = factor, factor - h * (1.5 * factor - 0.5 * before)
    else:
        factor = (1 - h if solver == "euler" else 1 - h + h * h / 2) ** n
    x0 = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64, requires_grad=True)
    out = sample(field, x0, uniform_grid(n), solver=solver)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), factor * x0.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(x0.grad, torch.full_like(x0, factor), rtol=1e-12, atol=0)


def test_a_differentiable_step_gives_what_the_fused_one_gives_in_the_same_dtypes():
    """Through an input that requires grad the step takes plain autograd ops; its state (float32) and network
    input (float16 here, the network's dtype) match the fused path's, dtype and value."""
    g = torch.Generator().manual_seed(0)
    x, o_u = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    fused = ode_step(EULER, x, o_u, None, None, 0.5, -1.0, 0.1, 1.0, 2.0, torch.float16, "torch")
    graph = ode_step(EULER, x.requires_grad_(True), o_u, None, None, 0.5, -1.0, 0.1, 1.0, 2.0, torch.float16, "torch")
    assert [v.dtype for v in graph] == [v.dtype for v in fused] == [torch.float32, torch.float16]
    for a, b in zip(graph, fused):
        torch.testing.assert_close(a.detach(), b, rtol=1e-6, atol=1e-6)


def test_a_zero_dimensional_state():
    def field(x, t):
        return t * x

    field.singular_times = ()
    x = sample(field, torch.tensor(1.0, dtype=torch.float64), uniform_grid(64), solver="heun")
    assert x.shape == () and float(x) == pytest.approx(math.exp(0.5), rel=1e-4)


class Diverging(torch.nn.Module):
    """A real (tiny) network whose outputs turn NaN or inf from its ``at``-th call on."""

    def __init__(self, at: int, value: float):
        super().__init__()
        self.net, self.at, self.value, self.calls = TinyNet(1, 1).requires_grad_(False), at, value, 0

    def forward(self, z, k, label=None):
        self.calls += 1
        out = self.net(z, k, label)
        return out * self.value if self.calls >= self.at else out


@settings(max_examples=60)
@given(
    solver=st.sampled_from(SOLVERS),
    path=st.sampled_from(["D2FVelocity.sample", "d2f.sample of D2FVelocity", "d2f.sample of a function"]),
    callback=st.booleans(),
    backend=st.sampled_from(["torch", "triton"]),
    guided=st.booleans(),
    at=st.integers(1, 3),  # every solver evaluates at least once per step
    value=st.sampled_from([math.nan, math.inf, -math.inf]),
)
def test_every_sampler_path_names_a_nonfinite_model_output(solver, path, callback, backend, guided, at, value):
    """Fused or through the velocity, with or without a callback, on either backend: a network going NaN or
    inf at any evaluation fails the sampler with that evaluation's step, its times and the tensor, never a
    NaN result. The checks are read once, after the loop (d2f.deferred), so the loop runs to its end."""
    net = Diverging(at, value)
    schedule = Schedule.scaled_linear(prediction_type="v_prediction")
    uncond = {"label": torch.zeros(1)} if guided else None
    field = D2FVelocity(net, schedule, "v_prediction", guidance_scale=2.0 if guided else 1.0, uncond=uncond)
    cond = {"label": torch.ones(2)} if guided else {}
    noise, ts = torch.randn(2, 1, 8, 8), uniform_grid(3, schedule.t_min, 1.0)
    seen = []
    options = dict(solver=solver, callback=(lambda *a: seen.append(a)) if callback else None, backend=backend)
    singular = (0.0, 1.0) if path == "d2f.sample of a function" else field.singular_times  # a function declares none
    evaluations = [len(stage_times(solver, t0, t1, singular)) for t0, t1 in grid_steps(ts)]
    step = next(i for i in range(3) if sum(evaluations[: i + 1]) >= at) + 1
    message = rf"^sample: step {step} of 3 \(\w+, t .* -> .*\): the model's (conditional )?output"
    with pytest.raises(NonFiniteError, match=message):
        if path == "D2FVelocity.sample":
            field.sample(noise, ts, **options, **cond)
        elif path == "d2f.sample of D2FVelocity":
            sample(field, noise, ts, **options, **cond)
        else:
            sample(lambda x, t, **c: field(x, t, **c), noise, ts, **options, **cond)
    assert net.calls == sum(evaluations)


def test_a_velocity_functions_own_nonfinite_error_keeps_its_tensors_name():
    """A d2f function inside a user's velocity function names its own argument; the sampler adds the step."""

    def velocity(x, t):
        return target_velocity(torch.full_like(x, math.nan), x)

    message = r"^sample: step 1 of 2 \(euler, t 0.25 -> 0.625\): data contains NaN or inf$"
    with pytest.raises(NonFiniteError, match=message):
        sample(velocity, torch.randn(2, 3), uniform_grid(2, 0.25, 1.0), solver="euler")


def test_the_velocity_itself_names_a_nonfinite_model_output():
    field = D2FVelocity(Diverging(1, math.nan), Schedule.scaled_linear(prediction_type="v_prediction"), "v_prediction")
    with pytest.raises(NonFiniteError, match="^D2FVelocity: model_output contains NaN or inf$"):
        field(torch.randn(2, 1, 8, 8), 0.5)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_empty_batch_samples_to_an_empty_batch(solver, backend):
    """As torch's own elementwise ops do (fm_loss, whose mean is undefined there, refuses one by name)."""
    field = D2FVelocity(TinyNet(1, 1), Schedule.scaled_linear(prediction_type="v_prediction"), "v_prediction")
    noise = torch.randn(0, 1, 8, 8)
    assert field.sample(noise, uniform_grid(2, 0.0, 1.0), solver=solver, backend=backend).shape == noise.shape
    assert sample(lambda x, t: x, noise, [0.1, 0.9], solver=solver, backend=backend).shape == noise.shape


def test_progress_shows_a_bar_counting_steps_only_when_asked(capsys):
    sample(lambda s, t: s, torch.zeros(2), [0.2, 0.5, 0.9])
    assert capsys.readouterr().err == ""
    sample(lambda s, t: s, torch.zeros(2), [0.2, 0.5, 0.9], solver="heun", progress=True)
    err = capsys.readouterr().err
    assert "d2f heun: 100%" in err and "2/2" in err and re.search(r"\d(step/s|s/step)\]", err), err


class SpyField(D2FVelocity):
    """Counts the evaluations the solvers take through the raw outputs (the fused update)."""

    fused = 0

    def outputs(self, z, t, cond):
        self.fused += 1
        return super().outputs(z, t, cond)


def test_a_converted_network_is_sampled_fused_unless_a_callback_needs_its_velocity():
    """Without a callback every evaluation goes through the raw outputs, each network input in the network's
    dtype; with one, the field is sampled through its velocity, which the callback receives, to the same end."""
    schedule = Schedule.scaled_linear()
    net = TinyNet().double()
    field = SpyField(net, schedule, "v_prediction")
    noise, ts = tensor((2, 3, 4, 4)), uniform_grid(3, schedule.t_min, 1.0)
    fused = field.sample(noise.float(), ts, solver="heun")
    assert field.fused == 6 and all(z.dtype == torch.float64 for z, _, _ in net.calls)
    field.fused, seen = 0, []
    plain = field.sample(noise.float(), ts, solver="heun", callback=lambda i, t, x, u: seen.append((t, x, u)))
    assert field.fused == 0 and len(seen) == 3
    torch.testing.assert_close(plain, fused, rtol=1e-5, atol=1e-5)
    for t, x, u in seen:
        torch.testing.assert_close(u, field(x, t).float())


def test_errors_of_the_field_keep_their_type_and_name_what_it_returned():
    class Refused(ValueError):
        pass

    def refuse(x, t):
        raise Refused("no")

    with pytest.raises(Refused, match="^no$"):
        sample(refuse, torch.zeros(2), [0.2, 0.5])
    with pytest.raises(ValueError, match="velocity_fn returned list for a state of shape \\(2,\\)"):
        sample(lambda x, t: [0.0, 0.0], torch.zeros(2), [0.2, 0.5])


def test_an_overflowing_step_names_its_scalars():
    """h * b = 1e39 is beyond float32: x + h*b*o is inf although x and o are finite."""
    x = torch.ones(2)
    message = "although the inputs are finite; a=0.0, b=1.0, h=1e\\+39, g=1.0, s_next=1.0, k=0.0$"
    with pytest.raises(ValueError, match=message):
        ode_step(EULER, x, x, None, None, 0.0, 1.0, 1e39, 1.0, 1.0, torch.float32)


def test_ddim_step_defaults_to_the_deterministic_step_with_the_networks_noise_prediction():
    """eta = 0 and no clipping is the Euler step; clipped, it is DDIM's x' = (alpha' * D_c + sigma' * E) / scale(t')
    with the network's own E = x - t*u (use_clipped_model_output unset)."""
    x, u = tensor((2, 3), seed=1), tensor((2, 3), seed=2)
    x_next, data = ddim_step(x, u, 0.3, 0.6)
    torch.testing.assert_close(x_next, x + 0.3 * u, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(data, x + 0.7 * u, rtol=1e-12, atol=1e-12)
    alpha, sigma = alpha_sigma(0.6)
    clipped = (x + 0.7 * u).clamp(-0.5, 0.5)
    x_next, data = ddim_step(x, u, 0.3, 0.6, clip=lambda d: d.clamp(-0.5, 0.5))
    torch.testing.assert_close(data, clipped)
    torch.testing.assert_close(x_next, (alpha * clipped + sigma * (x - 0.3 * u)) / scale(0.6), rtol=1e-12, atol=1e-12)


def test_a_multistep_step_weighing_a_missing_previous_velocity_is_refused():
    x = torch.randn(2, 3)
    message = r"^ode_step: k=0.5 weighs the previous velocity u1, which is None; the first step has k=0$"
    with pytest.raises(ValueError, match=message):
        ode_step(MULTISTEP, x, x, None, None, 1.0, -1.0, 0.1, 1.0, 1.0, torch.float32, "torch", k=0.5)


def test_a_step_overflow_names_the_dtypes_it_overflowed():
    x = torch.full((2, 3), 6e4)
    message = (
        r"^ode_step: the step overflowed \(its result is not representable in torch.float32, or the next network "
        r"input in torch.float16\) although the inputs are finite; a=0.0, b=1.0, h=0.5, g=1.0, s_next=2.0, k=0.0$"
    )
    with pytest.raises(ValueError, match=message):
        ode_step(EULER, x, x, None, None, 0.0, 1.0, 0.5, 1.0, 2.0, torch.float16, "torch")


@pytest.mark.parametrize("wide", ["x", "o_u"])
def test_triton_refuses_a_float64_state_or_output(wide):
    x, o = (torch.randn(2, 3, dtype=torch.float64 if name == wide else torch.float32) for name in ("x", "o_u"))
    with pytest.raises(ValueError, match="^backend='triton' does not run float64 inputs"):
        ode_step(EULER, x, o, None, None, 0.0, 1.0, 0.5, 1.0, 1.0, torch.float32, "triton")


def test_ddim_steps_noise_takes_the_states_dtype():
    """A float32 state stays float32 whatever the noise's dtype: the noise is added in the state's dtype."""
    x, u = tensor((2, 3), seed=1).float(), tensor((2, 3), seed=2).float()
    noise = tensor((2, 3), seed=3)  # float64
    x_next, data = ddim_step(x, u, 0.3, 0.6, eta=0.5, noise=noise)
    assert x_next.dtype == data.dtype == torch.float32
    wide, _ = ddim_step(x.double(), u.double(), 0.3, 0.6, eta=0.5, noise=noise)
    torch.testing.assert_close(x_next, wide.float(), rtol=1e-5, atol=1e-5)
