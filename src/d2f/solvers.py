"""The sampler: ODE solvers for ``dx/dt = u(x, t)`` over an explicit grid of FM times (``d2f.grids``).

Two kinds of field are sampled by the same loops, through the interface of :class:`Field`:

- a plain ``velocity_fn(x, t, **cond) -> u``: its network input is the state itself and its output the
  velocity (:class:`VelocityFunction`);
- a converted diffusion network (:class:`d2f.D2FVelocity`): its input is ``z = scale(t) * x`` and its raw
  outputs ``o_u`` (and ``o_c`` when guided, ``o = o_u + g*(o_c - o_u)``) give ``u = A(t)*x + B(t)*o``.

The solvers (one loop, :func:`integrate`, takes them all):

- ``euler`` (order 1): ``x' = x + h*u(x, t0)``;
- ``heun`` and ``midpoint`` (order 2), the explicit two-stage family with predictor fraction ``c`` (1 and
  1/2): ``x_p = x + c*h*u1``, ``u2 = u(x_p, t0 + c*h)``, ``x' = x + h*((1 - w)*u1 + w*u2)`` with
  ``w = 1/(2c)``. Heun's corrector is skipped on a step that ends at a singular time of the field, which
  then is a plain Euler step.
- ``multistep`` (order 2, one evaluation per step), Adams-Bashforth 2 on grids of any spacing:
  ``x' = x + h*((1 + k)*u - k*u_prev)`` with ``k = h / (2*h_prev)``, the velocity and step size of the step
  before; the first step is Euler (``k = 0``). ``docs/conventions.md`` §5 derives it.

Every update is :func:`ode_step`, written once here in torch and mirrored by the fused kernel in
``d2f.kernels.solvers``: guidance, conversion, update and the next network input in one pass per network
call. A plain velocity is the case ``A = 0, B = 1, g = 1``.

A field may declare ``singular_times`` (FM times where it cannot be evaluated); a plain function that
declares nothing is treated as singular at both ends, 0 and 1.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._backend import BACKENDS, kernels, use_triton
from ._checks import NonFiniteError, check_bool, check_choice, compute_dtype, describe, nonfinite_input
from ._chunks import row_chunks
from .deferred import deferred_checks, deferring, verify
from .grids import grid_steps
from .parametrization import velocity_to_diffusion
from .path import alpha_sigma, relabel_ratio, scale

SOLVERS = ("euler", "heun", "midpoint", "multistep")
PREDICTOR_FRACTION = {"heun": 1.0, "midpoint": 0.5}
EULER, PREDICT, CORRECT, MULTISTEP = 0, 1, 2, 3
Callback = Callable[[int, float, Tensor, Tensor], None]


# ------------------------------------------------------------------------------------------------ the update
def ode_step(
    mode: int,
    x: Tensor,
    o_u: Tensor,
    o_c: Tensor | None,
    u1: Tensor | None,
    a: float,
    b: float,
    h: float,
    g: float,
    s_next: float,
    z_dtype: torch.dtype,
    backend: str = "auto",
    c: float = 1.0,
    k: float = 0.0,
) -> tuple[Tensor, ...]:
    """One solver update from the state ``x`` and one network evaluation, with the next network input.

    With ``o = o_u + g*(o_c - o_u)`` when guided (``o_c`` given), else ``o = o_u``, ``u = A*x + B*o`` and
    ``s`` = ``s_next``:

    - ``EULER``: ``x' = x + h*u``; returns ``(x', s*x')``;
    - ``PREDICT``: returns ``(u, s*(x + c*h*u))``, the velocity and the predictor's network input;
    - ``CORRECT`` (``o`` evaluated at the predictor): ``u2 = A*(x + c*h*u1) + B*o``,
      ``x' = x + h*((1 - w)*u1 + w*u2)`` with ``w = 1/(2c)``; returns ``(x', s*x')``;
    - ``MULTISTEP`` (``u1`` the previous step's velocity, or None with ``k = 0``):
      ``x' = x + h*((1 + k)*u - k*u1)``; returns ``(x', s*x', u)``, ``u`` for the next step.

    ``x`` (and ``u1``) are the float32 or float64 state; the results are fresh tensors, the first in the
    state's dtype and the network input in ``z_dtype``. ``backend`` as in :func:`d2f.fm_loss`; a step through
    which autograd must differentiate (grad mode on and an input requiring grad) runs on the torch path, and
    ``backend="triton"`` refuses it. Raises a ``ValueError`` instead of returning NaN or inf: naming ``x``,
    ``o_u``, ``o_c`` or ``u1`` when one of them holds NaN or inf, else saying that the step overflowed.
    """
    outputs = (o_u,) if o_c is None else (o_u, o_c)
    if mode == MULTISTEP and u1 is None and k != 0:
        raise ValueError(f"ode_step: k={k!r} weighs the previous velocity u1, which is None; the first step has k=0")
    if torch.is_grad_enabled() and any(v is not None and v.requires_grad for v in (x, o_u, o_c, u1)):
        if backend == "triton":
            raise ValueError(
                "backend='triton' does not differentiate the ODE step, and an input requires grad; use "
                "backend='auto' or 'torch', or sample under torch.no_grad()"
            )
        backend = "torch"
    # The message is formed only on failure: ode_step runs once per network call.
    overflow = functools.partial(_step_overflow, x.dtype, z_dtype, a=a, b=b, h=h, g=g, s_next=s_next, k=k)
    if use_triton(backend, x, *outputs):
        *results, flags = kernels().ode_step(mode, x.contiguous(), o_u, o_c, u1, a, b, h, g, s_next, z_dtype, c, k)
        verify(flags, functools.partial(_named_step_error, overflow))
        return tuple(results)
    results = _ode_step_torch(mode, x, o_u, o_c, u1, a, b, h, g, s_next, z_dtype, c, k)
    results_bad = ~(results[0].isfinite().all() & results[1].isfinite().all())
    if deferring():  # the inputs may be gone when the flags are read, so each gets its own flag now
        none = results_bad.new_zeros(())
        inputs_bad = [~v.isfinite().all() if v is not None else none for v in (x, o_u, o_c, u1)]
        verify(torch.stack([*inputs_bad, results_bad]), functools.partial(_named_step_error, overflow))
    else:  # read at once: the inputs are still here, and scanned only once a result is bad

        def error(bad: list[bool]) -> ValueError | None:
            if not bad[0]:
                return None
            return nonfinite_input("ode_step", x=x, o_u=o_u, o_c=o_c, u1=u1) or overflow()

        verify(results_bad, error)
    return tuple(results)


# The flags of ode_step when they are read later: one per input (the kernel takes them from the values it
# loads anyway), then one for the results (the fresh state or velocity and the next network input).
STEP_FLAGS = ("x", "o_u", "o_c", "u1")


def _named_step_error(overflow: Callable[[], ValueError], bad: list[float]) -> ValueError | None:
    for name, flag in zip(STEP_FLAGS, bad):
        if flag:
            return NonFiniteError("ode_step", name)
    return overflow() if bad[len(STEP_FLAGS)] else None


def _step_overflow(dtype: torch.dtype, z_dtype: torch.dtype, **scalars: float) -> ValueError:
    values = ", ".join(f"{name}={value!r}" for name, value in scalars.items())
    return ValueError(
        f"ode_step: the step overflowed (its result is not representable in {dtype}, or the next network input "
        f"in {z_dtype}) although the inputs are finite; {values}"
    )


def _ode_step_torch(mode, x, o_u, o_c, u1, a, b, h, g, s_next, z_dtype, c, k) -> tuple[Tensor, ...]:
    # Each result is a fixed linear combination of the inputs: the scalars are folded into one coefficient
    # per input and the sum formed in one accumulation.
    o_terms = [(1.0, o_u)] if o_c is None else [(1 - g, o_u), (g, o_c)]
    if mode == EULER:
        return _combine([(1 + h * a, x)] + [(h * b * k, v) for k, v in o_terms], [(1.0, x.dtype), (s_next, z_dtype)])
    if mode == PREDICT:
        (u,) = _combine([(a, x)] + [(b * k, v) for k, v in o_terms], [(1.0, x.dtype)])
        (z,) = _combine([(1.0, x), (c * h, u)], [(s_next, z_dtype)])
        return u, z
    if mode == MULTISTEP:
        (u,) = _combine([(a, x)] + [(b * q, v) for q, v in o_terms], [(1.0, x.dtype)])
        history = [] if u1 is None else [(-h * k, u1)]
        return (*_combine([(1.0, x), (h * (1 + k), u)] + history, [(1.0, x.dtype), (s_next, z_dtype)]), u)
    w = 0.5 / c  # x + h*(1-w)*u1 + h*w*(A*(x + c*h*u1) + B*o), expanded per input
    terms = [(1 + h * w * a, x), (h * ((1 - w) + w * a * c * h), u1)] + [(h * w * b * k, v) for k, v in o_terms]
    return _combine(terms, [(1.0, x.dtype), (s_next, z_dtype)])


def _combine(terms: list[tuple[float, Tensor]], outputs: list[tuple[float, torch.dtype]]) -> list[Tensor]:
    """``s * sum(k * v for k, v in terms)`` in ``dtype`` for every ``(s, dtype)`` of ``outputs``, accumulated in
    ``terms[0]``'s dtype: in cache-sized chunks on the CPU (d2f._chunks), or with plain differentiable ops
    when an input requires grad (sampling through which a caller backpropagates)."""
    first = terms[0][1]
    if torch.is_grad_enabled() and any(v.requires_grad for _, v in terms):
        acc = sum((k * v for k, v in terms[1:]), terms[0][0] * first)
        return [(s * acc).to(dtype) for s, dtype in outputs]
    # torch refuses a Python scalar beyond the accumulator's range (a RuntimeError); round it as IEEE and the
    # kernel do, to inf, so that ode_step's check of its result reports the overflow.
    big = torch.finfo(first.dtype).max
    terms = [(math.copysign(math.inf, k) if abs(k) > big else k, v) for k, v in terms]
    results = [torch.empty(first.shape, dtype=dtype, device=first.device) for _, dtype in outputs]
    for rows in row_chunks(first):
        acc = torch.mul(first[rows], terms[0][0])
        for k, v in terms[1:]:
            acc.add_(v[rows], alpha=k)
        for (s, _), out in zip(outputs, results):
            torch.mul(acc, s, out=out[rows])
    return results


def ddim_step(
    x: Tensor,
    u: Tensor,
    t: float,
    t_next: float,
    eta: float = 0.0,
    noise: Tensor | None = None,
    clip: Callable[[Tensor], Tensor] | None = None,
    clipped_noise: bool = False,
) -> tuple[Tensor, Tensor]:
    """DDIM's own transition from FM time ``t`` to ``t_next``, written in the FM state; returns ``(x', data)``.

    From the velocity ``u`` at state ``x``: the data prediction ``D = x + (1-t)*u`` and the noise prediction
    ``E = x - t*u`` (``velocity_to_diffusion`` for ``sample`` and ``epsilon``). ``clip`` maps ``D`` to the
    clipped ``D_c`` (DDIM's ``clip_sample`` / ``thresholding``); ``clipped_noise`` then re-derives
    ``E = (x - t*D_c)/(1 - t)`` (``use_clipped_model_output``). With ``alpha, sigma`` of ``t`` and
    ``alpha', sigma'`` of ``t_next`` and DDIM's ``std = eta * (sigma'/sigma) * sqrt(1 - (alpha/alpha')^2)``:

        x' = (alpha' * D_c + sqrt(sigma'^2 - std^2) * E + std * noise) / scale(t_next)

    since DDIM's latent is ``z = scale(t) * x``. With ``eta = 0`` and no clipping this is the Euler step
    ``x + (t_next - t)*u`` (docs/conventions.md §5). ``noise`` is needed when ``eta > 0``.
    """
    data = velocity_to_diffusion(u, x, t, "sample")
    eps = velocity_to_diffusion(u, x, t, "epsilon")
    if clip is not None:
        data = clip(data)
        if clipped_noise:
            eps = (x - t * data) / (1 - t)
    (alpha, sigma), (alpha_next, sigma_next) = (map(float, alpha_sigma(v)) for v in (t, t_next))
    std = eta * sigma_next / sigma * math.sqrt(max(0.0, 1 - (alpha / alpha_next) ** 2)) if eta else 0.0
    if std > sigma_next:
        raise ValueError(
            f"eta={eta!r} is too large for the step from t={t!r} to t={t_next!r}: its noise std {std:.4g} "
            f"exceeds the target noise level {sigma_next:.4g}"
        )
    z = alpha_next * data + math.sqrt(sigma_next**2 - std**2) * eps
    if std:
        if noise is None:
            raise ValueError(f"eta={eta!r} > 0 needs noise")
        z = z + std * noise.to(z.dtype)
    x_next = z / float(scale(t_next))

    def error(bad: list[float]) -> ValueError | None:
        if not bad[0]:
            return None
        message = f"ddim_step: the step from t={t!r} to t={t_next!r} overflowed although the inputs are finite"
        return nonfinite_input("ddim_step", x=x, u=u, noise=noise) or ValueError(message)

    verify(~x_next.isfinite().all(), error)
    return x_next, data


def multistep_history(previous: tuple[Tensor, float] | None, h: float) -> tuple[Tensor | None, float]:
    """The multistep update's ``(u1, k)`` for a step of size ``h`` after the step ``previous = (u, h_prev)``:
    ``k = h / (2*h_prev)``; none and 0 (Euler) on the first step."""
    return (None, 0.0) if previous is None else (previous[0], 0.5 * h / previous[1])


def stage_times(solver: str, t0: float, t1: float, singular: Sequence[float]) -> tuple[float, ...]:
    """The FM times at which a step from ``t0`` to ``t1`` evaluates the field: ``t0``, then the predictor's
    point ``t0 + c*h`` (``t1`` itself for Heun), unless that point is singular, the solver is Euler or the
    step does not move (DDIM's identity last step, which ``D2FScheduler`` takes). A multistep step
    evaluates once, at its start."""
    if solver in ("euler", "multistep") or t0 == t1:
        return (t0,)
    c = PREDICTOR_FRACTION[solver]
    t_mid = t1 if c == 1 else t0 + c * (t1 - t0)
    return (t0,) if t_mid in singular else (t0, t_mid)


# ---------------------------------------------------------------------------------------------- the fields
class Outputs(NamedTuple):
    """One evaluation, as :func:`ode_step` takes it: ``u = a*x + b*o`` with ``o = o_u + g*(o_c - o_u)``."""

    o_u: Tensor
    o_c: Tensor | None
    a: float
    b: float
    g: float


class Field(Protocol):
    """What the solvers need of a field."""

    singular_times: tuple[float, ...]

    def input_scale(self, t: float) -> float:
        """``s`` with network input ``z = s * x``."""

    def input_dtype(self, state: Tensor) -> torch.dtype:
        """The network input's dtype."""

    def model_input(self, x: Tensor, t: float) -> Tensor:
        """The network input of state ``x`` at ``t``."""

    def outputs(self, z: Tensor, t: float, cond: Mapping[str, Any]) -> Outputs:
        """The evaluation at network input ``z`` and time ``t``."""

    def __call__(self, x: Tensor, t: float, **cond: Any) -> Tensor:
        """The velocity at state ``x`` and time ``t``."""


class VelocityFunction:
    """A plain ``velocity_fn(x, t, **cond) -> u`` as a :class:`Field`: its network input is the state."""

    def __init__(self, velocity_fn: Callable[..., Tensor]):
        if not callable(velocity_fn):
            raise ValueError(f"velocity_fn must be callable, got {type(velocity_fn).__name__}")
        self.velocity_fn = velocity_fn
        self.singular_times = tuple(getattr(velocity_fn, "singular_times", (0.0, 1.0)))

    def input_scale(self, t: float) -> float:
        return 1.0

    def input_dtype(self, state: Tensor) -> torch.dtype:
        return state.dtype

    def model_input(self, x: Tensor, t: float) -> Tensor:
        return x

    def outputs(self, z: Tensor, t: float, cond: Mapping[str, Any]) -> Outputs:
        return Outputs(self(z, t, **cond), None, 0.0, 1.0, 1.0)

    def __call__(self, x: Tensor, t: float, **cond: Any) -> Tensor:
        u = self.velocity_fn(x, t, **cond)
        if not isinstance(u, Tensor) or u.shape != x.shape:
            raise ValueError(
                f"velocity_fn returned {describe(u) if isinstance(u, Tensor) else type(u).__name__} "
                f"for a state of shape {tuple(x.shape)}; it must return a tensor of the same shape"
            )
        if u.device != x.device:
            raise ValueError(f"velocity_fn returned a tensor on {u.device} for a state on {x.device}")
        if u.is_complex():  # the cast to the state's dtype would drop the imaginary part without a word
            raise ValueError(f"velocity_fn returned a complex tensor ({u.dtype}) at t={t!r}; a velocity must be real")
        return u.to(x.dtype)


def _as_field(field: Any, callback: Callback | None) -> Field:
    """Fields are used as they are; plain functions, and any field when a callback needs each velocity
    (the fused update never forms it), are sampled through their velocity."""
    if callback is None and all(hasattr(field, name) for name in ("outputs", "model_input", "input_scale")):
        return field
    return field if isinstance(field, VelocityFunction) else VelocityFunction(field)


# --------------------------------------------------------------------------------------------- the solvers
def _carry(field: Field, x: Tensor, z: Tensor, t_from: float, t_to: float) -> tuple[Tensor, Tensor]:
    """Across a gap of a DDIM step table DDIM keeps its latent and relabels its time: ``scale(t) * x`` is
    kept fixed (``d2f.grids.ddim_grid``)."""
    if t_from == t_to:
        return x, z
    x = x * relabel_ratio(t_from, t_to)
    return x, field.model_input(x, t_to)


def _step(mode: int, field: Field, x: Tensor, out: Outputs, u1, h: float, t_next, z_dtype, backend, c=1.0, k=0.0):
    s = field.input_scale(t_next)
    return ode_step(mode, x, out.o_u, out.o_c, u1, out.a, out.b, h, out.g, s, z_dtype, backend, c, k)


# ode_step's inputs (and D2FVelocity's, for a field sampled through its velocity), as the caller of sample
# knows them.
STEP_INPUTS = {
    "x": "the state",
    "o_u": "the model's output",
    "model_output": "the model's output",
    "uncond": "the model's output",
    "o_c": "the model's conditional output",
    "cond": "the model's conditional output",
    "u1": "the first-stage velocity",  # multistep: the previous step's velocity
}


def integrate(field: Field, x: Tensor, z: Tensor, steps, solver: str, cond, callback, progress, backend) -> Tensor:
    """The one loop of every solver: state ``x`` and its network input ``z`` from the first step's start to
    the last step's end. A step evaluates the field at each of its :func:`stage_times`: once for Euler (and
    for Heun on a step ending at a singular time), twice for the two-stage solvers."""
    end, z_dtype = steps[0][0], field.input_dtype(x)
    previous = None  # multistep: the velocity and size of the step before
    with deferred_checks() as checks:  # no host synchronisation inside the loop; read once after it
        for i, (t0, t1) in enumerate(tqdm(steps, disable=not progress, desc=f"d2f {solver}", unit="step")):
            where = f"sample: step {i + 1} of {len(steps)} ({solver}, t {t0:.6g} -> {t1:.6g})"
            x, z = _carry(field, x, z, end, t0)
            h, times = t1 - t0, stage_times(solver, t0, t1, field.singular_times)
            with checks.within(functools.partial(_at_step, where)), _named_errors(where):
                out = field.outputs(z, t0, cond)
                if callback is not None:
                    callback(i, t0, x, out.o_u)  # the field is in velocity form whenever there is a callback
                if solver == "multistep":
                    u_prev, k = multistep_history(previous, h)
                    x, z, u = _step(MULTISTEP, field, x, out, u_prev, h, t1, z_dtype, backend, k=k)
                    previous = (u, h)
                elif len(times) == 1:
                    x, z = _step(EULER, field, x, out, None, h, t1, z_dtype, backend)
                else:
                    c = PREDICTOR_FRACTION[solver]
                    u1, z_p = _step(PREDICT, field, x, out, None, h, times[1], z_dtype, backend, c)
                    out_p = field.outputs(z_p, times[1], cond)
                    x, z = _step(CORRECT, field, x, out_p, u1, h, t1, z_dtype, backend, c)
            end = t1
    return x


@contextlib.contextmanager
def _named_errors(where: str) -> Iterator[None]:
    """An error an evaluation raises at once (a field's output refused, say) names its step, as a deferred
    check's does (``_at_step``)."""
    try:
        yield
    except ValueError as error:
        named = _at_step(where, error)
        if named is error:
            raise
        raise named from error


def _at_step(where: str, error: Exception) -> Exception:
    """A step's error as the caller of ``sample`` reads it: ode_step's argument names mean nothing to them."""
    if isinstance(error, NonFiniteError):
        return NonFiniteError(where, STEP_INPUTS.get(error.tensor, error.tensor))
    return ValueError(f"{where}: {error}") if type(error) is ValueError else error


def _solve(field, x: Tensor, steps, solver, cond, callback, progress, backend) -> Tensor:
    for i, (start, _) in enumerate(steps):
        if start in field.singular_times:
            raise ValueError(
                f"step {i} starts at t={start}, where velocity_fn is singular "
                f"(singular_times={tuple(field.singular_times)}); start the grid inside the open interval, "
                "e.g. at schedule.t_min"
            )
    gaps = [i for i in range(1, len(steps)) if steps[i][0] != steps[i - 1][1]] if solver == "multistep" else []
    if gaps:
        raise ValueError(
            f"solver='multistep' needs steps that chain, and step {gaps[0]} starts at t={steps[gaps[0]][0]}, not "
            f"where step {gaps[0] - 1} ended (t={steps[gaps[0] - 1][1]}): a DDIM step table with gaps; use a 1-D "
            "grid (leading spacing, or an FM grid) or another solver"
        )
    return integrate(field, x, field.model_input(x, steps[0][0]), steps, solver, cond, callback, progress, backend)


def sample(
    velocity_fn: Callable[..., Tensor],
    x: Tensor,
    ts: Tensor | Sequence[float],
    solver: str = "euler",
    callback: Callback | None = None,
    progress: bool = False,
    backend: str = "auto",
    **cond: Any,
) -> Tensor:
    """Integrate from ``ts[0]`` to ``ts[-1]`` and return the final state only.

    Args:
        velocity_fn: ``u = velocity_fn(x, t, **cond)``, or a :class:`d2f.D2FVelocity` (then each step is one
            fused update per network call).
        x: the FM state at ``ts[0]``. From pure noise at ``ts[0] > 0`` start with ``noise / scale(ts[0])``,
            as DDIM does (``D2FVelocity.sample`` does this for you).
        ts: a grid from :mod:`d2f.grids`; increasing generates, decreasing inverts (data -> noise).
        solver: ``"euler"`` (order 1), ``"heun"`` or ``"midpoint"`` (order 2, two evaluations per step) or
            ``"multistep"`` (order 2, one evaluation per step; needs steps that chain).
        callback: ``callback(i, t, x, u)`` before step ``i`` with the state and velocity at its start.
        progress: show a progress bar.
        backend: for the update, as in :func:`d2f.fm_loss`.
        cond: passed to every evaluation of the field.

    The state is kept in float32 (float64 if ``x`` is float64); the caller's ``x`` is never modified.
    """
    check_choice("solver", solver, SOLVERS)
    if not isinstance(x, Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback={callback!r} must be callable or None")
    check_bool("progress", progress)  # a truthy "no" would show the bar
    check_choice("backend", backend, BACKENDS)  # else refused at the first update, inside step 1
    field = _as_field(velocity_fn, callback)
    return _solve(field, x.to(compute_dtype(x)), grid_steps(ts), solver, cond, callback, progress, backend)
