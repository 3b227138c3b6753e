"""Launch parameters shared by the kernels."""

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def block_size(default: int) -> int:
    """Small blocks under the interpreter, so that small test tensors span several blocks and a tail."""
    return 64 if interpreting() else default


def check_device(*tensors: torch.Tensor) -> None:
    if not interpreting() and not all(t.is_cuda for t in tensors):
        raise ValueError("the triton backend needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors)")
