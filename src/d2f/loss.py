"""The flow-matching loss of a diffusion network's output (``docs/conventions.md`` §4).

``L = reduce(w * (u_hat - (data - noise))^2)`` with ``u_hat = A*x + B*o`` and ``x = t*data + (1-t)*noise``.
Substituting ``x`` gives the residual as one affine map of the three inputs,
``r = B*o + P*data + Q*noise`` (:func:`d2f.parametrization.residual_coefficients_of`), so the torch
path reads each input once and needs no ``x`` or ``u_hat`` buffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._backend import kernels, use_triton
from ._checks import TimeLike, as_time, check_choice, check_same_shape, compute_dtype, describe, per_sample
from ._chunks import row_chunks
from .parametrization import check_prediction_type, overflow_error, residual_coefficients_of

REDUCTIONS = ("mean", "sum", "none")


class _FMLoss(torch.autograd.Function):
    """Loss and ``dL/do`` in one forward sweep; backward only rescales the saved gradient.

    With ``r`` the residual and ``c_b = w_b * B_b`` per sample, ``dL/do = 2 * c_b * r / N`` where ``N``
    is the element count that ``reduction`` divides by (numel for mean, 1 for sum, per-sample numel
    for none).
    """

    @staticmethod
    def forward(ctx, o, data, noise, p, q, b, w, reduction):  # type: ignore[override]
        dtype = compute_dtype(o, data, noise)
        batch, sample_numel = o.shape[0], o[0].numel()
        divisor = {"mean": o.numel(), "sum": 1, "none": sample_numel}[reduction]
        coef = 2 * b / divisor if w is None else 2 * w * b / divisor
        p, q, b, coef = (per_sample(v.to(dtype), o) for v in (p, q, b, coef))
        grad = torch.empty(o.shape, dtype=o.dtype, device=o.device)
        sq = torch.empty(batch, dtype=dtype, device=o.device)
        for rows_ in row_chunks(o):  # the residual's passes run in cache (see d2f._chunks)
            r = torch.mul(o[rows_], b[rows_])
            r.addcmul_(p[rows_], data[rows_]).addcmul_(q[rows_], noise[rows_])
            flat = r.reshape(r.shape[0], -1)
            torch.linalg.vecdot(flat, flat, out=sq[rows_])
            torch.mul(r, coef[rows_], out=grad[rows_])
        if w is not None:
            sq = sq * w.to(dtype)
        loss = sq / sample_numel if reduction == "none" else sq.sum() / divisor
        ctx.save_for_backward(grad)
        ctx.per_sample = reduction == "none"
        return loss

    @staticmethod
    def backward(ctx, grad_loss):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if ctx.per_sample:
            return (grad * per_sample(grad_loss, grad)).to(grad.dtype), None, None, None, None, None, None, None
        if bool(grad_loss == 1):
            return grad, None, None, None, None, None, None, None  # loss.backward(): no pass at all
        return grad * grad_loss, None, None, None, None, None, None, None


def _check_weight(weight: TimeLike | None, batch: int, like: Tensor) -> Tensor | None:
    if weight is None:
        return None
    w = as_time(weight, like=like, name="weight", check_range=False)
    if bool((~(torch.isfinite(w) & (w >= 0))).any()):
        raise ValueError(f"weight must be finite and >= 0, got {describe(weight)}")
    return w.expand(batch)


class NonFiniteError(ValueError):
    """An input of ``fm_loss`` holds NaN or inf; ``tensor`` names it (a trainer stops or skips the step)."""

    def __init__(self, tensor: str):
        super().__init__(f"fm_loss: {tensor} contains NaN or inf")
        self.tensor = tensor


def _nonfinite_input(name: str) -> NonFiniteError:
    return NonFiniteError(name)


def _overflow(t: TimeLike, like: Tensor, prediction_type: str) -> ValueError:
    """Inputs finite, loss not: name the t whose coefficients scale the residual most (often the cause)."""
    message = (
        "fm_loss: the loss overflowed float32 although the inputs are finite (the squared residual is not "
        "representable); check t, the magnitudes of model_output, data and noise, and the loss weight"
    )
    return overflow_error(message, as_time(t, like=like), prediction_type)


def _raise_if_nonfinite(loss: Tensor, t: TimeLike, prediction_type: str, **inputs: Tensor) -> None:
    """One check of the (small) loss; the inputs are scanned only once something is already wrong."""
    if bool(torch.isfinite(loss).all()):
        return
    for name, value in inputs.items():
        if not bool(torch.isfinite(value).all()):
            raise _nonfinite_input(name)
    raise _overflow(t, inputs["data"], prediction_type)


def _fm_loss_triton(model_output, data, noise, t, prediction_type, weight, reduction) -> Tensor:
    """The fused kernel; t and weight are range-checked inside it, read back with the loss in one transfer.

    t goes in as float64 and the kernel forms its coefficients in float64, as the torch path does: from a
    float32 t, 1/(1 - t) is wrong by O(1) once 1 - t nears float32's spacing below 1, 6e-8 (inf at
    t = 1 - 1e-10).
    """
    batch = data.shape[0]

    def one_per_sample(value: TimeLike, name: str, dtype: torch.dtype) -> Tensor:
        return as_time(value, like=data, name=name, check_range=False).to(dtype).expand(batch).contiguous()

    t64 = one_per_sample(t, "t", torch.float64)
    w32 = None if weight is None else one_per_sample(weight, "weight", torch.float32)
    k = kernels()
    loss, status = k.FMLossTriton.apply(model_output, data, noise, t64, w32, prediction_type, reduction)
    values = status.tolist()
    n_loss = len(values) - len(k.FLAG_NAMES)
    flags = dict(zip(k.FLAG_NAMES, values[n_loss:]))
    if flags["t"]:
        residual_coefficients_of(as_time(t, like=data), prediction_type)  # raises the precise error
    if flags["weight"]:
        _check_weight(weight, batch, data)
    for name in ("model_output", "data", "noise"):
        if flags[name]:
            raise _nonfinite_input(name)
    if not all(map(math.isfinite, values[:n_loss])):
        raise _overflow(t, data, prediction_type)
    return loss


def fm_loss(
    model_output: Tensor,
    data: Tensor,
    noise: Tensor,
    t: TimeLike,
    prediction_type: str,
    weight: TimeLike | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Flow-matching loss of a diffusion network's output, with the gradient fused into the forward.

    Args:
        model_output: ``o``, the network's output for input ``align(x, t)`` at ``timestep(t)``; ``(B, ...)``.
        data, noise: the pair that formed ``x = t*data + (1-t)*noise``; same shape as ``model_output``.
        t: FM time, a float, 0-d or ``(B,)`` tensor in [0, 1] (epsilon needs t > 0, sample t < 1).
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"velocity"``.
        weight: optional per-sample weight ``w >= 0`` (float, 0-d or ``(B,)``); a weighted mean is
            ``mean(w * r^2)``, not divided by ``sum(w)``.
        reduction: ``"mean"`` (over all elements), ``"sum"``, or ``"none"`` (per-sample mean, shape ``(B,)``).
        backend: ``"auto"`` (the fused Triton kernel for CUDA tensors when triton is installed, else
            torch), ``"torch"`` or ``"triton"``. float64 always takes the torch path.

    Only ``model_output`` receives a gradient; ``data``, ``noise``, ``t`` and ``weight`` must not require
    one. NaN or inf in any input raises a ``ValueError`` naming it. The loss is float32 (float64 if an
    input is float64); the gradient has ``model_output``'s dtype.
    """
    check_same_shape(model_output=model_output, data=data, noise=noise)
    check_choice("reduction", reduction, REDUCTIONS)
    for name, value in (("data", data), ("noise", noise), ("t", t), ("weight", weight)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"{name} requires grad, but fm_loss only differentiates model_output; detach it")
    check_prediction_type(prediction_type)
    if use_triton(backend, model_output, data, noise):
        return _fm_loss_triton(model_output, data, noise, t, prediction_type, weight, reduction)
    batch = data.shape[0]
    tt = as_time(t, like=data).expand(batch)
    p, q, b = residual_coefficients_of(tt, prediction_type)
    w = _check_weight(weight, batch, data)
    loss = _FMLoss.apply(model_output, data, noise, p, q, b, w, reduction)
    _raise_if_nonfinite(loss, t, prediction_type, model_output=model_output, data=data, noise=noise)
    return loss
