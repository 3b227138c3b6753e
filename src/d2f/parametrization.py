"""Velocity from a diffusion network's output and back (``docs/conventions.md`` §3).

Every prediction type is affine in the output ``o``: ``u = A(t)*x + B(t)*o``.

==================  ===================  ====================  ==============
prediction_type     A(t)                 B(t)                  singular at
==================  ===================  ====================  ==============
``epsilon``         ``1/t``              ``-1/t``              t = 0
``sample``          ``-1/(1-t)``         ``1/(1-t)``           t = 1
``v_prediction``    ``(2t-1)/n^2``       ``-1/n``              never
``velocity``        ``0``                ``1``                 never
==================  ===================  ====================  ==============

The inverse ``o = C(t)*x + D(t)*u`` is finite on all of [0, 1].
"""

from __future__ import annotations

from torch import Tensor

from ._checks import TimeLike, as_time, check_choice, check_same_shape, compute_dtype, describe, per_sample
from .path import norm

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "velocity")
SINGULAR_TIMES = {"epsilon": (0.0,), "sample": (1.0,), "v_prediction": (), "velocity": ()}


def check_prediction_type(prediction_type: str) -> str:
    return check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def velocity_coefficients(t: TimeLike, prediction_type: str) -> tuple[Tensor, Tensor]:
    """``(A, B)`` with ``u = A*x + B*o``, as float64 tensors shaped like ``t``.

    Raises ``ValueError`` where the map is singular (epsilon at t = 0, sample at t = 1) instead of
    returning inf or NaN.
    """
    return velocity_coefficients_of(as_time(t), prediction_type)


def velocity_coefficients_of(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
    """:func:`velocity_coefficients` for a ``t`` already checked by ``as_time`` (float64)."""
    check_prediction_type(prediction_type)
    for end in SINGULAR_TIMES[prediction_type]:
        if bool((tt == end).any()):
            raise ValueError(
                f"prediction_type={prediction_type!r} gives no velocity at t={end} (got t={describe(tt)}); "
                f"keep t {'> 0' if end == 0 else '< 1'}: samplers should start at schedule.t_min or later"
            )
    if prediction_type == "epsilon":
        return 1 / tt, -1 / tt
    if prediction_type == "sample":
        return -1 / (1 - tt), 1 / (1 - tt)
    if prediction_type == "v_prediction":
        n = norm(tt)
        return (2 * tt - 1) / (n * n), -1 / n
    return tt * 0, tt * 0 + 1


def residual_coefficients_of(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor, Tensor]:
    """``(P, Q, B)`` with ``u_hat - (data - noise) = B*o + P*data + Q*noise`` for ``x = t*data + (1-t)*noise``.

    ``P = A*t - 1`` and ``Q = A*(1-t) + 1``, simplified per type so that no cancellation is left:
    epsilon ``(0, 1/t, -1/t)``; sample ``(-1/(1-t), 0, 1/(1-t))``; v ``((t-1)/n^2, t/n^2, -1/n)``;
    velocity ``(-1, 1, 1)``. ``tt`` must already be checked by ``as_time``; raises where singular.
    """
    _, b = velocity_coefficients_of(tt, prediction_type)
    if prediction_type == "epsilon":
        return tt * 0, 1 / tt, b
    if prediction_type == "sample":
        return -1 / (1 - tt), tt * 0, b
    if prediction_type == "v_prediction":
        n2 = tt * tt + (1 - tt) * (1 - tt)
        return (tt - 1) / n2, tt / n2, b
    return tt * 0 - 1, tt * 0 + 1, b


def output_coefficients_of(tt: Tensor, prediction_type: str) -> tuple[Tensor, Tensor]:
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
    """``a*x + b*y`` with per-sample ``a``, ``b``, computed in at least float32."""
    dtype = compute_dtype(x, y)
    return per_sample(a.to(x.device, dtype), x) * x.to(dtype) + per_sample(b.to(x.device, dtype), x) * y.to(dtype)


def diffusion_to_velocity(model_output: Tensor, x: Tensor, t: TimeLike, prediction_type: str) -> Tensor:
    """FM velocity ``u = A(t)*x + B(t)*model_output`` from a network fed ``align(x, t)`` at ``timestep(t)``.

    ``x`` is the FM state (not the network input). Raises at epsilon/t = 0 and sample/t = 1.
    """
    check_same_shape(model_output=model_output, x=x)
    a, b = velocity_coefficients_of(as_time(t, like=x), prediction_type)
    return affine_combination(a, b, x, model_output)


def velocity_to_diffusion(velocity: Tensor, x: Tensor, t: TimeLike, prediction_type: str) -> Tensor:
    """The network output that ``diffusion_to_velocity`` maps to ``velocity``; finite on all of [0, 1].

    epsilon: ``x - t*u``; sample: ``x + (1-t)*u``; v_prediction: ``((2t-1)*x - n^2*u)/n``; velocity: ``u``.
    """
    check_same_shape(velocity=velocity, x=x)
    c, d = output_coefficients_of(as_time(t, like=x), prediction_type)
    return affine_combination(c, d, x, velocity)
