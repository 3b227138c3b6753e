"""Where and how d2f computes: the device when none is given, and the torch path or the Triton kernels.

The fused kernels live in the repository's top-level ``kernels/`` folder, installed as ``d2f.kernels``; importing
them needs the ``triton`` extra, and ``TRITON_INTERPRET=1`` set before the first import runs them on CPU tensors
(that is how the test suite runs them). Each file mirrors the d2f module of the same name and holds one op's
kernel, launcher and (for the loss) autograd function; :func:`kernels` hands them out by the names of the d2f
functions they serve.

``kernels/`` has no ``__init__.py``, so ``d2f.kernels`` is a namespace package: run from the repository's root,
where Python puts the current directory first on ``sys.path``, a regular package there would shadow PyPI's
``kernels``, which transformers imports.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
from types import SimpleNamespace

import torch

from ._checks import check_choice

BACKENDS = ("auto", "torch", "triton")


def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def kernels() -> SimpleNamespace:
    """The kernels' entry points ``fm_loss``, ``network_input``, ``ode_step``, ``normals`` and ``uniforms``,
    imported on first use so that ``import d2f`` never needs triton."""
    if not _triton_installed():
        raise ImportError("backend='triton' needs the triton extra: pip install 'd2f[triton]' (Linux)")
    modules = ("loss", "path", "solvers", "draws")
    loss, path, solvers, draws = (importlib.import_module(f"d2f.kernels.{name}") for name in modules)
    return SimpleNamespace(
        fm_loss=loss.fm_loss,
        network_input=path.network_input,
        ode_step=solvers.ode_step,
        normals=draws.normals,
        uniforms=draws.uniforms,
    )


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


def _available(kind: str) -> bool | None:
    """Whether this machine has a device of ``kind`` that runs a network: None for a kind d2f does not run on
    (``meta`` holds shapes but no values; ``xla``, ``hpu`` and the rest need their own launchers)."""
    if kind == "cpu":
        return True
    if kind == "cuda":
        return torch.cuda.is_available()
    if kind == "mps":
        return torch.backends.mps.is_available()
    return None


def device_or_default(device: str | torch.device | None) -> torch.device:
    """``device`` as a ``torch.device``; unset: CUDA when available, else the CPU. A string torch cannot
    parse, a kind d2f does not run on (``meta``, ``xla``), a kind this machine lacks (CUDA or MPS where
    there is none) and a CUDA index beyond its devices are errors that name it and what is allowed."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from e
    available = _available(resolved.type)
    if available is None:
        raise ValueError(f"device={device!r}: d2f runs networks on 'cpu', 'cuda' or 'mps' (or leave it unset)")
    if not available:
        kind = {"cuda": "CUDA", "mps": "MPS"}[resolved.type]
        raise ValueError(f"device={device!r}: {kind} is not available here; use 'cpu' or leave it unset")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ValueError(f"device={device!r}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return resolved
