"""Fused Triton kernels behind ``d2f.fm_loss``, ``d2f.network_input``, the ODE solvers' update and the trainer's
draws.

Installed as ``d2f.kernels``; importing it needs the ``triton`` extra. Set ``TRITON_INTERPRET=1``
before the first import to run the kernels on CPU tensors (that is how the test suite runs them).
Each file mirrors the d2f module of the same name and holds one op's kernel, launcher and (for the loss)
autograd function; the public functions in ``d2f`` dispatch to the function named like themselves.
"""

from .draws import normals, uniforms
from .loss import fm_loss
from .path import network_input
from .solvers import ode_step

__all__ = ["fm_loss", "network_input", "normals", "ode_step", "uniforms"]
