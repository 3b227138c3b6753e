"""The autograd layer over the fused loss launcher."""

import torch

from .loss import fm_loss_forward


class FMLossTriton(torch.autograd.Function):
    """Forward runs the single fused pass, which already wrote ``dL/do``; backward only rescales it.

    Returns ``(loss, status)`` (see ``fm_loss_forward``); the caller reads ``status`` in one host transfer
    and raises on a non-finite input or an out-of-range t or weight. Only ``model_output`` gets a
    gradient: the caller refuses ``data``, ``noise``, ``t`` or ``weight`` that require one.
    """

    @staticmethod
    def forward(ctx, model_output, data, noise, t, weight, prediction_type, reduction):  # type: ignore[override]
        loss, grad, status = fm_loss_forward(model_output, data, noise, t, weight, prediction_type, reduction)
        ctx.save_for_backward(grad)
        ctx.per_sample = reduction == "none"
        status = status.detach().clone()  # a separate, non-differentiable output, not a view of the loss
        ctx.mark_non_differentiable(status)
        return loss, status

    @staticmethod
    def backward(ctx, grad_loss, _grad_status):  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        if ctx.per_sample:
            grad_loss = grad_loss.reshape(-1, *([1] * (grad.ndim - 1)))
        elif bool(grad_loss == 1):
            # The usual case (loss.backward()): skip a full pass over the gradient.
            return grad, None, None, None, None, None, None
        return (grad * grad_loss).to(grad.dtype), None, None, None, None, None, None
