"""``solver="auto"``: the sampler that E5 measured best for a budget of network calls.

The budget ``nfe`` is the number of network calls per sample (a step count for one-call solvers; guidance's
batched pair counts once). E5 (``d2f reproduce --experiment e5``, ``docs/results.md``) scored every d2f solver and
grid, and diffusers' schedulers, at equal calls with KID on 2000 samples and three seeds: on the two teachers as
converted (zero-shot: the embedded v-prediction one and its epsilon twin), and on a d2f LoRA finetune and a reflow
model. ``evaluation.few_step.auto_table`` reads the table below off that report: at each measured budget, of the
d2f rows that no other d2f row beats beyond the seed spread on any model of the kind, the simplest.

=================  ==========================================  ==========================================
network calls      converted diffusion network                 network finetuned as a flow (d2f, reflow)
=================  ==========================================  ==========================================
{table}
=================  ==========================================  ==========================================

A budget E5 did not measure takes the row of the nearest measured budget below it; a two-call solver (midpoint)
on an odd budget gives way to multistep on the same grid. Multistep's first step is Euler, so at one call every
row is one Euler step from where the network was trained (``D2FVelocity.t_min``; both grids start there). The
table was measured on MNIST-scale models; the miniature Stable Diffusion's comparison is in ``docs/results.md``.
"""

from __future__ import annotations

from typing import NamedTuple

from ._checks import check_positive_int

AUTO = "auto"

# (solver, grid) at each budget E5 measured, for converted (False) and flow-finetuned (True) networks:
# evaluation.few_step.auto_table of results/few_step.json (tests/test_auto_sampler.py holds them equal).
TABLE: dict[bool, dict[int, tuple[str, str]]] = {
    False: {1: ("multistep", "uniform"), 2: ("multistep", "uniform"), 3: ("multistep", "uniform")},
    True: {1: ("multistep", "shift"), 2: ("midpoint", "uniform"), 3: ("multistep", "shift")},
}
TWO_CALLS = ("midpoint", "heun")


class Sampler(NamedTuple):
    solver: str
    grid: str
    steps: int


def auto_sampler(nfe: int, flow_finetuned: bool) -> Sampler:
    """The table's sampler for ``nfe`` network calls: its solver, grid and step count (``steps`` calls in
    all; a midpoint step costs two)."""
    check_positive_int("nfe", nfe)
    measured = TABLE[bool(flow_finetuned)]
    solver, grid = measured[max(n for n in measured if n <= nfe)]
    if solver in TWO_CALLS and nfe % 2:
        solver = "multistep"
    return Sampler(solver, grid, nfe // 2 if solver in TWO_CALLS else nfe)
