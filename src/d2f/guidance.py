"""Classifier-free guidance."""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import TimeLike, as_scalars, check_finite_result, check_same_shape, compute_dtype, per_sample
from .deferred import verify


def guidance(uncond: Tensor, cond: Tensor, scale: TimeLike) -> Tensor:
    """``uncond + scale * (cond - uncond)``, on all channels; ``scale`` a float or a ``(B,)`` tensor.

    Computed in at least float32. Raises instead of returning NaN or inf: naming ``uncond`` or ``cond`` if one
    holds NaN or inf, else saying that the result overflowed (a large scale times a large difference).

    Because the conversion to a velocity is affine in the output, guiding raw outputs and guiding
    velocities give the same result (``docs/conventions.md`` §5).
    """
    check_same_shape(uncond=uncond, cond=cond)
    g = as_scalars(scale, like=cond, name="scale")
    verify(~g.isfinite().all(), lambda bad: ValueError(f"scale must be finite, got {scale!r}") if bad[0] else None)
    dtype = compute_dtype(uncond, cond)
    guided = torch.lerp(uncond.to(dtype), cond.to(dtype), per_sample(g.to(dtype), cond))
    return check_finite_result("guidance", "the result", guided, {"uncond": uncond, "cond": cond})
