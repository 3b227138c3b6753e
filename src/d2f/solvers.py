"""ODE solvers for ``dx/dt = u(x, t)`` over an explicit grid of FM times.

Any velocity field works: ``velocity_fn(x, t)`` takes the state and a Python float ``t`` and returns a
tensor shaped like ``x``. A field may declare ``singular_times`` (FM times where it cannot be
evaluated); fields that declare nothing are treated as singular at both ends, 0 and 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ._checks import check_choice, describe
from .path import scale

SOLVERS = ("euler", "heun", "midpoint")
VelocityFn = Callable[[Tensor, float], Tensor]
Callback = Callable[[int, float, Tensor, Tensor], None]
State = TypeVar("State")


def grid_steps(ts: Tensor | Sequence[float]) -> list[tuple[float, float]]:
    """``(start, end)`` of every step of a 1-D grid or an ``(n, 2)`` step table, after checking it."""
    grid = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    if grid.ndim == 1 and grid.numel() >= 2:
        steps = torch.stack([grid[:-1], grid[1:]], dim=1)
    elif grid.ndim == 2 and grid.shape[1] == 2 and grid.shape[0] >= 1:
        steps = grid
    else:
        raise ValueError(
            f"ts must be a 1-D grid of >= 2 times or an (n, 2) table of steps, got shape {tuple(grid.shape)}"
        )
    if not bool(((grid >= 0) & (grid <= 1)).all()):
        raise ValueError(f"ts must lie in [0, 1], got {describe(grid)}")
    direction = torch.sign(steps[:, 1] - steps[:, 0])
    if bool((direction == 0).any()) or not bool((direction == direction[0]).all()):
        raise ValueError(
            f"ts must be strictly monotone (all steps the same direction, none empty), got {describe(grid)}"
        )
    return [(float(a), float(b)) for a, b in steps.tolist()]


def _evaluate(velocity_fn: VelocityFn, x: Tensor, t: float) -> Tensor:
    u = velocity_fn(x, t)
    if not isinstance(u, Tensor) or u.shape != x.shape:
        raise ValueError(
            f"velocity_fn returned {describe(u) if isinstance(u, Tensor) else type(u).__name__} "
            f"for a state of shape {tuple(x.shape)}; it must return a tensor of the same shape"
        )
    return u.to(x.dtype)


def check_singular_starts(steps: list[tuple[float, float]], singular: Sequence[float]) -> None:
    for i, (start, _) in enumerate(steps):
        if start in singular:
            raise ValueError(
                f"step {i} starts at t={start}, where velocity_fn is singular (singular_times={tuple(singular)}); "
                "start the grid inside the open interval, e.g. at schedule.t_min"
            )


def walk(
    steps: list[tuple[float, float]],
    state: State,
    advance: Callable[[int, State, float, float], State],
    relabel: Callable[[State, float, float], State],
    progress: bool,
    desc: str,
) -> State:
    """Run ``advance(i, state, t0, t1)`` over the steps; ``relabel(state, t_from, t_to)`` across a gap.

    Gaps occur only in DDIM step tables, where DDIM keeps its latent ``z = scale(t) * x`` and relabels
    its time; ``relabel`` does the same to the solver's state.
    """
    previous_end = steps[0][0]
    for i, (t0, t1) in enumerate(tqdm(steps, disable=not progress, desc=desc, unit="step")):
        if t0 != previous_end:
            state = relabel(state, previous_end, t0)
        state = advance(i, state, t0, t1)
        previous_end = t1
    return state


def relabel_ratio(t_from: float, t_to: float) -> float:
    """Factor that keeps ``scale(t) * x`` fixed when the state's time changes from ``t_from`` to ``t_to``."""
    return float(scale(t_from) / scale(t_to))


def sample(
    velocity_fn: VelocityFn,
    x: Tensor,
    ts: Tensor | Sequence[float],
    solver: str = "euler",
    callback: Callback | None = None,
    progress: bool = False,
) -> Tensor:
    """Integrate from ``ts[0]`` to ``ts[-1]`` and return the final state only.

    Args:
        velocity_fn: ``u = velocity_fn(x, t)``.
        x: the FM state at ``ts[0]``. From pure noise at ``ts[0] > 0`` start with ``noise / scale(ts[0])``,
            as DDIM does (``D2FVelocity.sample`` does this for you).
        ts: a grid from :mod:`d2f.grids`; increasing generates, decreasing inverts (data -> noise).
        solver: ``"euler"`` (order 1), ``"heun"`` or ``"midpoint"`` (order 2). Heun's corrector is skipped
            on a step that ends at a singular time of ``velocity_fn``, which then is a plain Euler step.
        callback: ``callback(i, t, x, u)`` before step ``i`` with the state and velocity at its start.
        progress: show a progress bar.

    The state is kept in float32 (float64 if ``x`` is float64); the caller's ``x`` is never modified.
    """
    check_choice("solver", solver, SOLVERS)
    steps = grid_steps(ts)
    singular = tuple(getattr(velocity_fn, "singular_times", (0.0, 1.0)))
    check_singular_starts(steps, singular)

    def advance(i: int, x: Tensor, t0: float, t1: float) -> Tensor:
        # Updates are out of place, so the caller's x and any state handed to callback stay untouched.
        h = t1 - t0
        u = _evaluate(velocity_fn, x, t0)
        if callback is not None:
            callback(i, t0, x, u)
        if solver == "euler" or (solver == "heun" and t1 in singular):
            return x.add(u, alpha=h)
        if solver == "heun":
            return x.add(u + _evaluate(velocity_fn, x.add(u, alpha=h), t1), alpha=h / 2)
        return x.add(_evaluate(velocity_fn, x.add(u, alpha=h / 2), t0 + h / 2), alpha=h)

    x = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
    return walk(steps, x, advance, lambda x, a, b: x * relabel_ratio(a, b), progress, f"d2f {solver}")
