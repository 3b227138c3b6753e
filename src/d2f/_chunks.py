"""Row chunks for the torch paths' multi-pass elementwise work on the CPU.

Eager torch makes one pass over memory per operation. On the CPU, running those passes chunk by chunk
over ~1 MiB of float32 keeps the intermediates in cache, so memory sees each input read once and each
output written once; on 2 cores that cuts the loss's time by 25-55 % (benchmarks/README.md). On other devices
one chunk holds the whole batch: there each extra launch costs more than the traffic it saves.
"""

import math
from collections.abc import Iterator
from types import EllipsisType

from torch import Tensor

CPU_CHUNK_BYTES = 1 << 20  # measured: 1 MiB beats 256 KiB and 4 MiB


def row_chunks(x: Tensor) -> Iterator[slice | EllipsisType]:
    """Index expressions over ``x``'s rows (dim 0); a 0-d tensor is one chunk, ``...``; an empty batch none."""
    if x.ndim == 0:
        yield ...
        return
    batch = x.shape[0]
    rows = batch if x.device.type != "cpu" else max(1, CPU_CHUNK_BYTES // (4 * max(1, math.prod(x.shape[1:]))))
    for start in range(0, batch, rows):
        yield slice(start, start + rows)
