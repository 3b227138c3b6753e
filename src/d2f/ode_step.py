"""One step of ``D2FVelocity.sample``: guidance, conversion, update and the next network input.

The torch path here is the reference for the fused kernel in ``d2f.kernels.step`` (same arguments,
same results up to float32 rounding). With ``A, B`` the velocity coefficients at the evaluation time,
``h`` the step, ``g`` the guidance scale and ``s`` the scale at the step's end:

- ``EULER``: ``x' = x + h*(A*x + B*o)``, returns ``(x', s*x')``;
- ``HEUN_PREDICT``: ``u = A*x + B*o``, returns ``(u, s*(x + h*u))``;
- ``HEUN_CORRECT``: ``u2 = A*(x + h*u1) + B*o``, ``x' = x + h/2*(u1 + u2)``, returns ``(x', s*x')``;

where ``o = o_u + g*(o_c - o_u)`` when guided (``o_c`` given), else ``o = o_u``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._backend import kernels, use_triton

EULER, HEUN_PREDICT, HEUN_CORRECT = 0, 1, 2


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
) -> tuple[Tensor, Tensor]:
    """``x`` (and ``u1``) are the float32/float64 state; returns fresh ``(x' or u, z)`` with z in ``z_dtype``."""
    outputs = (o_u,) if o_c is None else (o_u, o_c)
    if use_triton(backend, x, *outputs):
        return kernels().ode_step(mode, x.contiguous(), o_u, o_c, u1, a, b, h, g, s_next, z_dtype)
    o = o_u.to(x.dtype) if o_c is None else torch.lerp(o_u.to(x.dtype), o_c.to(x.dtype), g)
    if mode == HEUN_CORRECT:
        u2 = x.add(u1, alpha=h).mul_(a).add_(o, alpha=b)
        x_new = x.add(u1 + u2, alpha=h / 2)
        return x_new, (x_new * s_next).to(z_dtype)
    u = torch.add(x * a, o, alpha=b)
    if mode == HEUN_PREDICT:
        return u, (x.add(u, alpha=h) * s_next).to(z_dtype)
    x_new = x.add(u, alpha=h)
    return x_new, (x_new * s_next).to(z_dtype)
