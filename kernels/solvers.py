"""Must equal ``d2f.solvers.ode_step``: one solver update fused with guidance, conversion and the next
network input.

With per-step scalars ``A, B`` (the velocity coefficients at the evaluation time), the step size ``h``,
the guidance scale ``g``, ``s`` the next network input's scale, ``c`` the predictor fraction (Heun 1,
midpoint 1/2; ``w = 1/(2c)``) and ``k`` the multistep weight of the previous velocity, each program
reads its block of the float32 state ``x`` and the raw network outputs once:

    o = o_u + g*(o_c - o_u)          (only when guided; else o = o_u)
    u = A*x + B*o
    EULER:    x' = x + h*u;                                          writes x' (fp32) and z' = s*x'
    PREDICT:  writes u (fp32) and z_p = s*(x + c*h*u)                (the predictor state is not stored)
    CORRECT:  u2 = A*(x + c*h*u1) + B*o;  x' = x + h*((1-w)*u1 + w*u2);  writes x', z'
    MULTISTEP: x' = x + h*((1+k)*u - k*u1)  (u1 the previous velocity, absent on the first step);
              writes x', z' and u (fp32), the next step's u1

``z`` is written in the network's dtype, ready for the next call, so the sampler does not rescale x in a
separate pass (only across the gaps of a DDIM step table). The same pass counts NaN or inf in what it loads and
writes into five flags (``d2f.solvers.STEP_FLAGS``, then the results), which stay on the device until
``d2f.deferred`` reads them.
"""

import torch
import triton
import triton.language as tl

from ._flags import flag_nonfinite
from ._launch import block_size, check_device


@triton.jit
def _ode_step_kernel(
    x_ptr,
    ou_ptr,
    oc_ptr,
    u1_ptr,
    x_out_ptr,
    z_out_ptr,
    u_out_ptr,
    flags_ptr,
    numel,
    a,
    b,
    h,
    g,
    s_next,
    c,
    k,
    MODE: tl.constexpr,  # d2f.solvers' EULER = 0, PREDICT = 1, CORRECT = 2, MULTISTEP = 3
    GUIDED: tl.constexpr,
    HISTORY: tl.constexpr,  # MULTISTEP: u1 holds the previous velocity
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    o = tl.load(ou_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    flag_nonfinite(flags_ptr, 0, x, mask)
    flag_nonfinite(flags_ptr, 1, o, mask)
    if GUIDED:
        oc = tl.load(oc_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        flag_nonfinite(flags_ptr, 2, oc, mask)
        o = o + g * (oc - o)
    if MODE == 0:
        first = x + h * (a * x + b * o)
        z = (s_next * first).to(z_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + offs, first, mask=mask)
    elif MODE == 1:
        first = a * x + b * o
        z = (s_next * (x + (c * h) * first)).to(z_out_ptr.dtype.element_ty)
        tl.store(u_out_ptr + offs, first, mask=mask)
    elif MODE == 3:
        # Adams-Bashforth 2: u is linear in t through (t - h_prev, u1) and (t, u); its integral over [t, t + h]
        # is h*(u + (h / (2*h_prev))*(u - u1)) = h*((1+k)*u - k*u1).
        u = a * x + b * o
        step = (1.0 + k) * u
        if HISTORY:
            u1 = tl.load(u1_ptr + offs, mask=mask, other=0.0)
            flag_nonfinite(flags_ptr, 3, u1, mask)
            step = step - k * u1
        first = x + h * step
        z = (s_next * first).to(z_out_ptr.dtype.element_ty)
        tl.store(u_out_ptr + offs, u, mask=mask)
        tl.store(x_out_ptr + offs, first, mask=mask)
    else:
        w = 0.5 / c
        u1 = tl.load(u1_ptr + offs, mask=mask, other=0.0)
        flag_nonfinite(flags_ptr, 3, u1, mask)
        u2 = a * (x + (c * h) * u1) + b * o
        first = x + h * ((1.0 - w) * u1 + w * u2)
        z = (s_next * first).to(z_out_ptr.dtype.element_ty)
        tl.store(x_out_ptr + offs, first, mask=mask)
    tl.store(z_out_ptr + offs, z, mask=mask)
    # The results' slot: the fresh state (or velocity), or the next network input in its own dtype.
    flag_nonfinite(flags_ptr, 4, first + z.to(tl.float32) * 0.0, mask)


def ode_step(mode, x, o_u, o_c, u1, a, b, h, g, s_next, z_dtype, c, k) -> tuple[torch.Tensor, ...]:
    """Arguments as ``d2f.solvers.ode_step`` takes them; returns ``(x', z')`` for EULER and CORRECT,
    ``(u, z_p)`` for PREDICT, ``(x', z', u)`` for MULTISTEP, each followed by the step's flags: float32 counts
    of NaN or inf in ``x``, ``o_u``, ``o_c``, ``u1`` and the results (``d2f.solvers.STEP_FLAGS``).

    ``x`` is contiguous float32, ``u1`` float32 (made contiguous here); outputs are fresh buffers.
    """
    check_device(x, o_u)
    o_u = o_u.contiguous()
    guided = o_c is not None
    o_c = o_c.contiguous() if guided else o_u
    first = torch.empty_like(x)  # x' or u
    z = torch.empty(x.shape, dtype=z_dtype, device=x.device)
    u = torch.empty_like(x) if mode == 3 else first
    flags = torch.zeros(5, dtype=torch.float32, device=x.device)
    block = block_size(4096)
    _ode_step_kernel[(triton.cdiv(x.numel(), block),)](
        x,
        o_u,
        o_c,
        u1.contiguous() if u1 is not None else x,
        first,
        z,
        u,
        flags,
        x.numel(),
        a,
        b,
        h,
        g,
        s_next,
        c,
        k,
        MODE=mode,
        GUIDED=guided,
        HISTORY=mode == 3 and u1 is not None,
        BLOCK=block,
        num_warps=8,
    )
    return (first, z, u, flags) if mode == 3 else (first, z, flags)
