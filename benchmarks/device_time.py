"""Where the time of one fm_loss fwd+bwd and one guided Euler step goes on a GPU: wall clock against kernels.

pytest-benchmark's medians (bench_loss.py, bench_step.py) time a synchronised call: launches, Python, the
host checks and the kernels together. At these shapes that is mostly overhead, so this script also reads
the kernels' own device time from the CUDA profiler and the GB/s it implies for the minimal traffic.

Usage (CUDA host): python benchmarks/device_time.py [COPY_GBPS]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench_loss
import bench_step
from common import DTYPES, SHAPES, dtype_ids, shape_ids

ITERS = 20


def wall_and_device(fn) -> tuple[float, float]:
    """Seconds per call: synchronised wall clock, and the summed device time of the kernels it ran."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(ITERS):
        fn()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - start) / ITERS
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(ITERS):
            fn()
        torch.cuda.synchronize()
    device_us = sum(getattr(e, "self_device_time_total", 0.0) for e in prof.key_averages())
    return wall, device_us / 1e6 / ITERS


def cases():
    for shape in SHAPES:
        for dtype in DTYPES:
            tag = f"{shape_ids[SHAPES.index(shape)]} {dtype_ids[DTYPES.index(dtype)]}"
            o, data, noise, t = bench_loss.inputs(shape, dtype)
            for impl in ("torch", "compile", "triton"):
                step = bench_loss.make_step(impl, o, data, noise, t)

                def loss_once(step=step, o=o):
                    o.grad = None
                    step()

                yield f"fm_loss fwd+bwd {tag}", impl, loss_once, 4 * o.numel() * o.element_size()
            x, o_u, o_c = bench_step.inputs(shape, dtype)
            for impl in ("torch", "compile", "triton"):
                nbytes = 2 * x.numel() * 4 + 3 * o_u.numel() * o_u.element_size()
                yield f"cfg euler step {tag}", impl, bench_step.make_step(impl, x, o_u, o_c), nbytes


def main(copy_gbps: float | None) -> None:
    print(f"# {torch.cuda.get_device_name()}  torch {torch.__version__}")
    print(f"{'benchmark':<36} {'impl':<8} {'wall':>10} {'kernels':>10} {'kernel GB/s':>12} {'% copy':>7}")
    for group, impl, fn, nbytes in cases():
        wall, device = wall_and_device(fn)
        gbps = nbytes / device / 1e9 if device else float("nan")
        share = f"{100 * gbps / copy_gbps:>6.0f}%" if copy_gbps and device else f"{'-':>7}"
        print(f"{group:<36} {impl:<8} {wall * 1e3:>7.3f} ms {device * 1e6:>7.1f} us {gbps:>12.0f} {share}")


if __name__ == "__main__":
    main(float(sys.argv[1]) if len(sys.argv) > 1 else None)
