"""The flags kernels raise for d2f's checks (``d2f.deferred``): counts of NaN or inf among the values a
program has loaded anyway, so a check costs no extra pass over memory."""

import triton
import triton.language as tl

FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def nonfinite_count(v, mask):
    bad = (tl.abs(v) > FLT_MAX) | (v != v)
    return tl.sum(tl.where(mask & bad, 1.0, 0.0), axis=0)


@triton.jit
def flag_nonfinite(flags_ptr, slot, v, mask):
    """Add the block's count of NaN or inf in ``v`` to ``flags[slot]``; only blocks that found one touch it."""
    count = nonfinite_count(v, mask)
    tl.atomic_add(flags_ptr + slot, count, mask=count > 0)
