"""``solver="auto"``: the sampler that E5 measured best for a budget of network calls.

The budget ``nfe`` is the number of network calls per sample (a step count for one-call solvers; guidance's
batched pair counts once). E5 (``d2f reproduce --experiment e5``, ``docs/results.md``) scores d2f's solvers and
grids, and diffusers' schedulers, at equal calls: on the teachers as converted (zero-shot) and the miniature
Stable Diffusion for the left-hand column, on a d2f LoRA finetune and a reflow model for the right-hand one.
Where its 2000-sample report (KID, three seeds) has measured a budget on a teacher or a finetune,
``evaluation.few_step.auto_table`` reads the row off it: of the d2f rows that no other beats beyond the seed
spread on any model of the kind (the pipeline weighed with the teachers), the simplest; where every row is
beaten on some model, the lowest summed rank. The other budgets keep the choice of the earlier 200-sample run
(FID).

=================  ==========================================  ==========================================
network calls      converted diffusion network                 network finetuned as a flow (d2f, reflow)
=================  ==========================================  ==========================================
1                  Euler (one step)                            Euler (one step)
2                  multistep, uniform grid, 2 steps            midpoint, one step
3                  multistep, uniform grid                     multistep, shift grid
4                  midpoint, uniform grid, 2 steps             multistep, shift grid
5 and more         multistep, uniform grid                     multistep, shift grid
=================  ==========================================  ==========================================

A budget E5 did not measure takes the row of the nearest measured budget below it; a two-call solver (midpoint)
on an odd budget gives way to multistep on the same grid. At one call every row is one Euler step from where the
network was trained (``D2FVelocity.t_min``; both grids start there). On the miniature Stable Diffusion the
left-hand column is the best row at 2 calls only: at 3 multistep on the shift grid beats it, at 4 diffusers'
DDIM, and from 5 calls on multistep on DDIM's own grid (``grid="ddim"``) ties the best diffusers schedulers,
which the uniform grid does not (``docs/results.md``, E5).
"""

from __future__ import annotations

from typing import NamedTuple

from ._checks import check_positive_int

AUTO = "auto"

# (solver, grid) at each budget E5 measured, for converted (False) and flow-finetuned (True) networks. Where the
# 2000-sample report (results/few_step.json) has measured a budget, evaluation.few_step.auto_table of it; the
# others keep the 200-sample run's choice (results/few_step_200_samples.json). tests/test_auto_sampler.py holds
# the table to both.
_EULER, _MIDPOINT = ("euler", "uniform"), ("midpoint", "uniform")
_CONVERTED, _FLOW = ("multistep", "uniform"), ("multistep", "shift")
TABLE: dict[bool, dict[int, tuple[str, str]]] = {
    False: {1: _EULER, 2: _CONVERTED, 3: _CONVERTED, 4: _MIDPOINT, 6: _CONVERTED, 8: _CONVERTED, 10: _CONVERTED},
    True: {1: _EULER, 2: _MIDPOINT, 3: _FLOW, 4: _FLOW, 6: _FLOW, 8: _FLOW, 10: _FLOW},
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
