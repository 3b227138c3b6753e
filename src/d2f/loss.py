"""The flow-matching loss of a diffusion network's output (``docs/conventions.md`` §4).

``L = reduce(w * (u_hat - (data - noise))^2)`` with ``u_hat = A*x + B*o`` and ``x = t*data + (1-t)*noise``.
Substituting ``x`` gives the residual as one affine map of the three inputs,
``r = B*o + P*data + Q*noise`` (:func:`d2f.parametrization.residual_coefficients_checked`), so the torch
path reads each input once and needs no ``x`` or ``u_hat`` buffer. The fused kernel (``d2f.kernels.loss``)
computes the same in one pass over memory.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernels, use_triton
from ._checks import (
    TimeLike,
    as_time,
    as_weights,
    check_choice,
    check_finite_result,
    check_same_shape,
    compute_dtype,
    per_sample,
)
from ._chunks import row_chunks
from .parametrization import check_prediction_type, overflow_error_checked, residual_coefficients_checked

REDUCTIONS = ("mean", "sum", "none")


def loss_divisor(o: Tensor, reduction: str) -> int:
    """``N``, the element count that ``reduction`` divides the summed squares by."""
    return {"mean": o.numel(), "sum": 1, "none": o[0].numel()}[reduction]


class SavedGradientFunction(torch.autograd.Function):
    """A loss whose forward sweep already wrote ``dL/do`` for a unit upstream gradient and saved it; backward
    only rescales it (per sample for ``reduction="none"``). It rescales even for a plain ``loss.backward()``:
    telling a unit upstream gradient apart would read it back to the host, a synchronisation per step that
    costs more than the pass. The torch path and the kernel (``d2f.kernels.loss``) share it.

    A second derivative (``create_graph=True``, as in gradient penalties or Hessian-vector products) must not
    see a constant: ``dL/do = 2*w*B*r/N`` is affine in ``o`` with slope ``2*w*B^2/N`` per sample, so then
    backward returns the saved gradient plus that slope times ``o - o.detach()``: the same value, carrying
    the exact second derivative. Only that case pays for the extra passes.
    """

    @staticmethod
    def save(ctx, grad, o, t, w, prediction_type, reduction):  # type: ignore[no-untyped-def]
        """Keep ``dL/do`` and what its slope needs: ``o`` itself (no copy), the float64 ``(B,)`` times ``t``
        and the weights ``w`` (or None)."""
        ctx.save_for_backward(grad, o, t, w)
        ctx.prediction_type, ctx.reduction = prediction_type, reduction
        ctx.per_sample = reduction == "none"

    @staticmethod
    def backward(ctx, grad_loss, *_):  # type: ignore[override]
        grad, o, t, w = ctx.saved_tensors
        rest = (None,) * (len(ctx.needs_input_grad) - 1)  # only model_output gets a gradient
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable in o
            b = residual_coefficients_checked(t, ctx.prediction_type)[2]
            slope = 2 * b * b / loss_divisor(o, ctx.reduction) * (1 if w is None else w.to(b.dtype))
            dtype = compute_dtype(o)
            grad = (grad.to(dtype) + per_sample(slope.to(dtype), o) * (o - o.detach()).to(dtype)).to(grad.dtype)
        upstream = per_sample(grad_loss, grad) if ctx.per_sample else grad_loss
        return ((grad * upstream).to(grad.dtype), *rest)


class _FMLoss(SavedGradientFunction):
    """Loss and ``dL/do`` in one forward sweep.

    With ``r`` the residual and ``c_b = w_b * B_b`` per sample, ``dL/do = 2 * c_b * r / N`` where ``N``
    is the element count that ``reduction`` divides by (numel for mean, 1 for sum, per-sample numel
    for none).
    """

    @staticmethod
    def forward(ctx, o, data, noise, t, prediction_type, w, reduction):  # type: ignore[override]
        dtype = compute_dtype(o, data, noise)
        batch, sample_numel = o.shape[0], o[0].numel()
        divisor = loss_divisor(o, reduction)
        p, q, b = residual_coefficients_checked(t, prediction_type)  # raises at a singular t, before any pass
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
        SavedGradientFunction.save(ctx, grad, o, t, w, prediction_type, reduction)
        return loss


def overflow(message: str, t: TimeLike, like: Tensor, prediction_type: str) -> ValueError:
    """Inputs finite, loss not: ``message`` with the t whose coefficients scale the residual most (often the
    cause)."""
    message += (
        " (the squared residual is not representable); check t, the magnitudes of model_output, data and noise, "
        "and the loss weight"
    )
    return overflow_error_checked(message, as_time(t, like=like), prediction_type)


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
    one. NaN or inf in any input raises a ``d2f.NonFiniteError`` (a ``ValueError``) naming it. The loss is
    float32 (float64 if an input is float64); the gradient has ``model_output``'s dtype, and is itself
    differentiable under ``create_graph=True`` (the exact second derivative, ``2*w*B^2/N`` per element).
    """
    check_same_shape(model_output=model_output, data=data, noise=noise)
    if model_output.numel() == 0:
        raise ValueError(
            f"model_output has shape {tuple(model_output.shape)}: fm_loss needs at least one sample of at least "
            "one element (an empty batch has no mean)"
        )
    check_choice("reduction", reduction, REDUCTIONS)
    for name, value in (("data", data), ("noise", noise), ("t", t), ("weight", weight)):
        if isinstance(value, Tensor) and value.requires_grad:
            raise ValueError(f"{name} requires grad, but fm_loss only differentiates model_output; detach it")
    check_prediction_type(prediction_type)
    if use_triton(backend, model_output, data, noise):
        return kernels().fm_loss(model_output, data, noise, t, prediction_type, weight, reduction)
    tt = as_time(t, like=data).expand(data.shape[0])
    w = as_weights(weight, like=data)
    loss = _FMLoss.apply(model_output, data, noise, tt, prediction_type, w, reduction)
    return check_finite_result(
        "fm_loss",
        "the loss",
        loss,
        {"model_output": model_output, "data": data, "noise": noise},
        lambda message: overflow(message, t, data, prediction_type),
    )
