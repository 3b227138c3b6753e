"""The FM probability path and its alignment with the VP diffusion path (``docs/conventions.md`` §1, §3).

FM: ``x_t = t*data + (1-t)*noise`` (t = 0 noise, t = 1 data). With ``n(t) = sqrt(t^2 + (1-t)^2)`` the VP
coefficients of the same point are ``alpha = t/n`` and ``sigma = (1-t)/n``, so the network input for FM
state ``x`` is ``z = scale(t) * x`` with ``scale = alpha + sigma = 1/n``.

The tensor functions here raise instead of returning NaN or inf (``d2f._checks.check_finite_result``): a
``d2f.NonFiniteError`` naming the input that holds NaN or inf, else a ``ValueError`` saying that the result
overflowed its dtype although the inputs are finite.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernels, use_triton
from ._checks import (
    FLOAT_DTYPES,
    TimeLike,
    as_time,
    check_choice,
    check_finite_result,
    check_same_shape,
    compute_dtype,
    per_sample,
    time_dtype,
)


def norm_squared(t: Tensor) -> Tensor:
    """``n(t)^2 = t^2 + (1-t)^2``, in [1/2, 1]."""
    return t * t + (1 - t) * (1 - t)


def norm(t: Tensor) -> Tensor:
    """``n(t) = sqrt(t^2 + (1-t)^2)``, in [1/sqrt(2), 1]."""
    return torch.sqrt(norm_squared(t))


def alpha_sigma(t: TimeLike) -> tuple[Tensor, Tensor]:
    """VP coefficients of FM time ``t``: ``alpha = t/n``, ``sigma = (1-t)/n``; ``alpha^2 + sigma^2 = 1``."""
    alpha, sigma = alpha_sigma_checked(as_time(t))
    dtype = time_dtype(t)
    return alpha.to(dtype), sigma.to(dtype)


def alpha_sigma_checked(t: Tensor) -> tuple[Tensor, Tensor]:
    """:func:`alpha_sigma` in float64, for a ``t`` already checked by ``as_time``."""
    n = norm(t)
    return t / n, (1 - t) / n


def scale(t: TimeLike) -> Tensor:
    """``s(t) = alpha + sigma = 1/n(t)``, in [1, sqrt(2)]: the factor from FM state to network input."""
    tt = as_time(t)
    return (1 / norm(tt)).to(time_dtype(t))


def relabel_ratio(t_from: float, t_to: float) -> float:
    """The factor that keeps ``scale(t) * x`` fixed when a state's time label changes from ``t_from`` to
    ``t_to``: what DDIM does to its latent between the steps of a table whose steps do not chain."""
    return float(scale(t_from) / scale(t_to))


def align(x: Tensor, t: TimeLike) -> Tensor:
    """Network input ``z = scale(t) * x`` for FM state ``x`` at time ``t`` (feed it at ``timestep(t)``)."""
    check_same_shape(x=x)
    return check_finite_result("align", "the result", align_checked(x, as_time(t, like=x)), {"x": x})


def align_checked(x: Tensor, t: Tensor) -> Tensor:
    """:func:`align` for a ``t`` already checked by ``as_time`` (float64)."""
    dtype = compute_dtype(x)
    return per_sample((1 / norm(t)).to(dtype), x) * x.to(dtype)


def interpolate(data: Tensor, noise: Tensor, t: TimeLike) -> Tensor:
    """``x_t = t*data + (1-t)*noise``."""
    check_same_shape(data=data, noise=noise)
    dtype = compute_dtype(data, noise)
    tt = as_time(t, like=data)
    # Both coefficients in float64, then cast (docs/conventions.md §6). lerp would form 1 - t from a
    # float32 t, losing the noise term entirely for t within float32's spacing of 1 (6e-8).
    x = per_sample(tt.to(dtype), data) * data.to(dtype) + per_sample((1 - tt).to(dtype), data) * noise.to(dtype)
    return check_finite_result("interpolate", "the result", x, {"data": data, "noise": noise})


def target_velocity(data: Tensor, noise: Tensor) -> Tensor:
    """The conditional FM velocity ``u = data - noise`` (constant along the straight path)."""
    check_same_shape(data=data, noise=noise)
    dtype = compute_dtype(data, noise)
    u = data.to(dtype) - noise.to(dtype)
    return check_finite_result("target_velocity", "the result", u, {"data": data, "noise": noise})


def network_input(
    data: Tensor, noise: Tensor, t: TimeLike, dtype: torch.dtype | None = None, backend: str = "auto"
) -> Tensor:
    """The training-time network input ``align(interpolate(data, noise, t), t)`` in one pass.

    It equals ``alpha(t)*data + sigma(t)*noise``; feed it at ``schedule.timestep(t)``. ``dtype`` is the
    network's, a ``torch.dtype`` among float16, bfloat16, float32 and float64 (default: float32, or float64
    for float64 inputs); a value beyond its range (65504 in float16) raises rather than becoming inf.
    ``backend`` as in :func:`d2f.fm_loss`.
    """
    check_same_shape(data=data, noise=noise)
    tt = as_time(t, like=data).expand(data.shape[0])
    dtype = compute_dtype(data, noise) if dtype is None else check_choice("dtype", dtype, FLOAT_DTYPES)
    if use_triton(backend, data, noise):
        z = kernels().network_input(data, noise, tt.contiguous(), dtype)
    else:
        work = compute_dtype(data, noise)
        alpha, sigma = alpha_sigma_checked(tt)
        z = per_sample(alpha.to(work), data) * data
        z = z.addcmul_(per_sample(sigma.to(work), data), noise).to(dtype)
    return check_finite_result("network_input", "the network input", z, {"data": data, "noise": noise})
