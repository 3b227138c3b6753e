"""Must equal ``d2f.training.draws.uniforms`` and ``normals``: a micro-batch's counter-based draws in one launch.

Each program takes one sample's position and a block of counter indices, runs Philox4x32-10 in registers on
uint32 words (``tl.umulhi`` gives the high half of each product that the torch path reads from an int64 bit
pattern) and writes four values per counter. The uniforms are the same bit-for-bit (an exact conversion of
the top 24 bits); the normals go through ``log``, ``sqrt``, ``cos`` and ``sin``, which may round the last bit
differently from torch's.

Why one kernel matters: the torch path is some 150 elementwise launches per call (ten rounds of multiplies,
shifts, masks and xors), which a GPU spends launching, not computing.
"""

import torch
import triton
import triton.language as tl

from ._launch import block_size, check_device


@triton.jit
def _philox(c0, c1, c2, c3, k0, k1, BLOCK: tl.constexpr):
    # The constants as uint32 tensors: a bare literal above 2^31 would be an int64 and lift the products out of
    # 32-bit arithmetic.
    m0 = tl.full([BLOCK], 0xD2511F53, tl.uint32)
    m1 = tl.full([BLOCK], 0xCD9E8D57, tl.uint32)
    w0 = tl.full([BLOCK], 0x9E3779B9, tl.uint32)
    w1 = tl.full([BLOCK], 0xBB67AE85, tl.uint32)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, m0)
        lo0 = c0 * m0
        hi1 = tl.umulhi(c2, m1)
        lo1 = c2 * m1
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + w0
        k1 = k1 + w1
    return c0, c1, c2, c3


@triton.jit
def _uniform(x):
    return ((x >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def _draws_kernel(
    where_ptr, out_ptr, k0, k1, stream, n, counters, blocks_per_sample, NORMAL: tl.constexpr, BLOCK: tl.constexpr
):
    pid = tl.program_id(0)
    b = pid // blocks_per_sample
    j = pid - b * blocks_per_sample
    index = j * BLOCK + tl.arange(0, BLOCK)
    position = tl.load(where_ptr + b)
    zero = tl.zeros([BLOCK], dtype=tl.uint32)
    c0 = zero + (position & 0xFFFFFFFF).to(tl.uint32)
    c1 = zero + (position >> 32).to(tl.uint32)
    c2 = zero + stream.to(tl.uint32)
    c3 = index.to(tl.uint32)
    key0 = zero + k0.to(tl.uint32)
    key1 = zero + k1.to(tl.uint32)
    x0, x1, x2, x3 = _philox(c0, c1, c2, c3, key0, key1, BLOCK)
    v0, v1, v2, v3 = _uniform(x0), _uniform(x1), _uniform(x2), _uniform(x3)
    if NORMAL:  # Box-Muller on the pairs (v0, v1) and (v2, v3), as the torch path pairs them
        r0 = tl.sqrt(-2.0 * tl.log(v0))
        r1 = tl.sqrt(-2.0 * tl.log(v2))
        a0 = 6.283185307179586 * v1
        a1 = 6.283185307179586 * v3
        v0, v1, v2, v3 = r0 * tl.cos(a0), r0 * tl.sin(a0), r1 * tl.cos(a1), r1 * tl.sin(a1)
    row = out_ptr + b.to(tl.int64) * n
    first = 4 * index
    live = index < counters
    tl.store(row + first, v0, mask=live & (first < n))
    tl.store(row + first + 1, v1, mask=live & (first + 1 < n))
    tl.store(row + first + 2, v2, mask=live & (first + 2 < n))
    tl.store(row + first + 3, v3, mask=live & (first + 3 < n))


def _launch(key: int, where: torch.Tensor, stream: int, n: int, normal: bool) -> torch.Tensor:
    check_device(where)
    out = torch.empty(len(where), n, dtype=torch.float32, device=where.device)
    if out.numel() == 0:
        return out
    counters = -(-n // 4)
    block = block_size(1024)
    blocks_per_sample = triton.cdiv(counters, block)
    k0, k1 = key & 0xFFFFFFFF, (key >> 32) & 0xFFFFFFFF
    _draws_kernel[(len(where) * blocks_per_sample,)](
        where.to(torch.int64).contiguous(),
        out,
        k0,
        k1,
        stream,
        n,
        counters,
        blocks_per_sample,
        NORMAL=normal,
        BLOCK=block,
    )
    return out


def uniforms(key: int, where: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    return _launch(key, where, stream, n, normal=False)


def normals(key: int, where: torch.Tensor, stream: int, n: int) -> torch.Tensor:
    return _launch(key, where, stream, n, normal=True)
