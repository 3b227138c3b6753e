"""One step of ``D2FVelocity.sample``: guidance, conversion, update and the next network input.

The torch path here is the reference for the fused kernel in ``d2f.kernels.step`` (same arguments,
same results up to float32 rounding). With ``A, B`` the velocity coefficients at the evaluation time,
``h`` the step, ``g`` the guidance scale and ``s`` the scale at the step's end, and
``o = o_u + g*(o_c - o_u)`` when guided (``o_c`` given), else ``o = o_u``:

- ``EULER``: ``x' = x + h*(A*x + B*o)``, returns ``(x', s*x')``;
- ``HEUN_PREDICT``: ``u = A*x + B*o``, returns ``(u, s*(x + h*u))``;
- ``HEUN_CORRECT``: ``u2 = A*(x + h*u1) + B*o``, ``x' = x + h/2*(u1 + u2)``, returns ``(x', s*x')``.

Each result is a fixed linear combination of the inputs, so the torch path folds the scalars into one
coefficient per input and forms it in one accumulation (chunked in cache on the CPU, see ``d2f._chunks``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._backend import kernels, use_triton
from ._checks import raise_on_nonfinite_input
from ._chunks import row_chunks

EULER, HEUN_PREDICT, HEUN_CORRECT = 0, 1, 2


def _combine(terms: list[tuple[float, Tensor]], outputs: list[tuple[float, Tensor]]) -> None:
    """``out = s * sum(c * v for c, v in terms)`` for every ``(s, out)``, accumulated in ``terms[0]``'s dtype."""
    first = terms[0][1]
    # torch refuses a Python scalar beyond the accumulator's range (a RuntimeError); round it as IEEE and the
    # kernel do, to inf, so that ode_step's check of its result reports the overflow.
    big = torch.finfo(first.dtype).max
    terms = [(math.copysign(math.inf, c) if abs(c) > big else c, v) for c, v in terms]
    for rows in row_chunks(first):
        acc = torch.mul(first[rows], terms[0][0])
        for c, v in terms[1:]:
            acc.add_(v[rows], alpha=c)
        for s, out in outputs:
            torch.mul(acc, s, out=out[rows])


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
    """``x`` (and ``u1``) are the float32/float64 state; returns fresh ``(x' or u, z)`` with z in ``z_dtype``.

    Raises a ``ValueError`` instead of returning NaN or inf: naming ``x``, ``o_u``, ``o_c`` or ``u1`` when
    one of them holds NaN or inf, else saying that the step overflowed.
    """
    outputs = (o_u,) if o_c is None else (o_u, o_c)
    if use_triton(backend, x, *outputs):
        first, z = kernels().ode_step(mode, x.contiguous(), o_u, o_c, u1, a, b, h, g, s_next, z_dtype)
    else:
        first, z = _ode_step_torch(mode, x, o_u, o_c, u1, a, b, h, g, s_next, z_dtype)
    # One check of the two fresh results (a NaN or inf input always reaches them: 0 * inf is NaN); the
    # inputs are scanned only once something is already wrong.
    if not bool(first.isfinite().all() & z.isfinite().all()):
        raise_on_nonfinite_input("ode_step", x=x, o_u=o_u, o_c=o_c, u1=u1)
        raise ValueError(
            f"ode_step: the step overflowed (its result is not representable in {first.dtype}, or the next "
            f"network input in {z_dtype}) although the inputs are finite; a={a!r}, b={b!r}, h={h!r}, g={g!r}, "
            f"s_next={s_next!r}"
        )
    return first, z


def _ode_step_torch(mode, x, o_u, o_c, u1, a, b, h, g, s_next, z_dtype) -> tuple[Tensor, Tensor]:
    # The network output as terms: o = (1-g)*o_u + g*o_c, or o_u alone.
    o_terms = [(1.0, o_u)] if o_c is None else [(1 - g, o_u), (g, o_c)]
    first, z = torch.empty_like(x), torch.empty(x.shape, dtype=z_dtype, device=x.device)
    if mode == EULER:
        _combine([(1 + h * a, x)] + [(h * b * c, v) for c, v in o_terms], [(1.0, first), (s_next, z)])
    elif mode == HEUN_PREDICT:
        _combine([(a, x)] + [(b * c, v) for c, v in o_terms], [(1.0, first)])
        _combine([(1.0, x), (h, first)], [(s_next, z)])
    else:
        # x + h/2*(u1 + A*(x + h*u1) + B*o), expanded per input
        terms = [(1 + h * a / 2, x), (h / 2 * (1 + h * a), u1)] + [(h * b / 2 * c, v) for c, v in o_terms]
        _combine(terms, [(1.0, first), (s_next, z)])
    return first, z
