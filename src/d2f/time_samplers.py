"""Training-time samplers of FM time ``t``: pure functions of standard draws, ``u ~ U(0, 1)`` or ``z ~ N(0, 1)``.

The trainer makes the draws on its device (``d2f.training.draws``); the samplers only shape them. Each keeps
``t`` where the prediction type's velocity is finite by construction (``docs/conventions.md`` §3): epsilon
needs ``t > 0`` and sample needs ``t < 1``. ``uniform`` and ``logit-normal`` draw from the prediction type's
``valid_range`` (``T_MARGIN`` away from a singular end, so ``|A|, |B| <= 1/T_MARGIN``);
``diffusion-matched`` draws the teacher's own noise levels ``tau_k``, leaving out ``k = T-1`` when that is
``t = 0`` for epsilon.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice
from .parametrization import valid_range
from .schedule import Schedule

T_SAMPLERS = ("uniform", "logit-normal", "diffusion-matched")


def uniform_t(u: Tensor, prediction_type: str) -> Tensor:
    """``t = lo + (hi - lo) * u``, uniform on the valid range of ``prediction_type`` (float64)."""
    lo, hi = valid_range(prediction_type)
    return lo + (hi - lo) * u.double()


def logit_normal_t(z: Tensor, prediction_type: str, loc: float = 0.0, scale: float = 1.0) -> Tensor:
    """SD3's ``t = sigmoid(loc + scale * z)``, clamped to the valid range of ``prediction_type`` (float64)."""
    lo, hi = valid_range(prediction_type)
    return torch.sigmoid(loc + scale * z.double()).clamp(lo, hi)


def uniform_timestep(u: Tensor, top: int) -> Tensor:
    """``k = floor(u * top)``, uniform on ``{0, ..., top - 1}`` (int64; ``u < 1``)."""
    return (u.double() * top).long().clamp_max(top - 1)


def _matched_top(prediction_type: str, schedule: Schedule) -> int:
    """How many of the teacher's timesteps ``diffusion-matched`` draws: all but ``k = T-1`` where that is
    ``t = 0`` for epsilon (zero terminal SNR), which has no velocity."""
    T = schedule.num_train_timesteps
    return T - 1 if (prediction_type == "epsilon" and schedule.zero_terminal_snr) else T


def diffusion_matched_t(u: Tensor, prediction_type: str, schedule: Schedule) -> Tensor:
    """``k ~ U{0..T-1}`` from ``u``, ``t = fm_time(k)``: the noise levels the teacher was trained on."""
    k = uniform_timestep(u, _matched_top(prediction_type, schedule))
    return torch.from_numpy(schedule.taus.copy()).to(u.device)[k]


def lowest_t(name: str, prediction_type: str, schedule: Schedule) -> float:
    """The lowest FM time the sampler ``name`` draws for ``prediction_type`` (the low end of its range).

    A network trained on those draws has seen no noisier input, so sampling it starts there. A diffusion
    network's own training draws the ``diffusion-matched`` levels: its lowest is ``tau_{T-1}``
    (``schedule.t_min``), or ``tau_{T-2}`` for epsilon under zero terminal SNR. ``uniform`` and ``logit-normal``
    reach the low end of ``valid_range`` (logit-normal's clamp)."""
    check_choice("t_sampler", name, T_SAMPLERS)
    if name == "diffusion-matched":
        return float(schedule.taus[_matched_top(prediction_type, schedule) - 1])
    return valid_range(prediction_type)[0]


def sample_t(name: str, u: Tensor, z: Tensor, prediction_type: str, schedule: Schedule | None = None) -> Tensor:
    """Dispatch by the CLI's ``--t-sampler`` name; ``u`` and ``z`` are one standard draw per sample each (a
    sampler uses one of them)."""
    check_choice("t_sampler", name, T_SAMPLERS)
    if name == "uniform":
        return uniform_t(u, prediction_type)
    if name == "logit-normal":
        return logit_normal_t(z, prediction_type)
    if schedule is None:
        raise ValueError("t_sampler='diffusion-matched' needs the teacher's schedule")
    return diffusion_matched_t(u, prediction_type, schedule)
