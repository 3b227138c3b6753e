"""The CPU chunk size of the torch paths (d2f._chunks): the loss's fwd+bwd at 256 KiB, 1 MiB and 4 MiB."""

import pytest
import torch

import d2f
from d2f import _chunks


@pytest.mark.parametrize("chunk_bytes", [1 << 18, 1 << 20, 1 << 22], ids=["256KiB", "1MiB", "4MiB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loss_chunk_size(benchmark, monkeypatch, chunk_bytes, dtype):
    monkeypatch.setattr(_chunks, "CPU_CHUNK_BYTES", chunk_bytes)
    g = torch.Generator().manual_seed(0)
    out, data, noise = (torch.randn(64, 4, 96, 96, generator=g).to(dtype) for _ in range(3))
    out.requires_grad_(True)
    t = torch.rand(64, generator=g) * 0.9 + 0.05
    benchmark.group = f"cpu chunk size, fm_loss fwd+bwd 64x4x96x96 {'fp32' if dtype == torch.float32 else 'bf16'}"

    def once():
        out.grad = None
        d2f.fm_loss(out, data, noise, t, "v_prediction", backend="torch").backward()

    benchmark(once)
