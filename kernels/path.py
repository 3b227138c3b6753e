"""Must equal ``d2f.path.network_input``: the training-time network input ``z = alpha(t)*data + sigma(t)*noise``
in one pass.

``scale(t) * (t*data + (1-t)*noise)`` equals ``alpha*data + sigma*noise`` with ``alpha = t/n`` and
``sigma = (1-t)/n`` (``n = sqrt(t^2 + (1-t)^2)``), so each program reads its block of data and noise
once and writes z directly in the network's dtype.

Why the loss kernel does not read z back: the loss needs ``data - noise`` as its target, so it reads
data and noise anyway, and rebuilding ``x`` from them costs two multiply-adds in registers. Reading z
would add a third input stream and save nothing.
"""

import torch
import triton
import triton.language as tl

from ._launch import block_size, check_device


@triton.jit
def _network_input_kernel(data_ptr, noise_ptr, t_ptr, z_ptr, per_sample, blocks_per_sample, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = pid - b * blocks_per_sample
    # alpha and sigma in float64 from a float64 t, then cast (one scalar per program): from a float32 t,
    # sigma = (1-t)/n would be wrong by O(1) for t within float32's spacing of 1 (6e-8).
    t = tl.load(t_ptr + b).to(tl.float64)
    inv_n = 1.0 / tl.sqrt(t * t + (1.0 - t) * (1.0 - t))
    alpha = (t * inv_n).to(tl.float32)
    sigma = ((1.0 - t) * inv_n).to(tl.float32)
    offs = j * BLOCK + tl.arange(0, BLOCK)
    mask = offs < per_sample
    base = b.to(tl.int64) * per_sample
    d = tl.load(data_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.load(noise_ptr + base + offs, mask=mask, other=0.0).to(tl.float32)
    z = alpha * d + sigma * n
    tl.store(z_ptr + base + offs, z.to(z_ptr.dtype.element_ty), mask=mask)


def network_input(data: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t``: float64 ``(B,)`` on the inputs' device, already range-checked by the caller, which also checks
    the result for NaN and inf."""
    check_device(data, noise)
    d, n = data.contiguous(), noise.contiguous()
    z = torch.empty(d.shape, dtype=dtype, device=d.device)
    if z.numel() == 0:
        return z  # an empty batch, as the torch path returns it: no program to launch
    batch = d.shape[0]
    per_sample = d.numel() // batch
    block = block_size(2048)
    blocks_per_sample = triton.cdiv(per_sample, block)
    _network_input_kernel[(batch * blocks_per_sample,)](
        d, n, t, z, per_sample, blocks_per_sample, BLOCK=block, num_warps=8
    )
    return z
