"""Must equal ``d2f.loss.fm_loss``: the FM loss and its gradient in one pass over memory.

Per sample ``b`` the residual is affine in the three inputs (``d2f.parametrization.residual_coefficients_checked``):

    r = c*o + p*data + q*noise,   with (p, q, c) = epsilon (0, 1/t, -1/t); v ((t-1)/n2, t/n2, -1/sqrt(n2));
                                  sample (-1/(1-t), 0, 1/(1-t)); velocity (-1, 1, 1);  n2 = t^2 + (1-t)^2

and the loss is ``L = sum_b w_b * sum_i r_bi^2 * s`` with ``s = 1/numel`` (mean), ``1`` (sum) or
``1/per_sample`` (none, one value per sample). Its gradient is elementwise:

    dL/do_bi = 2 * w_b * c_b * s * r_bi

so each program loads its block of o, data and noise once, stores ``dL/do`` into a fresh buffer and adds
its block's ``w*s*sum(r^2)`` to the loss accumulator. Nothing is read twice; t and w are one scalar load
per program. The same pass raises flags (counts) for non-finite inputs and for t or w out of range;
:func:`fm_loss` hands them to ``d2f.deferred.verify``, which reads them with the loss in one host transfer
(at once, or later inside ``d2f.deferred_checks()``) and raises d2f's own errors.
"""

import math

import torch
import triton
import triton.language as tl

from d2f._checks import NonFiniteError, as_scalars, as_time, as_weights, overflow_message
from d2f.deferred import verify
from d2f.loss import SavedGradientFunction, loss_divisor, overflow
from d2f.parametrization import PREDICTION_TYPES, residual_coefficients_checked

from ._flags import FLT_MAX, flag_nonfinite
from ._launch import block_size, check_device

# Flag slots after the loss slots in the accumulator.
FLAG_NAMES = ("model_output", "data", "noise", "t", "weight")


@triton.jit
def _fm_loss_kernel(
    out_ptr,
    data_ptr,
    noise_ptr,
    t_ptr,
    w_ptr,
    grad_ptr,
    loss_ptr,
    flags_ptr,
    per_sample,
    blocks_per_sample,
    loss_scale,
    PRED: tl.constexpr,  # the index of the prediction type in d2f.parametrization.PREDICTION_TYPES
    PER_SAMPLE_LOSS: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = pid - b * blocks_per_sample
    # t is float64 and so is the coefficients' arithmetic (one scalar per program); only the results are
    # cast to float32, so that 1/(1-t) stays exact for t within float32's spacing of 1 (6e-8).
    t = tl.load(t_ptr + b).to(tl.float64)
    t_ok = (t >= 0.0) & (t <= 1.0)
    if PRED == 0:
        p = 0.0
        q = (1.0 / t).to(tl.float32)
        c = (-1.0 / t).to(tl.float32)
        t_ok = t_ok & (t > 0.0)
    elif PRED == 1:
        n2 = t * t + (1.0 - t) * (1.0 - t)
        p = ((t - 1.0) / n2).to(tl.float32)
        q = (t / n2).to(tl.float32)
        c = (-1.0 / tl.sqrt(n2)).to(tl.float32)
    elif PRED == 2:
        p = (-1.0 / (1.0 - t)).to(tl.float32)
        q = 0.0
        c = (1.0 / (1.0 - t)).to(tl.float32)
        t_ok = t_ok & (t < 1.0)
    else:
        p = -1.0
        q = 1.0
        c = 1.0
    if HAS_WEIGHT:
        w = tl.load(w_ptr + b).to(tl.float32)
        tl.atomic_add(flags_ptr + 4, 1.0, mask=(j == 0) & ~((w >= 0.0) & (w <= FLT_MAX)))
    else:
        w = 1.0
    tl.atomic_add(flags_ptr + 3, 1.0, mask=(j == 0) & ~t_ok)

    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b.to(tl.int64) * per_sample
    o = tl.load(out_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    d = tl.load(data_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    r = c * o + p * d + q * n
    tl.store(grad_ptr + base + offs, (r * (2.0 * w * c * loss_scale)).to(grad_ptr.dtype.element_ty), mask=mask)
    partial = tl.sum(r * r, axis=0) * (w * loss_scale)
    if PER_SAMPLE_LOSS:
        tl.atomic_add(loss_ptr + b, partial)
    else:
        tl.atomic_add(loss_ptr, partial)

    flag_nonfinite(flags_ptr, 0, o, mask)
    flag_nonfinite(flags_ptr, 1, d, mask)
    flag_nonfinite(flags_ptr, 2, n, mask)


def fm_loss_forward(
    model_output: torch.Tensor,
    data: torch.Tensor,
    noise: torch.Tensor,
    t: torch.Tensor,
    weight: torch.Tensor | None,
    prediction_type: str,
    reduction: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the fused pass. Returns ``(loss, grad, status)``.

    ``t`` is a float64 and ``weight`` a float32 ``(B,)`` tensor on the inputs' device; the three inputs have equal
    shapes and are made contiguous here (once). ``loss`` is float32: a scalar, or ``(B,)`` for
    ``reduction="none"``. ``grad`` is ``dL/do`` in ``model_output``'s dtype, a fresh buffer. ``status`` is
    the whole accumulator, loss slots then the flags, which count (in the order of ``FLAG_NAMES``)
    non-finite inputs and out-of-range t or weight, so one host transfer reads them all.
    """
    check_device(model_output, data, noise)
    out, d, n = model_output.contiguous(), data.contiguous(), noise.contiguous()
    batch = out.shape[0]
    per_sample = out.numel() // batch
    if per_sample >= 2**31:
        raise ValueError(f"the triton loss supports < 2**31 elements per sample, got {per_sample}")
    per_sample_loss = reduction == "none"
    n_loss = batch if per_sample_loss else 1
    acc = torch.zeros(n_loss + len(FLAG_NAMES), device=out.device, dtype=torch.float32)
    grad = torch.empty_like(out)
    loss_scale = 1.0 / loss_divisor(out, reduction)
    block = block_size(2048)
    blocks_per_sample = triton.cdiv(per_sample, block)
    _fm_loss_kernel[(batch * blocks_per_sample,)](
        out,
        d,
        n,
        t,
        weight if weight is not None else t,
        grad,
        acc,
        acc[n_loss:],
        per_sample,
        blocks_per_sample,
        loss_scale,
        PRED=PREDICTION_TYPES.index(prediction_type),
        PER_SAMPLE_LOSS=per_sample_loss,
        HAS_WEIGHT=weight is not None,
        BLOCK=block,
        num_warps=8,
    )
    loss = acc[:n_loss] if per_sample_loss else acc[0]
    return loss, grad, acc


class FMLossTriton(SavedGradientFunction):
    """Forward runs the single fused pass, which already wrote ``dL/do``; the shared backward rescales it
    (and makes it differentiable under ``create_graph=True``).

    Returns ``(loss, status)`` (see ``fm_loss_forward``). Only ``model_output`` gets a gradient: ``fm_loss``
    refuses ``data``, ``noise``, ``t`` or ``weight`` that require one.
    """

    @staticmethod
    def forward(ctx, model_output, data, noise, t, weight, prediction_type, reduction):  # type: ignore[override]
        loss, grad, status = fm_loss_forward(model_output, data, noise, t, weight, prediction_type, reduction)
        SavedGradientFunction.save(ctx, grad, model_output, t, weight, prediction_type, reduction)
        status = status.detach().clone()  # a separate, non-differentiable output, not a view of the loss
        ctx.mark_non_differentiable(status)
        return loss, status


def fm_loss(model_output, data, noise, t, prediction_type: str, weight, reduction: str) -> torch.Tensor:
    """The kernel path of ``d2f.loss.fm_loss``, whose arguments are checked but for t and the weight: those
    are range-checked inside the kernel, and the flags stay on the device until ``d2f.deferred`` reads them.

    t goes in as float64 and the kernel forms its coefficients in float64, as the torch path does: from a
    float32 t, 1/(1 - t) is wrong by O(1) once 1 - t nears float32's spacing below 1, 6e-8 (inf at
    t = 1 - 1e-10).
    """
    batch = data.shape[0]

    def one_per_sample(value, name: str, dtype: torch.dtype) -> torch.Tensor:
        return as_scalars(value, like=data, name=name).to(dtype).expand(batch).contiguous()

    t64 = one_per_sample(t, "t", torch.float64)
    w32 = None if weight is None else one_per_sample(weight, "weight", torch.float32)
    loss, status = FMLossTriton.apply(model_output, data, noise, t64, w32, prediction_type, reduction)
    n_loss = status.numel() - len(FLAG_NAMES)

    def error(values: list[float]) -> Exception | None:
        flags = dict(zip(FLAG_NAMES, values[n_loss:]))
        try:  # the torch path's checks of t and the weight raise their precise errors
            if flags["t"]:
                residual_coefficients_checked(as_time(t, like=data), prediction_type)
            if flags["weight"]:
                as_weights(weight, like=data)
        except ValueError as e:
            return e
        for name in ("model_output", "data", "noise"):
            if flags[name]:
                return NonFiniteError("fm_loss", name)
        if not all(map(math.isfinite, values[:n_loss])):
            return overflow(overflow_message("fm_loss", "the loss", loss.dtype), t, data, prediction_type)
        return None

    verify(status, error)
    return loss
