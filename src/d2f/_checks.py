"""Argument checks, the shared handling of FM time ``t``, and d2f's one error for NaN or inf inputs.

Every public function funnels its ``t`` through :func:`as_time`, so the rules stated in
``docs/conventions.md`` (a float, a 0-d tensor or a ``(B,)`` tensor, inside [0, 1]) are enforced in
one place with one wording of the error. Per-sample numbers that are not times (a guidance scale, a loss
weight, a timestep ``k``) go through :func:`as_scalars`, the same checks without the range.

Naming: a function whose name ends in ``_checked`` takes a ``t`` that already went through
:func:`as_time` (float64, in range, shaped for the batch) and does not check it again; its public twin
takes any float or tensor.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from .deferred import verify

TimeLike = float | Tensor
Choice = TypeVar("Choice")
# The dtypes a network may take its input in.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def describe(value: object) -> str:
    """A short, readable rendering of ``value`` for error messages."""
    if isinstance(value, Tensor):
        if value.numel() <= 8:
            return f"tensor({value.detach().cpu().tolist()}, dtype={value.dtype})"
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype})"
    if isinstance(value, np.ndarray) and value.size > 8:  # its repr lists up to a thousand entries
        return f"ndarray(shape={value.shape}, dtype={value.dtype})"
    return repr(value)


def check_choice(name: str, value: object, allowed: Iterable[Choice]) -> Choice:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not supported; allowed: {', '.join(map(repr, allowed))}")
    return value  # type: ignore[return-value]


def check_bool(name: str, value: object) -> bool:
    """Refuse anything but ``True`` or ``False``: a config's ``"false"`` or ``"no"`` is truthy and would turn the
    option on."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be True or False")
    return value


def check_real(name: str, value: object, rule: str, allowed: Callable[[float], bool] = lambda _: True) -> float:
    """``value`` as a float, refused unless it is a finite real number (a numpy scalar counts; a bool, a string or
    a tensor does not) for which ``allowed`` holds; the error says ``{name}={value!r} must {rule}``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or not allowed(value):
        raise ValueError(f"{name}={value!r} must {rule}")
    return float(value)


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}={value!r} must be a positive integer")
    return int(value)


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half inputs are computed in float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_same_shape(**tensors: Tensor) -> None:
    """Tensors of one shape with a batch dimension; real, since the casts to the compute dtype would drop an
    imaginary part without a word."""
    items = list(tensors.items())
    for name, value in items:
        if not isinstance(value, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.is_complex():
            raise ValueError(f"{name} must be a real tensor, got dtype {value.dtype}")
    first_name, first = items[0]
    if first.ndim < 1:
        raise ValueError(f"{first_name} must have a batch dimension, got shape {tuple(first.shape)}")
    for name, value in items[1:]:
        if value.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(value.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "they must be equal"
            )
        if value.device != first.device:  # else torch's own error, naming neither
            raise ValueError(
                f"{name} is on {value.device} but {first_name} is on {first.device}; they must be on one device"
            )


def as_scalars(value: TimeLike, *, like: Tensor | None = None, name: str) -> Tensor:
    """``value`` (a float, a 0-d or a ``(B,)`` tensor) as a float64 tensor of shape ``()`` or ``(B,)`` on
    ``like``'s device; a 1-D value needs one entry per sample of ``like``."""
    device = like.device if like is not None else None
    if isinstance(value, Tensor):
        check_number_tensor(name, value)
        out = value.detach().to(device=device if device is not None else value.device, dtype=torch.float64)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        # A fill on the device, not a copy from the host, which would wait for the device (and cannot be
        # recorded in a CUDA graph, d2f.capture).
        out = torch.full((), float(value), dtype=torch.float64, device=device)
    else:
        raise ValueError(f"{name} must be a float or a tensor, got {type(value).__name__}")
    if out.ndim > 1:
        raise ValueError(f"{name} must be a scalar or a 1-D (B,) tensor, got shape {tuple(out.shape)}")
    if like is not None and out.ndim == 1:
        if like.ndim < 1 or out.shape[0] not in (1, like.shape[0]):
            raise ValueError(
                f"{name} has shape {tuple(out.shape)} but the batch has shape {tuple(like.shape)}; "
                f"a 1-D {name} needs one entry per sample"
            )
    return out


def check_number_tensor(name: str, value: Tensor) -> None:
    """Refuse a tensor of per-sample numbers that the float64 copy would silently change: complex (its imaginary
    part dropped), bool (True read as 1) or one that requires grad (the copy is detached, so no gradient would
    reach it: d2f differentiates only network outputs and states, as ``fm_loss`` says)."""
    if value.is_complex():
        raise ValueError(f"{name} must be real, got dtype {value.dtype}")
    if value.dtype == torch.bool:
        raise ValueError(f"{name} must be a number or a tensor of numbers, got dtype {value.dtype}")
    if value.requires_grad:
        raise ValueError(
            f"{name} requires grad, but d2f takes it as a constant (its coefficients are computed from a detached "
            "float64 copy), so no gradient would reach it; detach it"
        )


def as_time(t: TimeLike, *, like: Tensor | None = None, name: str = "t") -> Tensor:
    """``t`` as :func:`as_scalars` gives it, refused unless every entry lies in [0, 1].

    Per-sample coefficients are computed from this float64 copy (B numbers, so the cost is nil) and
    only then cast to the elementwise compute dtype; that keeps the time map exact in float32 work.
    """
    out = as_scalars(t, like=like, name=name)
    bad = ~((out >= 0) & (out <= 1))  # written this way so NaN counts as bad

    def error(flag: list[float]) -> ValueError | None:
        if not flag[0]:
            return None
        first = out.reshape(-1)[bad.reshape(-1)][0].item()
        return ValueError(f"{name} must lie in [0, 1]; got {first!r} (in {describe(t)})")

    verify(bad.any(), error)
    return out


def as_weights(weight: TimeLike | None, *, like: Tensor) -> Tensor | None:
    """Per-sample weights (a float, 0-d or ``(B,)`` tensor) as a float64 ``(B,)`` tensor, refused unless
    finite and >= 0; ``None`` stays ``None``."""
    if weight is None:
        return None
    w = as_scalars(weight, like=like, name="weight")
    verify(
        (~(torch.isfinite(w) & (w >= 0))).any(),
        lambda bad: ValueError(f"weight must be finite and >= 0, got {describe(weight)}") if bad[0] else None,
    )
    return w.expand(like.shape[0])


def time_dtype(t: TimeLike) -> torch.dtype:
    """Result dtype for a function of ``t`` alone: Python numbers and float64 stay float64."""
    if isinstance(t, Tensor) and t.dtype != torch.float64:
        return torch.float32
    return torch.float64


class NonFiniteError(ValueError):
    """The tensor argument ``tensor`` of ``function`` holds NaN or inf (a trainer stops or skips the step)."""

    def __init__(self, function: str, tensor: str):
        super().__init__(f"{function}: {tensor} contains NaN or inf")
        self.function, self.tensor = function, tensor


def nonfinite_input(function: str, **inputs: Tensor | None) -> NonFiniteError | None:
    """The :class:`NonFiniteError` naming the first of ``inputs`` that holds NaN or inf, if one does.

    For the error path only: callers check their (small or fresh) result first and scan the inputs only
    once that result is already not finite, so the normal path reads no input twice.
    """
    for name, value in inputs.items():
        if value is not None and not bool(torch.isfinite(value).all()):
            return NonFiniteError(function, name)
    return None


def overflow_message(function: str, what: str, dtype: torch.dtype) -> str:
    """The error's message when ``what``, a result of ``function`` from finite inputs, is not finite."""
    return (
        f"{function}: {what} overflowed {dtype} (largest finite value {torch.finfo(dtype).max:.5g}) although "
        "the inputs are finite"
    )


def check_finite_result(
    function: str,
    what: str,
    result: Tensor,
    inputs: dict[str, Tensor | None],
    overflow: Callable[[str], ValueError] = ValueError,
) -> Tensor:
    """``result`` (``what`` in messages), checked to be finite; d2f's one policy for NaN and inf.

    One pass over the fresh result on the normal path. A NaN or inf input always reaches the result (an
    elementwise map carries it, and ``0 * inf`` is NaN), so only a bad result costs the scan of ``inputs``:
    a NaN or inf input raises the :class:`NonFiniteError` naming it, finite inputs raise ``overflow`` of the
    message that ``result`` overflowed its dtype (``overflow`` may add the likely cause). Inside
    ``d2f.deferred_checks()`` the check is read later (``d2f.deferred``), and the inputs are kept until then.
    """

    def error(bad: list[float]) -> ValueError | None:
        if not bad[0]:
            return None
        return nonfinite_input(function, **inputs) or overflow(overflow_message(function, what, result.dtype))

    verify(~torch.isfinite(result).all(), error)
    return result


def per_sample(coef: Tensor, x: Tensor) -> Tensor:
    """Reshape a ``()`` or ``(B,)`` coefficient so it broadcasts over ``x`` of shape ``(B, ...)``."""
    if coef.ndim == 0:
        return coef
    return coef.reshape(coef.shape[0], *([1] * (x.ndim - 1)))
