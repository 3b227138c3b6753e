"""``solver="auto"``: the sampler that E5 measured best for a budget of network calls.

The budget ``nfe`` is the number of network calls per sample (a step count for one-call solvers; guidance's
batched pair counts once). E5 (``d2f reproduce --experiment e5``, ``docs/results.md``) compared every d2f
solver and grid with diffusers' schedulers at equal calls, on the two teachers as converted (zero-shot: the
embedded v-prediction one and its epsilon twin), on a d2f LoRA finetune and on a reflow model:

=================  ==========================================  ==========================================
network calls      converted diffusion network                 network finetuned as a flow (d2f, reflow)
=================  ==========================================  ==========================================
1                  Euler (one step)                            Euler (one step)
2                  multistep, uniform grid, 2 steps            midpoint, one step
3 and more         multistep, uniform grid                     multistep, shift grid
=================  ==========================================  ==========================================

Multistep's first step is Euler, so at one call every row is one Euler step from where the network was
trained (``D2FVelocity.t_min``; both grids start there). The table was measured on MNIST-scale models; nothing
here has been measured on Stable Diffusion.
"""

from __future__ import annotations

from typing import NamedTuple

from ._checks import check_positive_int

AUTO = "auto"


class Sampler(NamedTuple):
    solver: str
    grid: str
    steps: int


def auto_sampler(nfe: int, flow_finetuned: bool) -> Sampler:
    """The table's sampler for ``nfe`` network calls: its solver, grid and step count (``steps`` calls in
    all; midpoint's one step costs two)."""
    check_positive_int("nfe", nfe)
    if flow_finetuned and nfe == 2:
        return Sampler("midpoint", "uniform", 1)
    return Sampler("multistep", "shift" if flow_finetuned else "uniform", nfe)
