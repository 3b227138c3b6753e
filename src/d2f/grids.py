"""Sampling grids: FM times as float64 tensors, ``t = 0`` noise and ``t = 1`` data.

A grid is a 1-D tensor of ``n + 1`` times (``n`` steps, each from ``ts[i]`` to ``ts[i+1]``), or, only
where DDIM's own step rule demands it, an ``(n, 2)`` tensor of ``(start, end)`` per step (see
:func:`ddim_grid`). Grids may run either way: increasing generates, decreasing inverts.
:func:`sampling_grid` is the one place that turns a grid's name into a grid; :func:`grid_steps` checks a
grid and lists its steps for the solvers.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ._checks import as_time, check_bool, check_choice, check_positive_int, check_real, describe
from .parametrization import check_prediction_type
from .schedule import Schedule, check_schedule
from .time_samplers import lowest_t

SPACINGS = ("leading", "trailing", "linspace")
GRIDS = ("ddim", "uniform", "shift")
# A shift s and 1/s mirror each other (t <-> 1 - t). Shifts in use stay within about 20; far out the grid
# crowds its steps onto one end: shift_grid(4, 1e17) puts every interior time below 1e-16, and at shift
# 1e-17 they all round to t = 1 (no step left).
SHIFT_RANGE = (1e-3, 1e3)


def _one_time(t: float, name: str) -> float:
    tt = as_time(t, name=name)
    if tt.numel() != 1:
        raise ValueError(f"{name} must be one FM time, got shape {tuple(tt.shape)}")
    return float(tt)


def _check_ends(t_start: float, t_end: float) -> tuple[float, float]:
    a, b = _one_time(t_start, "t_start"), _one_time(t_end, "t_end")
    if a == b:
        raise ValueError(f"t_start and t_end must differ, both are {a}")
    return a, b


def check_shift(shift: float) -> float:
    """``shift`` as :func:`shift_grid` takes it, a number in ``SHIFT_RANGE``."""
    low, high = SHIFT_RANGE
    rule = f"be a number in [{low:g}, {high:g}]: further out the shifted grid crowds its steps onto one end"
    return check_real("shift", shift, rule, lambda s: low <= s <= high)


def check_steps_offset(steps_offset: int) -> int:
    """DDIM's ``steps_offset``, an integer >= 0."""
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, numbers.Integral) or steps_offset < 0:
        raise ValueError(f"steps_offset={steps_offset!r} must be an integer >= 0")
    return int(steps_offset)


def uniform_grid(n: int, t_start: float = 0.0, t_end: float = 1.0) -> Tensor:
    """``n`` equal steps in FM time from ``t_start`` to ``t_end``."""
    n = check_positive_int("n", n)
    a, b = _check_ends(t_start, t_end)
    return torch.linspace(a, b, n + 1, dtype=torch.float64)


def shift_grid(n: int, shift: float, t_start: float = 0.0, t_end: float = 1.0) -> Tensor:
    """SD3's time shift on a uniform grid: the noise level ``s = 1 - u`` becomes ``shift*s / (1 + (shift-1)*s)``.

    ``u`` runs over ``[0, 1]`` and the shifted grid is laid onto ``[t_start, t_end]``, so both ends stay where
    they are (a grid starts where its network was trained, ``sampling_grid``); on ``[0, 1]`` it is SD3's grid.
    ``shift > 1`` spends more steps at high noise; ``shift = 1`` is the uniform grid. ``shift`` must lie in
    ``SHIFT_RANGE``, [1e-3, 1e3].
    """
    check_shift(shift)
    a, b = _check_ends(t_start, t_end)
    low, high = min(a, b), max(a, b)  # noise end first: an inverting grid (a > b) is shifted alike
    u = (uniform_grid(n, a, b) - low) / (high - low)
    # Same map written as u / (u + shift*(1-u)): u = 0 and u = 1 stay exact, and no term cancels (the form
    # u / (1 + (shift-1)*(1-u)) gave 0/0 at u = 0 once shift - 1 rounded to -1).
    t = low + (high - low) * (u / (u + shift * (1 - u)))
    t[0], t[-1] = a, b
    return t


def ddim_timesteps(num_train_timesteps: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """The integer timesteps diffusers' ``DDIMScheduler.set_timesteps(n)`` lists, in its order."""
    T = num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].astype(np.int64)
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1].astype(np.int64) + steps_offset
    return np.round(np.arange(T, 0, -T / n)).astype(np.int64) - 1


def ddim_grid(
    schedule: Schedule,
    n: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> Tensor:
    """The FM grid on which Euler with the converted velocity reproduces diffusers' DDIM (eta = 0).

    DDIM steps from each listed timestep ``k`` to ``prev(k) = k - T // n``, and from there to alphabar = 1
    (``set_alpha_to_one=True``, FM time 1) or to ``alphas_cumprod[0]`` (FM time ``tau_0``) once
    ``prev(k) < 0``. Each step becomes the FM step ``tau(k) -> tau(prev(k))``.

    Returns a 1-D tensor of ``n + 1`` times when every step starts where the previous one ended
    (``leading`` spacing always; ``trailing`` when ``n`` divides ``T``). Otherwise DDIM lands at
    ``prev(k)`` and then treats that latent as if it were at the next listed timestep; the grid is
    then an ``(n, 2)`` tensor of ``(start, end)`` and :func:`d2f.sample` carries the state across each
    gap by holding the network input ``scale(t) * x`` fixed, exactly as DDIM does.

    A last step from timestep 0 to ``alphas_cumprod[0]`` (``set_alpha_to_one=False``) does not move, so it
    is dropped: the grid then has ``n - 1`` steps and saves a network call.

    The sampler returns the FM state ``x`` at the last time; DDIM's output latent is
    ``scale(ts[-1]) * x`` (equal to ``x`` when ``set_alpha_to_one=True``, since ``scale(1) = 1``).
    """
    check_schedule(schedule)
    T = schedule.num_train_timesteps
    n = check_positive_int("n", n)
    if n > T:
        raise ValueError(f"n={n} cannot exceed the schedule's num_train_timesteps={T}")
    check_choice("spacing", spacing, SPACINGS)
    check_bool("set_alpha_to_one", set_alpha_to_one)  # a truthy "no" would end the grid at t = 1
    ks = ddim_timesteps(T, n, spacing, check_steps_offset(steps_offset))
    if ks.max() >= T or ks.min() < 0:
        raise ValueError(
            f"spacing={spacing!r} with steps_offset={steps_offset} lists timesteps {ks.tolist()} outside [0, {T - 1}]"
        )
    taus = schedule.taus
    final = 1.0 if set_alpha_to_one else float(taus[0])
    prev = ks - T // n
    starts = taus[ks]
    ends = np.where(prev >= 0, taus[np.clip(prev, 0, None)], final)
    # DDIM's step from timestep 0 to alphabar_0 (set_alpha_to_one=False) is the identity: drop it.
    moving = starts != ends
    if not moving.any():
        raise ValueError(
            f"with n={n}, spacing={spacing!r}, steps_offset={steps_offset} and set_alpha_to_one=False DDIM "
            "takes no step that moves; use more steps or set_alpha_to_one=True"
        )
    ks, prev, starts, ends = ks[moving], prev[moving], starts[moving], ends[moving]
    if np.array_equal(prev[:-1], ks[1:]):
        return torch.from_numpy(np.append(starts, ends[-1]))
    return torch.from_numpy(np.stack([starts, ends], axis=1))


def sampling_grid(
    grid: str,
    n: int,
    schedule: Schedule,
    prediction_type: str,
    shift: float = 3.0,
    spacing: str = "leading",
    steps_offset: int = 1,
    set_alpha_to_one: bool = True,
    t_start: float | None = None,
) -> Tensor:
    """The grid named ``grid`` with ``n`` steps, for a network of ``prediction_type`` trained on ``schedule``.

    ``ddim``: :func:`ddim_grid` with the given DDIM step rule (default: leading spacing, offset 1, ending at
    ``t = 1``), for converted diffusion models only. ``uniform`` and ``shift``: :func:`uniform_grid` and
    :func:`shift_grid` from ``t_start`` to 1. ``t_start`` is the lowest time the network was trained at (a
    flow-finetuned network's is in its export, ``D2FVelocity.t_min``); unset, a converted diffusion network's:
    ``lowest_t("diffusion-matched", ...)``, which is ``schedule.t_min`` (SD's: 0.064, timestep 999). Below it
    the network sees noise levels it never learned, and an epsilon network's error is amplified by ``1/t``.
    """
    check_choice("grid", grid, GRIDS)
    check_prediction_type(prediction_type)
    check_schedule(schedule)
    if grid == "ddim":
        if prediction_type == "velocity":
            raise ValueError("grid='ddim' needs a converted model; a naive-FM model samples on grid='uniform'")
        return ddim_grid(schedule, n, spacing, steps_offset, set_alpha_to_one)
    if t_start is None:
        t_start = lowest_t("diffusion-matched", prediction_type, schedule)
    if grid == "uniform":
        return uniform_grid(n, t_start, 1.0)
    return shift_grid(n, shift, t_start, 1.0)


def grid_steps(ts: Tensor | Sequence[float]) -> list[tuple[float, float]]:
    """``(start, end)`` of every step of a 1-D grid or an ``(n, 2)`` step table, after checking it."""
    if ts.is_complex() if isinstance(ts, Tensor) else np.iscomplexobj(ts):  # the cast would drop the imaginary part
        raise ValueError(f"ts must be real, got {describe(ts)}")
    try:
        grid = torch.as_tensor(ts, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as error:  # None, a string: torch's message names no argument
        raise ValueError(f"ts must be a grid of FM times (a tensor, array or list), got {describe(ts)}") from error
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
