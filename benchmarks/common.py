"""Shared benchmark set-up: shapes, dtypes, device, timing hygiene and the GB/s column."""

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(64, 4, 96, 96), (256, 4, 128, 128)]
DTYPES = [torch.float32, torch.bfloat16]
shape_ids = ["x".join(map(str, s)) for s in SHAPES]
dtype_ids = ["fp32", "bf16"]

needs_cuda = pytest.mark.skipif(DEVICE != "cuda", reason="CUDA only (Triton kernels, CUDA graphs)")


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def run(benchmark, fn, min_bytes: int) -> None:
    """Time ``fn`` (synchronised, after one warm-up call) and report GB/s against ``min_bytes``."""
    fn()
    sync()

    def once():
        fn()
        sync()

    benchmark(once)
    if benchmark.disabled:  # --benchmark-disable (CI): one call, checked for errors, nothing timed
        return
    seconds = benchmark.stats.stats.median
    benchmark.extra_info["GB/s"] = round(min_bytes / seconds / 1e9, 2)
    benchmark.extra_info["device"] = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
