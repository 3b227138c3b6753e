"""Training-time samplers of FM time ``t``: pure functions of a generator.

Each keeps ``t`` where the prediction type's velocity is finite by construction (``docs/conventions.md``
§3): epsilon needs ``t > 0`` and sample needs ``t < 1``. ``uniform`` and ``logit-normal`` draw from the
prediction type's ``valid_range`` (``T_MARGIN`` away from a singular end, so ``|A|, |B| <= 1/T_MARGIN``);
``diffusion-matched`` draws the teacher's own noise levels ``tau_k``, leaving out ``k = T-1`` when that is
``t = 0`` for epsilon.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._checks import check_choice, check_positive_int
from .parametrization import valid_range
from .schedule import Schedule

T_SAMPLERS = ("uniform", "logit-normal", "diffusion-matched")


def uniform_t(n: int, generator: torch.Generator, prediction_type: str) -> Tensor:
    """``t ~ U(lo, hi)`` on the valid range of ``prediction_type`` (float64, shape ``(n,)``)."""
    lo, hi = valid_range(prediction_type)
    u = torch.rand(check_positive_int("n", n), generator=generator, dtype=torch.float64)
    return lo + (hi - lo) * u


def logit_normal_t(
    n: int, generator: torch.Generator, prediction_type: str, loc: float = 0.0, scale: float = 1.0
) -> Tensor:
    """SD3's ``t = sigmoid(N(loc, scale^2))``, clamped to the valid range of ``prediction_type``."""
    lo, hi = valid_range(prediction_type)
    z = torch.randn(check_positive_int("n", n), generator=generator, dtype=torch.float64)
    return torch.sigmoid(loc + scale * z).clamp(lo, hi)


def diffusion_matched_t(n: int, generator: torch.Generator, prediction_type: str, schedule: Schedule) -> Tensor:
    """``k ~ U{0..T-1}``, ``t = fm_time(k)``: the noise levels the teacher was trained on."""
    T = schedule.num_train_timesteps
    top = T - 1 if (prediction_type == "epsilon" and schedule.zero_terminal_snr) else T
    k = torch.randint(0, top, (check_positive_int("n", n),), generator=generator)
    return torch.from_numpy(schedule.taus.copy())[k]


def sample_t(
    name: str, n: int, generator: torch.Generator, prediction_type: str, schedule: Schedule | None = None
) -> Tensor:
    """Dispatch by the CLI's ``--t-sampler`` name."""
    check_choice("t_sampler", name, T_SAMPLERS)
    if name == "uniform":
        return uniform_t(n, generator, prediction_type)
    if name == "logit-normal":
        return logit_normal_t(n, generator, prediction_type)
    if schedule is None:
        raise ValueError("t_sampler='diffusion-matched' needs the teacher's schedule")
    return diffusion_matched_t(n, generator, prediction_type, schedule)
