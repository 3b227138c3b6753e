"""Where and how d2f computes: the device when none is given, and the torch path or the Triton kernels
(``d2f.kernels``)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from ._checks import check_choice

BACKENDS = ("auto", "torch", "triton")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernels() -> ModuleType:
    """``d2f.kernels``, imported on first use so that ``import d2f`` never needs triton."""
    if not _triton_installed():
        raise ImportError("backend='triton' needs the triton extra: pip install 'd2f[triton]' (Linux)")
    return importlib.import_module("d2f.kernels")


def use_triton(backend: str, *tensors: torch.Tensor) -> bool:
    """``auto``: Triton for CUDA tensors when triton is installed, else torch; float64 always takes torch.

    ``triton`` forces the kernels and says why it cannot when it cannot.
    """
    check_choice("backend", backend, BACKENDS)
    if backend == "torch":
        return False
    float64 = any(t.dtype == torch.float64 for t in tensors)
    if backend == "auto":
        return not float64 and all(t.is_cuda for t in tensors) and _triton_installed()
    if float64:
        raise ValueError("backend='triton' does not run float64 inputs; use backend='torch' or 'auto'")
    if not all(t.is_cuda for t in tensors) and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            "backend='triton' needs CUDA tensors; got a tensor on "
            f"{next(t.device for t in tensors if not t.is_cuda)} (set TRITON_INTERPRET=1 before importing d2f "
            "to run the kernels on the CPU through Triton's interpreter, for testing)"
        )
    kernels()
    return True


def device_or_default(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; unset: CUDA when available, else the CPU. A string torch cannot
    parse, or CUDA where there is none, is an error that names it."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available here; use 'cpu' or leave it unset")
    return resolved
