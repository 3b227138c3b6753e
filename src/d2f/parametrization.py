"""Prediction types: the one table of their names, and the velocity from a network's output and back
(``docs/conventions.md`` §3).

Every prediction type is affine in the output ``o``: ``u = A(t)*x + B(t)*o``.

==================  ===================  ====================  ==============
prediction_type     A(t)                 B(t)                  singular at
==================  ===================  ====================  ==============
``epsilon``         ``1/t``              ``-1/t``              t = 0
``v_prediction``    ``(2t-1)/n^2``       ``-1/n``              never
``sample``          ``-1/(1-t)``         ``1/(1-t)``           t = 1
``velocity``        ``0``                ``1``                 never
==================  ===================  ====================  ==============

The inverse ``o = C(t)*x + D(t)*u`` is finite on all of [0, 1].
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import (
    TimeLike,
    as_time,
    check_choice,
    check_finite_result,
    check_same_shape,
    compute_dtype,
    describe,
    per_sample,
)
from .deferred import verify
from .path import norm, norm_squared

# The vocabulary, in one table: each type's singular FM times. The order is also the kernels' compile-time
# code for it (d2f.kernels). ``velocity`` is d2f's own: the naive-FM baseline reads the output as the velocity.
SINGULAR_TIMES = {"epsilon": (0.0,), "v_prediction": (), "sample": (1.0,), "velocity": ()}
PREDICTION_TYPES = tuple(SINGULAR_TIMES)
DIFFUSERS_PREDICTION_TYPES = PREDICTION_TYPES[:3]  # what a diffusers scheduler config may name
# How far training and the uniform sampling grids stay from a singular end, so that |A|, |B| <= 1/T_MARGIN.
T_MARGIN = 1e-3


def check_prediction_type(prediction_type: str) -> str:
    return check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def valid_range(prediction_type: str) -> tuple[float, float]:
    """The interval of t that training draws from and the uniform grids start in: ``[0, 1]`` shrunk by
    ``T_MARGIN`` at each singular end of ``prediction_type``."""
    singular = SINGULAR_TIMES[check_prediction_type(prediction_type)]
    return (T_MARGIN if 0.0 in singular else 0.0), (1 - T_MARGIN if 1.0 in singular else 1.0)


def velocity_coefficients(t: TimeLike, prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``u = A*x + B*o``, as float64 tensors shaped like ``t``.

    Raises ``ValueError`` where the map is singular (epsilon at t = 0, sample at t = 1) instead of
    returning inf or NaN.
    """
    return velocity_coefficients_checked(as_time(t), prediction_type)


def velocity_coefficients_checked(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """:func:`velocity_coefficients` for a ``t`` already checked by ``as_time`` (float64)."""
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        a, b = 1 / tt, -1 / tt
    elif prediction_type == "sample":
        a, b = -1 / (1 - tt), 1 / (1 - tt)
    elif prediction_type == "v_prediction":
        n = norm(tt)
        return (2 * tt - 1) / (n * n), -1 / n
    else:
        return tt * 0, tt * 0 + 1
    # |A| = |B| = 1/t (or 1/(1-t)): inf at the singular end, and it overflows float64 just beside it too
    # (t below 2**-1024, subnormal), so one finiteness check covers both.
    verify(~b.isfinite().all(), lambda bad: _singular_error(tt, b, prediction_type) if bad[0] else None)
    return a, b


def _singular_error(tt: Tensor, b: Tensor, prediction_type: str) -> ValueError:
    (end,) = SINGULAR_TIMES[prediction_type]
    keep = f"keep t {'> 0' if end == 0 else '< 1'}: samplers should start at schedule.t_min or later"
    if bool((tt == end).any()):
        return ValueError(
            f"prediction_type={prediction_type!r} gives no velocity at t={end} (got t={describe(tt)}); {keep}"
        )
    first = tt.reshape(-1)[~b.reshape(-1).isfinite()][0].item()
    return ValueError(
        f"prediction_type={prediction_type!r} gives no finite velocity at t={first!r}: so close to the "
        f"singular end t={end} its coefficient overflows float64 (got t={describe(tt)}); {keep}"
    )


def overflow_error_checked(message: str, tt: Tensor, prediction_type: str) -> ValueError:
    """``message`` (a result overflowed although every input is finite) and the t that scales the most.

    ``tt`` must already be checked by ``as_time`` and be non-singular (float64).
    """
    a, b = velocity_coefficients_checked(tt.reshape(-1), prediction_type)
    size = torch.maximum(a.abs(), b.abs())
    i = int(size.argmax())
    return ValueError(
        f"{message}; prediction_type={prediction_type!r} scales by up to {size[i].item():.3g}, at "
        f"t={tt.reshape(-1)[i].item()!r}: keep t away from a singular end (epsilon: t = 0, sample: t = 1) "
        "or reduce the magnitudes of the inputs"
    )


def residual_coefficients_checked(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(P, Q, B)`` with ``u_hat - (data - noise) = B*o + P*data + Q*noise`` for ``x = t*data + (1-t)*noise``.

    ``P = A*t - 1`` and ``Q = A*(1-t) + 1``, simplified per type so that no cancellation is left:
    epsilon ``(0, 1/t, -1/t)``; sample ``(-1/(1-t), 0, 1/(1-t))``; v ``((t-1)/n^2, t/n^2, -1/n)``;
    velocity ``(-1, 1, 1)``. ``tt`` must already be checked by ``as_time``; raises where singular.
    """
    _, b = velocity_coefficients_checked(tt, prediction_type)
    if prediction_type == "epsilon":
        return tt * 0, 1 / tt, b
    if prediction_type == "sample":
        return -1 / (1 - tt), tt * 0, b
    if prediction_type == "v_prediction":
        n2 = norm_squared(tt)
        return (tt - 1) / n2, tt / n2, b
    return tt * 0 - 1, tt * 0 + 1, b


def output_coefficients_checked(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(C, D)`` with ``o = C*x + D*u``: the inverse map, finite for every t in [0, 1].

    ``tt`` must already be checked by ``as_time`` (float64).
    """
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return tt * 0 + 1, -tt
    if prediction_type == "sample":
        return tt * 0 + 1, 1 - tt
    if prediction_type == "v_prediction":
        n = norm(tt)
        return (2 * tt - 1) / n, -n
    return tt * 0, tt * 0 + 1


def affine_combination(a: Tensor, b: Tensor, x: Tensor, y: Tensor) -> Tensor:
    """``a*x + b*y`` with per-sample ``a``, ``b`` (on ``x``'s device, as ``as_time`` puts them), computed in at
    least float32."""
    dtype = compute_dtype(x, y)
    return per_sample(a.to(dtype), x) * x.to(dtype) + per_sample(b.to(dtype), x) * y.to(dtype)


def diffusion_to_velocity(model_output: Tensor, x: Tensor, t: TimeLike, prediction_type: str) -> Tensor:
    """FM velocity ``u = A(t)*x + B(t)*model_output`` from a network fed ``align(x, t)`` at ``timestep(t)``.

    ``x`` is the FM state (not the network input). Raises at epsilon/t = 0 and sample/t = 1, and where
    the velocity is not finite: naming ``model_output`` or ``x`` if one holds NaN or inf, else ``t``
    (so close to a singular end that the velocity overflows).
    """
    check_same_shape(model_output=model_output, x=x)
    tt = as_time(t, like=x)
    a, b = velocity_coefficients_checked(tt, prediction_type)
    u = affine_combination(a, b, x, model_output)
    # Near a singular end |A|, |B| exceed what the compute dtype holds (1/t > 3.4e38 in float32 for
    # t < 2.9e-39) or push A*x past it, so an overflow names the t that scales the most.
    return check_finite_result(
        "diffusion_to_velocity",
        "the velocity",
        u,
        {"model_output": model_output, "x": x},
        lambda message: overflow_error_checked(message, tt, prediction_type),
    )


def velocity_to_diffusion(velocity: Tensor, x: Tensor, t: TimeLike, prediction_type: str) -> Tensor:
    """The network output that ``diffusion_to_velocity`` maps to ``velocity``; the map is finite on all of [0, 1].

    epsilon: ``x - t*u``; sample: ``x + (1-t)*u``; v_prediction: ``((2t-1)*x - n^2*u)/n``; velocity: ``u``.
    Raises where the output is not finite: naming ``velocity`` or ``x`` if one holds NaN or inf, else
    saying that it overflowed (inputs near the dtype's largest value).
    """
    check_same_shape(velocity=velocity, x=x)
    c, d = output_coefficients_checked(as_time(t, like=x), prediction_type)
    o = affine_combination(c, d, x, velocity)
    return check_finite_result("velocity_to_diffusion", "the network output", o, {"velocity": velocity, "x": x})


def diffusion_target(data: Tensor, noise: Tensor, alpha: Tensor, sigma: Tensor, prediction_type: str) -> Tensor:
    """What a diffusion network is trained to output for ``z = alpha*data + sigma*noise`` (per-sample
    ``alpha``, ``sigma``): epsilon ``noise``; sample ``data``; v_prediction ``alpha*noise - sigma*data``
    (diffusers' v)."""
    check_choice("prediction_type", prediction_type, DIFFUSERS_PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "sample":
        return data
    return per_sample(alpha, noise) * noise - per_sample(sigma, data) * data
