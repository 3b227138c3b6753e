"""d2f._chunks: the CPU's row chunks cover every row once, in order, ~1 MiB of float32 at a time; the torch paths
that walk them (the loss, the ODE step) give the one-pass result on a state of several chunks."""

import torch

from d2f import fm_loss
from d2f._chunks import CPU_CHUNK_BYTES, row_chunks
from d2f.solvers import EULER, ode_step


def test_the_chunks_cover_each_row_once_in_order():
    assert CPU_CHUNK_BYTES == 1 << 20
    x = torch.empty(11, 4, 16384)  # 256 KiB of float32 a row: four rows a chunk
    chunks = list(row_chunks(x))
    assert chunks == [slice(0, 4), slice(4, 8), slice(8, 12)]
    small = list(row_chunks(torch.empty(3, 4)))  # small rows: one chunk
    assert len(small) == 1 and torch.arange(3)[small[0]].tolist() == [0, 1, 2]
    assert list(row_chunks(torch.empty(300_000, 1))) == [slice(0, 262144), slice(262144, 524288)]  # 4 B a row
    assert list(row_chunks(torch.empty(2, 1_000_000))) == [slice(0, 1), slice(1, 2)]  # a row beyond 1 MiB: one each
    assert list(row_chunks(torch.empty(0, 4))) == []
    assert list(row_chunks(torch.tensor(1.0))) == [...]


def test_the_loss_and_the_step_over_several_chunks_equal_one_pass():
    g = torch.Generator().manual_seed(0)
    o, data, noise = (torch.randn(5, 3, 200, 200, generator=g, dtype=torch.float64) for _ in range(3))  # 3 chunks
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64)
    out = o.clone().requires_grad_(True)
    loss = fm_loss(out, data, noise, t, "velocity", reduction="none", backend="torch")
    torch.testing.assert_close(loss, ((o - (data - noise)) ** 2).mean((1, 2, 3)), rtol=1e-12, atol=0)
    loss.sum().backward()
    torch.testing.assert_close(out.grad, 2 * (o - (data - noise)) / o[0].numel(), rtol=1e-11, atol=0)
    x_next, z = ode_step(EULER, data, o, None, None, 0.0, 1.0, 0.25, 1.0, 2.0, torch.float32, "torch")
    torch.testing.assert_close(x_next, data + 0.25 * o, rtol=1e-12, atol=0)
    torch.testing.assert_close(z, (2.0 * (data + 0.25 * o)).float())
