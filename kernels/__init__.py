"""Fused Triton kernels behind ``d2f.fm_loss``, ``d2f.network_input`` and ``D2FVelocity.sample``.

Installed as ``d2f.kernels``; importing it needs the ``triton`` extra. Set ``TRITON_INTERPRET=1``
before the first import to run the kernels on CPU tensors (that is how the test suite runs them).
Layers: ``loss``/``step``/``interpolant`` hold a kernel and its launcher; ``autograd`` wraps the loss
launcher in a ``torch.autograd.Function``; the public functions in ``d2f`` dispatch to them.
"""

from .autograd import FMLossTriton
from .interpolant import network_input
from .loss import FLAG_NAMES
from .step import ode_step

__all__ = ["FLAG_NAMES", "FMLossTriton", "network_input", "ode_step"]
