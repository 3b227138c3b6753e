"""Numerics under stress: the public math, the loss and the ODE step at the edges of their domain.

Every property has one shape. With t at exactly 0, ``schedule.t_min`` and 1 and at their neighbouring floats
(float64 and float32, one and two steps either way, so some lie just outside [0, 1]), at ``2^-k`` and
``1 - 2^-k`` and uniform on [0, 1], fp32, fp16, bf16 and
float64 inputs of magnitude 0 to 1e4, and the standard, zero-terminal-SNR and random schedules of
``strategies.py``, a call EITHER returns a finite result within the tolerance below of a float64 reference
written from the closed forms of ``docs/conventions.md``, OR raises a ``ValueError`` whose message names the
offending argument. The reference also decides which of the two is allowed: a call must not raise where the
float64 result is representable, and a silent NaN or inf is never accepted.

Tolerance. Each function here is an affine map ``y = sum_i c_i(t) * v_i`` (the loss squares one) whose
coefficients are formed in float64 and cast once (conventions §6). Its rounding error is bounded by

    |y - y_ref| <= K * (u_work * y_abs + spacing_work)  +  u_out * |y_ref|  +  spacing_out

where ``y_abs = sum_i |c_i| * |v_i|`` is the same formula evaluated on absolute values, so ``y_abs / |y|`` is
the condition number of the sum (large where terms cancel, e.g. epsilon's ``(x - o)/t`` for ``o ~ x``);
``u_work`` is the unit roundoff of the dtype the work runs in, ``u_out`` that of the result's dtype (its final
rounding) and ``spacing_*`` a dtype's smallest normal number (the absolute floor near 0, where subnormal
results may be flushed to zero). K = 16 covers the longest chain of roundings (cast coefficient, products,
sums; Heun's corrector has about six).

    inputs      work      u_work    result dtype          u_out
    float64     float64   2^-53     float64               2^-53
    float32     float32   2^-24     float32               2^-24
    float16     float32   2^-24     float32 or float16    2^-24 or 2^-11
    bfloat16    float32   2^-24     float32 or bfloat16   2^-24 or 2^-8

fp16 and bf16 inputs are exact in float32, so they add no work error; an fp16 or bf16 *result* (the network
input of ``network_input`` and ``ode_step``, the loss gradient) adds its rounding, 4.9e-4 (fp16) or 3.9e-3
(bf16) relative. The loss squares and sums N residuals, so its bound is ``(2K + N + 4) * u_work`` times
``reduce(w * r_abs^2)``. Functions of t alone (``alpha_sigma``, ``scale``, the time map) work in float64 and
round once to their float32 or float64 result.

bf16 runs on the torch path only: the Triton interpreter truncates bf16 casts instead of rounding them.
"""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings, target
from hypothesis import strategies as st

from d2f import (
    PREDICTION_TYPES,
    NonFiniteError,
    Schedule,
    align,
    alpha_sigma,
    diffusion_to_velocity,
    fm_loss,
    guidance,
    interpolate,
    network_input,
    scale,
    target_velocity,
    velocity_coefficients,
    velocity_to_diffusion,
)
from d2f.grids import grid_steps
from d2f.solvers import CORRECT, EULER, PREDICT, ode_step
from strategies import inner_times, schedules, shapes, tensor, unit_times
from test_loss import reference_loss

pytest.importorskip("triton")  # the "triton" cases run the kernels through the interpreter (conftest.py)

# The interpreter runs kernels in numpy, which warns on a float32 overflow before d2f raises its error.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

K = 16
UNIT = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
F32_MAX = torch.finfo(torch.float32).max
MAGNITUDE = 1e4
TORCH_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TRITON_DTYPES = [torch.float32, torch.float16]
DTYPES = {"torch": TORCH_DTYPES, "triton": TRITON_DTYPES}
# How a t is passed: a Python float, or a tensor of one of these dtypes (then t is that dtype's rounding).
TIME_FORMS = [None, torch.float64, torch.float32, torch.float16, torch.bfloat16]

OUT_OF_RANGE = r"t must lie in \[0, 1\]"
SINGULAR = r"gives no (finite )?velocity at t="
OVERFLOW_AT_T = r"overflowed .* at t="
STEP_OVERFLOW = r"ode_step: the step overflowed"
ERROR_NAMES = {OUT_OF_RANGE: "t outside [0, 1]", SINGULAR: "singular t", OVERFLOW_AT_T: "overflow, names t"}
K_OUT_OF_RANGE = r"k must lie in \[-1, \d+\] for this schedule"
ERROR_NAMES.update({STEP_OVERFLOW: "step overflow", K_OUT_OF_RANGE: "k outside [-1, k_max]"})


# ------------------------------------------------------------------------------------------------ strategies
def neighbours(a: float) -> set[float]:
    """``a``, its float32 rounding and both their neighbours one and two steps away, in both directions."""
    out = {a, float(np.float32(a))}
    for direction in (-math.inf, math.inf):
        b = math.nextafter(a, direction)
        f = np.nextafter(np.float32(a), np.float32(direction))
        out |= {b, math.nextafter(b, direction), float(f), float(np.nextafter(f, np.float32(direction)))}
    return out


def edges(t_min: float) -> tuple[list[float], list[float]]:
    """0, t_min and 1 with their neighbours: ``(inside [0, 1], outside it)``."""
    values = neighbours(0.0) | neighbours(t_min) | neighbours(1.0)
    return sorted(v for v in values if 0 <= v <= 1), sorted(v for v in values if not 0 <= v <= 1)


def times(t_min: float) -> st.SearchStrategy[float]:
    """A third each: 0, t_min, 1 or a neighbour inside [0, 1]; ``2^-k`` or ``1 - 2^-k``; uniform on [0, 1].

    The powers of two approach both ends log-uniformly, through the whole range where 1/t overflows float32
    or float64 and where 1 - t is lost when t is rounded to float32 (k > 24).
    """
    approach = st.one_of(st.integers(1, 1074).map(lambda k: 2.0**-k), st.integers(1, 53).map(lambda k: 1 - 2.0**-k))
    return st.one_of(st.sampled_from(edges(t_min)[0]), approach, unit_times)


@st.composite
def time_args(draw, batch: int, t_min: float):
    """``(t, t_ref)``: t as the function receives it and its exact values as float64, ``()`` or ``(B,)``.

    One example in eight puts one t just outside [0, 1] (a neighbour of 0 or 1), which must raise.
    """
    values = draw(st.lists(times(t_min), min_size=batch, max_size=batch))
    if draw(st.integers(0, 7)) == 0:
        values[draw(st.integers(0, batch - 1))] = draw(st.sampled_from(edges(t_min)[1]))
    form = draw(st.sampled_from(TIME_FORMS))
    if form is None:
        return values[0], torch.tensor(values[0], dtype=torch.float64)
    t = torch.tensor(values, dtype=torch.float64).to(form)
    return t, t.double()


magnitudes = st.one_of(st.sampled_from([0.0, 1e-3, 1.0, MAGNITUDE]), st.floats(1e-3, MAGNITUDE))


@st.composite
def inputs(draw, shape, dtype, n: int):
    """``n`` tensors of ``dtype``, each a clamped normal sample times its own magnitude in [0, 1e4]."""
    seed = draw(st.integers(0, 2**16))
    # clamp keeps 4 * 1e4 inside fp16's range (65504) so that no input is inf before the call
    return [(tensor(shape, seed=seed + i).clamp(-4, 4) * draw(magnitudes)).to(dtype) for i in range(n)]


# ------------------------------------------------------------------------------------------------ references
def per_sample(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *[1] * (like.ndim - 1)) if t.ndim == 1 else t


def norm(t):
    return torch.sqrt(t * t + (1 - t) ** 2)


def velocity_coefs(t, prediction_type):
    """``(A, B)`` of conventions §3, ``u = A*x + B*o``, in float64."""
    n = norm(t)
    return {
        "epsilon": (1 / t, -1 / t),
        "sample": (-1 / (1 - t), 1 / (1 - t)),
        "v_prediction": ((2 * t - 1) / n**2, -1 / n),
        "velocity": (0 * t, 1 + 0 * t),
    }[prediction_type]


def output_coefs(t, prediction_type):
    """``(C, D)`` of conventions §3, ``o = C*x + D*u`` (the inverse map), in float64."""
    n = norm(t)
    return {
        "epsilon": (1 + 0 * t, -t),
        "sample": (1 + 0 * t, 1 - t),
        "v_prediction": ((2 * t - 1) / n, -n),
        "velocity": (0 * t, 1 + 0 * t),
    }[prediction_type]


def tau_table(schedule):
    """The extended grid of conventions §2 from the closed form: ``(k, tau)``, k = -1 .. k_max, ascending k."""
    ac = schedule.alphas_cumprod
    alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
    tau = alpha / (alpha + sigma)
    tau = np.concatenate([[1.0], tau, [0.0] if tau[-1] > 0 else []])
    return np.arange(-1, tau.size - 1, dtype=np.float64), tau


def work_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def spacing(dtype: torch.dtype) -> float:
    """The absolute floor near 0: ``dtype``'s smallest normal number. Not its subnormal spacing: CPUs and GPUs
    may flush subnormal results to zero (seen here: a float32 step whose float64 reference is -4.6e-42 came back
    0 on a 2-core AMD EPYC)."""
    return torch.finfo(dtype).smallest_normal


def assert_close(got, ref, bound, work, what, k=K):
    """The tolerance of the module docstring; ``got`` must be finite."""
    got, ref = got.detach(), ref.detach()
    if got.numel() == 0:
        return
    assert bool(got.isfinite().all()), f"{what}: silent NaN/inf where the float64 reference is {ref}"
    tol = k * (UNIT[work] * bound + spacing(work)) + UNIT[got.dtype] * ref.abs() + spacing(got.dtype)
    err = (got.double() - ref).abs()
    worst = int((err / tol).argmax()) if err.ndim else 0
    # Targeted search: hypothesis steers later examples towards inputs where error / tolerance grows.
    target(float((err / tol).max()), label=what)
    assert bool((err <= tol).all()), (
        f"{what}: error {err.reshape(-1)[worst].item():.3g} > tolerance {tol.reshape(-1)[worst].item():.3g} "
        f"(reference {ref.reshape(-1)[worst].item():.6g}, got {got.double().reshape(-1)[worst].item():.6g})"
    )


def time_error(t_ref, prediction_type=None):
    """The error message a call must raise for these times, or None: out of range first, then singular."""
    if not bool(((t_ref >= 0) & (t_ref <= 1)).all()):
        return OUT_OF_RANGE
    if prediction_type is not None and not bool(velocity_coefs(t_ref, prediction_type)[1].isfinite().all()):
        return SINGULAR  # exactly at the singular end, or so close that 1/t overflows float64
    return None


def outcome(call, must_raise=None, may_raise=None):
    """Run ``call``. It must raise ``must_raise``; may raise ``may_raise``; else it must return. Returns the
    result, or None after checking that the ``ValueError`` was allowed and its message names the argument.

    The hypothesis statistics (``--hypothesis-show-statistics``) count each outcome as an event.
    """
    try:
        result = call()
    except ValueError as e:
        allowed = must_raise or may_raise
        assert allowed is not None, f"raised although the float64 reference is representable: {e}"
        assert re.search(allowed, str(e)), f"the error should match {allowed!r}: {e}"
        event(f"raised: {ERROR_NAMES.get(allowed, allowed)}")
        return None
    assert must_raise is None, f"returned {result} instead of raising {must_raise!r}"
    event("returned, checked against float64")
    return result


# ------------------------------------------------------------------------------------ functions of t alone
@settings(max_examples=150)
@given(schedules, st.data())
def test_alpha_sigma_and_scale(schedule, data):
    t, t_ref = data.draw(time_args(3, schedule.t_min))
    result = outcome(lambda: (*alpha_sigma(t), scale(t)), must_raise=time_error(t_ref))
    if result is None:
        return
    n = norm(t_ref)
    expected_dtype = torch.float64 if not isinstance(t, torch.Tensor) or t.dtype == torch.float64 else torch.float32
    for got, ref, name in zip(result, (t_ref / n, (1 - t_ref) / n, 1 / n), ("alpha", "sigma", "scale")):
        assert got.dtype == expected_dtype
        assert_close(got, ref, ref.abs(), torch.float64, name)


@settings(max_examples=150)
@given(schedules, st.data())
def test_timestep(schedule, data):
    t, t_ref = data.draw(time_args(3, schedule.t_min))
    k = outcome(lambda: schedule.timestep(t), must_raise=time_error(t_ref))
    if k is None:
        return
    ks, taus = tau_table(schedule)
    ref = torch.as_tensor(np.interp(t_ref.numpy(), taus[::-1], ks[::-1]))
    # frac = (t - tau_i)/(tau_{i+1} - tau_i) loses eps*|tau|/(tau_{i+1} - tau_i): the local slope dk/dtau
    # (huge where the schedule crowds its taus) is this formula's condition number.
    gaps = np.diff(taus[::-1])
    j = np.clip(np.searchsorted(taus[::-1], t_ref.numpy(), side="right") - 1, 0, gaps.size - 1)
    slope = 1 / np.minimum.reduce([gaps[np.maximum(j - 1, 0)], gaps[j], gaps[np.minimum(j + 1, gaps.size - 1)]])
    assert_close(k, ref, ref.abs() + 1 + torch.as_tensor(slope), torch.float64, "timestep")
    on_grid = torch.as_tensor(np.isin(t_ref.numpy(), taus))
    # Exact on the extended grid: timestep(tau_k) == k, with t = 1 -> -1, t_min -> T-1 and t = 0 -> k_max.
    assert torch.equal(k.double()[on_grid], ref[on_grid]), "timestep is not exact on the grid"


@st.composite
def steps(draw, k_max: int):
    """-1, 0, T-1 and k_max with their neighbours (some outside [-1, k_max]), integers, uniform values."""
    ends = sorted(set().union(*(neighbours(float(k)) for k in (-1, 0, k_max - 1, k_max))))
    return draw(st.one_of(st.sampled_from(ends), st.integers(-1, k_max), st.floats(-1, k_max)))


@settings(max_examples=150)
@given(schedules, st.data())
def test_fm_time(schedule, data):
    ks, taus = tau_table(schedule)
    k_max = int(ks[-1])
    form = data.draw(st.sampled_from(TIME_FORMS))
    k = data.draw(steps(k_max))
    k = k if form is None else torch.tensor([k, data.draw(steps(k_max))], dtype=torch.float64).to(form)
    k_ref = torch.as_tensor(k, dtype=torch.float64)
    valid = bool(((k_ref >= -1) & (k_ref <= k_max)).all())
    t = outcome(lambda: schedule.fm_time(k), must_raise=None if valid else K_OUT_OF_RANGE)
    if t is None:
        return
    ref = torch.as_tensor(np.interp(k_ref.numpy(), ks, taus))
    assert_close(t, ref, ref.abs() + 1, torch.float64, "fm_time")
    integer = k_ref == k_ref.round()
    assert torch.equal(t.double()[integer], ref.to(t.dtype).double()[integer]), "fm_time is not exact at integers"


# ----------------------------------------------------------------------------------------- the FM path
@settings(max_examples=150)
@given(schedules, shapes, st.sampled_from(TORCH_DTYPES), st.data())
def test_align(schedule, shape, dtype, data):
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    (x,) = data.draw(inputs(shape, dtype, 1))
    z = outcome(lambda: align(x, t), must_raise=time_error(t_ref))
    if z is not None:
        ref = per_sample(1 / norm(t_ref), x) * x.double()
        assert z.dtype == work_dtype(x)
        assert_close(z, ref, ref.abs(), work_dtype(x), "align")


@settings(max_examples=150)
@given(schedules, shapes, st.sampled_from(TORCH_DTYPES), st.sampled_from(TORCH_DTYPES), st.data())
def test_interpolate_and_target_velocity(schedule, shape, data_dtype, noise_dtype, data):
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    (clean,) = data.draw(inputs(shape, data_dtype, 1))
    (noise,) = data.draw(inputs(shape, noise_dtype, 1))
    work = work_dtype(clean, noise)
    d, n = clean.double(), noise.double()
    u = target_velocity(clean, noise)
    assert_close(u, d - n, d.abs() + n.abs(), work, "target_velocity")
    x = outcome(lambda: interpolate(clean, noise, t), must_raise=time_error(t_ref))
    if x is not None:
        tb = per_sample(t_ref, d)
        assert x.dtype == work
        assert_close(x, tb * d + (1 - tb) * n, tb * d.abs() + (1 - tb) * n.abs(), work, "interpolate")


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=80)
@given(schedules, shapes, st.data())
def test_network_input(backend, schedule, shape, data):
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    out = data.draw(st.sampled_from([None, *DTYPES[backend]]), label="out dtype")
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    clean, noise = data.draw(inputs(shape, dtype, 2))
    z = outcome(lambda: network_input(clean, noise, t, dtype=out, backend=backend), must_raise=time_error(t_ref))
    if z is not None:
        n = per_sample(norm(t_ref), clean)
        alpha, sigma = per_sample(t_ref, clean) / n, (1 - per_sample(t_ref, clean)) / n
        d, e = clean.double(), noise.double()
        assert z.dtype == (out or work_dtype(clean))
        assert_close(z, alpha * d + sigma * e, alpha * d.abs() + sigma * e.abs(), work_dtype(clean), "network_input")


# ------------------------------------------------------------------------------- output <-> velocity
@settings(max_examples=200)
@given(schedules, shapes, st.sampled_from(PREDICTION_TYPES), st.sampled_from(TORCH_DTYPES), st.data())
def test_diffusion_to_velocity(schedule, shape, prediction_type, dtype, data):
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    o, x = data.draw(inputs(shape, dtype, 2))
    work = work_dtype(x)
    must_raise = time_error(t_ref, prediction_type)
    ref = bound = None
    if must_raise is None:
        a, b = (per_sample(c, x) for c in velocity_coefs(t_ref, prediction_type))
        ref, bound = a * x.double() + b * o.double(), a.abs() * x.double().abs() + b.abs() * o.double().abs()
    # Near a singular end the velocity itself (or A*x before B*o cancels it) can exceed the work dtype:
    # then the call may raise, naming t; anywhere else it must return.
    limit = torch.finfo(work).max / 4
    overflow = must_raise is None and bool(((bound > limit) | (a.abs() > limit) | (b.abs() > limit)).any())
    u = outcome(
        lambda: diffusion_to_velocity(o, x, t, prediction_type),
        must_raise=must_raise,
        may_raise=OVERFLOW_AT_T if overflow else None,
    )
    if u is not None:
        assert u.dtype == work
        assert_close(u, ref, bound, work, f"diffusion_to_velocity[{prediction_type}]")


@settings(max_examples=200)
@given(schedules, shapes, st.sampled_from(PREDICTION_TYPES), st.sampled_from(TORCH_DTYPES), st.data())
def test_velocity_to_diffusion(schedule, shape, prediction_type, dtype, data):
    """The inverse map is finite on all of [0, 1]: it may raise only for t outside it."""
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    u, x = data.draw(inputs(shape, dtype, 2))
    o = outcome(lambda: velocity_to_diffusion(u, x, t, prediction_type), must_raise=time_error(t_ref))
    if o is not None:
        c, d = (per_sample(v, x) for v in output_coefs(t_ref, prediction_type))
        ref, bound = c * x.double() + d * u.double(), c.abs() * x.double().abs() + d.abs() * u.double().abs()
        assert_close(o, ref, bound, work_dtype(x), f"velocity_to_diffusion[{prediction_type}]")


# ------------------------------------------------------------------------------------------------ the loss
def reduce(v, reduction):
    if reduction == "mean":
        return v.mean()
    if reduction == "sum":
        return v.sum()
    return v.reshape(v.shape[0], -1).mean(1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=80)
@given(
    schedules,
    shapes,
    st.sampled_from(PREDICTION_TYPES),
    st.sampled_from(["mean", "sum", "none"]),
    st.sampled_from(["random", "data", "noise"]),
    st.booleans(),
    st.data(),
)
def test_fm_loss(backend, schedule, shape, prediction_type, reduction, o_is, weighted, data):
    """Value and gradient. ``o_is`` data or noise makes sample or epsilon predictions perfect: r cancels to 0."""
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    t, t_ref = data.draw(time_args(shape[0], schedule.t_min))
    o, clean, noise = data.draw(inputs(shape, dtype, 3))
    o = {"random": o, "data": clean, "noise": noise}[o_is].clone().requires_grad_(True)
    w = torch.tensor(data.draw(st.lists(st.floats(0, 2), min_size=shape[0], max_size=shape[0]))) if weighted else None
    work = work_dtype(o)
    must_raise = time_error(t_ref, prediction_type)
    if must_raise is None:
        # |r| <= r_abs, |A|*|x| + |B|*|o| + |data| + |noise| with x = t*data + (1-t)*noise, the loss's literal form
        tb = per_sample(t_ref, o)
        a, b = (c.abs() for c in velocity_coefs(tb, prediction_type))
        d, n, od = clean.double().abs(), noise.double().abs(), o.detach().double().abs()
        r_abs = a * (tb * d + (1 - tb) * n) + b * od + d + n
        wb = torch.ones(()) if w is None else per_sample(w.double(), o)
        limit = torch.finfo(work).max / 4
        # Where the squared residual (or a coefficient) exceeds float32, the loss may overflow: it may raise then.
        overflow = bool((wb.clamp(min=1) * r_abs**2).sum() > limit or (a.max() > limit) or (b.max() > limit))
    else:
        overflow = False
    call = lambda: fm_loss(o, clean, noise, t, prediction_type, weight=w, reduction=reduction, backend=backend)  # noqa: E731
    loss = outcome(call, must_raise=must_raise, may_raise=OVERFLOW_AT_T if overflow else None)
    if loss is None:
        return
    o_ref = o.detach().double().requires_grad_(True)
    ref = reference_loss(o_ref, clean, noise, t_ref.expand(shape[0]), prediction_type, w, reduction)
    per_loss = o[0].numel() if reduction == "none" else o.numel()
    assert loss.dtype == work
    assert_close(loss, ref, reduce(wb * r_abs**2, reduction), work, "loss", k=2 * K + per_loss + 4)
    loss.sum().backward()
    ref.sum().backward()
    assert o.grad.dtype == dtype
    # dL/do = 2*w*B*r/N; where its bound exceeds o's dtype an fp16/bf16 gradient overflows to inf, the IEEE
    # signal that torch.amp's GradScaler looks for, so it is checked only where it fits (and never NaN).
    divisor = {"mean": o.numel(), "sum": 1, "none": o[0].numel()}[reduction]
    g_abs = (2 * wb * b * r_abs / divisor).expand(o.shape)
    fits = g_abs <= torch.finfo(dtype).max / 4
    assert not bool(o.grad.isnan().any()), "NaN gradient"
    assert_close(o.grad[fits], o_ref.grad[fits], g_abs[fits], work, "gradient")


# ---------------------------------------------------------------------------------------- the ODE step
def step_reference(mode, x, o_u, o_c, u1, a, b, h, g, s, c):
    """The docstring of d2f.solvers.ode_step written literally: ``(x' or u, z)``. With |.| inputs it gives the
    bound."""
    o = o_u if o_c is None else o_u + g * (o_c - o_u)
    if mode == EULER:
        first = x + h * (a * x + b * o)
        return first, s * first
    if mode == PREDICT:
        u = a * x + b * o
        return u, s * (x + c * h * u)
    w = 1 / (2 * c)
    first = x + h * ((1 - w) * u1 + w * (a * (x + c * h * u1) + b * o))
    return first, s * first


def step_bound(mode, x, o_u, o_c, u1, a, b, h, g, s, c):
    """``step_reference`` on absolute values, with each subtraction counted as an addition."""
    o = o_u if o_c is None else o_u + abs(g) * (o_c + o_u)
    return step_reference(mode, x, o, None, u1, abs(a), abs(b), abs(h), 0.0, abs(s), c)


# name: (mode, predictor fraction c): Heun's and the midpoint rule's stages
MODES = {
    "euler": (EULER, 1.0),
    "heun_predict": (PREDICT, 1.0),
    "heun_correct": (CORRECT, 1.0),
    "midpoint_predict": (PREDICT, 0.5),
    "midpoint_correct": (CORRECT, 0.5),
}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=80)
@given(schedules, shapes, st.sampled_from(PREDICTION_TYPES), st.sampled_from(list(MODES)), st.booleans(), st.data())
def test_ode_step(backend, schedule, shape, prediction_type, mode_name, guided, data):
    """One fused step with the coefficients the sampler would pass: A, B at the evaluation time, s = scale(t1)."""
    mode, c = MODES[mode_name]
    out_dtype = data.draw(st.sampled_from(DTYPES[backend]), label="network dtype")
    state = data.draw(st.sampled_from([torch.float32, torch.float64] if backend == "torch" else [torch.float32]))
    t0, t1 = data.draw(times(schedule.t_min), label="t0"), data.draw(times(schedule.t_min), label="t1")
    g = data.draw(st.floats(-3, 8), label="g") if guided else 1.0
    x, u1 = data.draw(inputs(shape, state, 2))
    o_u, o_c = data.draw(inputs(shape, out_dtype, 2))
    o_c = o_c if guided else None
    u1 = u1 if mode == CORRECT else None
    t_eval = t1 if mode == CORRECT else t0
    coefficients = outcome(
        lambda: (scale(t0), scale(t1), *velocity_coefficients(t_eval, prediction_type)),
        must_raise=time_error(torch.tensor([t0, t1], dtype=torch.float64))
        or time_error(torch.tensor(t_eval, dtype=torch.float64), prediction_type),
    )
    if coefficients is None:
        return
    _, s, a, b = map(float, coefficients)
    h = t1 - t0
    args = [v if v is None else v.double() for v in (x, o_u, o_c, u1)]
    ref = step_reference(mode, *args, a, b, h, g, s, c)
    bound = step_bound(mode, *[v if v is None else v.abs() for v in args], a, b, h, g, s, c)
    scalars = max(abs(a), abs(b), abs(h * a), abs(h * b * (1 + 2 * abs(g))))
    limit = F32_MAX / 4
    overflow = scalars > limit or bool(bound[0].max() > limit) or bool(bound[1].max() > torch.finfo(out_dtype).max / 4)
    result = outcome(
        lambda: ode_step(mode, x, o_u, o_c, u1, a, b, h, g, s, out_dtype, backend=backend, c=c),
        may_raise=STEP_OVERFLOW if overflow else None,
    )
    if result is not None:
        first, z = result
        assert first.dtype == state and z.dtype == out_dtype
        assert_close(first, ref[0], bound[0], state, f"ode_step[{mode_name}] state")
        assert_close(z, ref[1], bound[1], state, f"ode_step[{mode_name}] network input")


# ------------------------------------------------------------------------------- NaN and inf are named
BAD = st.sampled_from([math.nan, math.inf, -math.inf])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=60)
@given(
    shapes,
    st.sampled_from(["model_output", "data", "noise", "t", "weight"]),
    BAD,
    st.sampled_from(PREDICTION_TYPES),
    st.sampled_from(["mean", "sum", "none"]),
    inner_times,
    st.data(),
)
def test_fm_loss_names_the_non_finite_input(backend, shape, name, bad, prediction_type, reduction, t, data):
    dtype = data.draw(st.sampled_from(DTYPES[backend]), label="dtype")
    args = dict(zip(("model_output", "data", "noise"), data.draw(inputs(shape, dtype, 3))))
    args["t"] = torch.full(shape[:1], t)
    args["weight"] = torch.ones(shape[:1])
    target = args[name].view(-1)
    target[data.draw(st.integers(0, target.numel() - 1), label="position")] = bad
    message = {"t": OUT_OF_RANGE, "weight": r"weight must be finite and >= 0"}.get(name, f"fm_loss: {name} contains")
    with pytest.raises(ValueError, match=message):
        fm_loss(**args, prediction_type=prediction_type, reduction=reduction, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@settings(max_examples=60)
@given(shapes, st.sampled_from(list(MODES)), st.booleans(), BAD, st.sampled_from(PREDICTION_TYPES), st.data())
def test_ode_step_names_the_non_finite_input(backend, shape, mode_name, guided, bad, prediction_type, data):
    mode, c = MODES[mode_name]
    out_dtype = data.draw(st.sampled_from(DTYPES[backend]), label="network dtype")
    x, u1 = data.draw(inputs(shape, torch.float32, 2))
    o_u, o_c = data.draw(inputs(shape, out_dtype, 2))
    tensors = {"x": x, "o_u": o_u, "o_c": o_c if guided else None, "u1": u1 if mode == CORRECT else None}
    name = data.draw(st.sampled_from([k for k, v in tensors.items() if v is not None]), label="bad tensor")
    target = tensors[name].view(-1)
    target[data.draw(st.integers(0, target.numel() - 1), label="position")] = bad
    t0, t1 = sorted(data.draw(st.lists(inner_times, min_size=2, max_size=2, unique=True)))
    a, b = map(float, velocity_coefficients(t0, prediction_type))
    g = data.draw(st.floats(-3, 8), label="g") if guided else 1.0
    with pytest.raises(ValueError, match=f"ode_step: {name} contains NaN or inf"):
        ode_step(mode, *tensors.values(), a, b, t1 - t0, g, float(scale(t1)), out_dtype, backend=backend, c=c)


# The public elementwise helpers, as ``call(tensors, t, prediction_type)`` with their tensor arguments. One
# finiteness policy for all: a NaN or inf input raises the NonFiniteError naming it, an overflow from finite
# inputs a ValueError naming the function and the dtype; they used to pass NaN through and overflow to inf.
HELPERS = {
    "align": (("x",), lambda a, t, p: align(a["x"], t)),
    "interpolate": (("data", "noise"), lambda a, t, p: interpolate(a["data"], a["noise"], t)),
    "target_velocity": (("data", "noise"), lambda a, t, p: target_velocity(a["data"], a["noise"])),
    "network_input": (("data", "noise"), lambda a, t, p: network_input(a["data"], a["noise"], t, backend="torch")),
    "network_input[triton]": (
        ("data", "noise"),
        lambda a, t, p: network_input(a["data"], a["noise"], t, backend="triton"),
    ),
    "diffusion_to_velocity": (
        ("model_output", "x"),
        lambda a, t, p: diffusion_to_velocity(a["model_output"], a["x"], t, p),
    ),
    "velocity_to_diffusion": (("velocity", "x"), lambda a, t, p: velocity_to_diffusion(a["velocity"], a["x"], t, p)),
    "guidance": (("uncond", "cond"), lambda a, t, p: guidance(a["uncond"], a["cond"], 7.5)),
}
# Every public function that takes tensors: the helpers and the loss.
PUBLIC = {
    **HELPERS,
    **{
        f"fm_loss{suffix}": (
            ("model_output", "data", "noise"),
            lambda a, t, p, backend=backend: fm_loss(a["model_output"], a["data"], a["noise"], t, p, backend=backend),
        )
        for suffix, backend in (("", "torch"), ("[triton]", "triton"))
    },
}


def function_name(key: str) -> str:
    return key.split("[")[0]


def helper_dtypes(key: str) -> list[torch.dtype]:
    return DTYPES["triton" if key.endswith("[triton]") else "torch"]


@pytest.mark.parametrize("helper", list(HELPERS))
@settings(max_examples=25)
@given(shapes, BAD, st.sampled_from(PREDICTION_TYPES), inner_times, st.data())
def test_elementwise_helpers_name_the_non_finite_input(helper, shape, bad, prediction_type, t, data):
    names, call = HELPERS[helper]
    dtype = data.draw(st.sampled_from(helper_dtypes(helper)), label="dtype")
    args = dict(zip(names, data.draw(inputs(shape, dtype, len(names)))))
    name = data.draw(st.sampled_from(names), label="bad tensor")
    target = args[name].view(-1)
    target[data.draw(st.integers(0, target.numel() - 1), label="position")] = bad
    with pytest.raises(NonFiniteError, match=f"^{function_name(helper)}: {name} contains NaN or inf$"):
        call(args, t, prediction_type)


BIG = 3e38  # finite in float32, but scaled by sqrt(2), doubled or summed it is not
OVERFLOWS = {
    "align": lambda big: align(big, 0.5),
    "target_velocity": lambda big: target_velocity(big, -big),
    "network_input": lambda big: network_input(big, big, 0.5, backend="torch"),
    "network_input[triton]": lambda big: network_input(big, big, 0.5, backend="triton"),
    "velocity_to_diffusion": lambda big: velocity_to_diffusion(-big, big, 0.5, "epsilon"),  # x - t*u
    "guidance": lambda big: guidance(-big, big, 2.0),
}


@pytest.mark.parametrize("helper", list(OVERFLOWS))
def test_overflow_from_finite_inputs_is_reported(helper):
    """Each returned inf for these finite float32 inputs (interpolate, a convex combination, cannot overflow)."""
    message = rf"^{function_name(helper)}: .* overflowed torch.float32 .* although the inputs are finite"
    with pytest.raises(ValueError, match=message):
        OVERFLOWS[helper](torch.full((2, 3), BIG))


@pytest.mark.parametrize(
    "backend, dtype, value",
    [("torch", torch.float16, 6e4), ("triton", torch.float16, 6e4), ("torch", torch.bfloat16, 2.5e38)],
)
def test_network_input_overflowing_the_network_dtype_names_it(backend, dtype, value):
    """network_input(..., dtype=torch.float16) returned inf once alpha*data + sigma*noise passed 65504."""
    x = torch.full((2, 3), value)
    with pytest.raises(ValueError, match=rf"^network_input: the network input overflowed {dtype} \(largest"):
        network_input(x, x, 0.5, dtype=dtype, backend=backend)


@pytest.mark.parametrize("function", list(PUBLIC))
def test_complex_tensors_are_refused_by_name(function):
    """A complex data tensor lost its imaginary part in the cast to the compute dtype, without a word."""
    names, call = PUBLIC[function]
    for name in names:
        args = {n: tensor((2, 3), seed=i).float() for i, n in enumerate(names)}
        args[name] = torch.complex(args[name], args[name])
        with pytest.raises(ValueError, match=rf"^{name} must be a real tensor, got dtype torch.complex64$"):
            call(args, 0.5, "v_prediction")


@pytest.mark.parametrize("ts", [torch.tensor([0.0, 0.5, 1.0], dtype=torch.complex128), np.array([0, 0.5j, 1])])
def test_a_complex_grid_is_refused(ts):
    with pytest.raises(ValueError, match="^ts must be real"):
        grid_steps(ts)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float16", float])
def test_network_input_refuses_a_dtype_that_is_no_floating_torch_dtype(backend, dtype):
    """dtype=torch.int32 returned integers; dtype='float16' said 'Invalid device string'."""
    x = torch.ones(2, 3)
    allowed = "allowed: torch.float16, torch.bfloat16, torch.float32, torch.float64"
    with pytest.raises(ValueError, match=rf"^dtype={re.escape(repr(dtype))} is not supported; {allowed}$"):
        network_input(x, x, 0.5, dtype=dtype, backend=backend)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(0,), (0, 3), (0, 2, 3), (2, 0)])
def test_fm_loss_of_an_empty_batch_is_refused(backend, reduction, shape):
    """An IndexError (torch) or ZeroDivisionError (triton) from deep inside."""
    x = torch.zeros(shape)
    with pytest.raises(ValueError, match=rf"^model_output has shape {re.escape(str(shape))}: fm_loss needs at least"):
        fm_loss(x, x, x, 0.5, "velocity", reduction=reduction, backend=backend)


@pytest.mark.parametrize("helper", list(HELPERS))
@pytest.mark.parametrize("shape", [(0,), (0, 3), (2, 0)])
def test_elementwise_helpers_map_an_empty_batch_to_an_empty_result(helper, shape):
    """The network_input kernel divided by the batch size (ZeroDivisionError); the torch path returns it empty."""
    names, call = HELPERS[helper]
    out = call({name: torch.zeros(shape) for name in names}, 0.5, "v_prediction")
    assert out.shape == shape


# ---------------------------------------------------------------- the bugs these sweeps found, pinned
# The sweeps reach these points only in some runs; each was a silent inf/NaN or a wrong value before its fix.
@pytest.mark.parametrize("t", [5e-324, 2.0**-1074 * 3])
def test_epsilon_coefficients_overflowing_float64_raise_naming_t(t):
    """1/t overflows float64 for subnormal t: velocity_coefficients returned inf (parametrization.py)."""
    with pytest.raises(ValueError, match=f"gives no finite velocity at t={t!r}"):
        velocity_coefficients(t, "epsilon")


@pytest.mark.parametrize("t", [2.0**-149, 2.0**-126, 1e-37])
def test_epsilon_velocity_overflowing_float32_raises_naming_t(t):
    """diffusion_to_velocity returned inf: 1/t overflows float32 (2^-149, 2^-126), or A*x does (1e-37)."""
    x = torch.full((2, 3), MAGNITUDE)
    with pytest.raises(ValueError, match=f"overflowed torch.float32 .* at t={t!r}"):
        diffusion_to_velocity(x / 2, x, t, "epsilon")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_loss_overflow_names_t(backend):
    """The overflow error named only the tensors and the weight; here t = 1e-30 is the cause."""
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=r"loss overflowed .* at t=1e-30"):
        fm_loss(2 * x, x, 3 * x, torch.tensor([0.5, 1e-30], dtype=torch.float64), "epsilon", backend=backend)


@pytest.mark.parametrize("t", [1 - 1e-7, 1 - 1e-10, math.nextafter(1.0, 0.0)])
def test_triton_loss_forms_its_coefficients_from_float64_t(t):
    """The kernel formed 1/(1-t) from a float32 t: 30% off at 1 - 1e-7, a spurious overflow error beyond."""
    o, clean, noise = (tensor((2, 70), seed=i).float() for i in range(3))
    loss = fm_loss(o, clean, noise, t, "sample", backend="triton")
    ref = reference_loss(o, clean, noise, torch.tensor([t, t], dtype=torch.float64), "sample", None, "mean")
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_noise_term_survives_next_to_t1(backend):
    """interpolate (lerp) and the network_input kernel formed 1 - t from a float32 t: 0 instead of 1e-6 here."""
    clean, noise = torch.zeros(2, 3), torch.full((2, 3), MAGNITUDE)
    t = 1 - 1e-10
    sigma = float(alpha_sigma(t)[1])
    torch.testing.assert_close(network_input(clean, noise, t, backend=backend), sigma * noise, rtol=1e-6, atol=0)
    torch.testing.assert_close(interpolate(clean, noise, t), (1 - t) * noise, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_step_coefficient_beyond_float32_reports_the_overflow(backend):
    """The torch path raised a bare RuntimeError ("value cannot be converted to type float without overflow")."""
    x = torch.ones(2, 3)
    with pytest.raises(ValueError, match=STEP_OVERFLOW):
        ode_step(EULER, x, x, None, None, 1e300, -1e300, 0.5, 1.0, 1.0, torch.float32, backend=backend)


def test_fm_time_next_to_the_last_timestep_is_not_rounded_away():
    """fm_time once shifted k by one before taking its fraction; at k = T - 4e-15 that rounding turned
    t = 2e-15 into 0 (found by test_fm_time in a CI run). The fraction now comes from k itself, so the error
    is a rounding of tau (<= 1), well inside 4 eps, where the old code was off by 2e-15."""
    schedule = Schedule.linear(32)
    ks, taus = tau_table(schedule)
    for k in (np.nextafter(32.0, 0.0), 31.999999999999996, np.nextafter(31.0, 32.0), 0.5, np.nextafter(0.0, -1.0)):
        error = abs(float(schedule.fm_time(float(k))) - np.interp(k, ks, taus))
        assert error <= 4 * np.finfo(np.float64).eps, (k, error)
