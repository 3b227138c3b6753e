"""The three training objectives: the time each draws, what it feeds the network, how it reads the output.

- ``d2f`` (Diff2Flow): ``t`` from a time sampler, the aligned input ``network_input(data, noise, t)`` at
  ``schedule.timestep(t)``, the output read through the network's own prediction type, ``fm_loss``.
- ``fm`` (naive flow matching, the paper's baseline): the unaligned ``interpolate(data, noise, t)`` with the
  raw ``t`` as its timestep, the output read as the velocity (prediction type ``velocity``), ``fm_loss``.
- ``diffusion`` (the teacher's own training): an integer timestep ``k``, the input
  ``alpha_k*data + sigma_k*noise``, the MSE to the prediction type's target (``diffusion_target``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .._checks import per_sample
from ..loss import fm_loss
from ..parametrization import diffusion_target
from ..path import interpolate, network_input
from ..schedule import Schedule
from ..time_samplers import lowest_t, sample_t, uniform_timestep

OBJECTIVES = ("d2f", "fm", "diffusion")


def prediction_type(objective: str, network_prediction_type: str) -> str:
    """What the objective reads the output as: ``velocity`` for naive FM, else the network's own type."""
    return "velocity" if objective == "fm" else network_prediction_type


def aligned(objective: str) -> bool:
    """Whether the network sees the aligned input at the converted timestep (all but naive FM)."""
    return objective != "fm"


def draw_time(
    objective: str, t_sampler: str | None, u: Tensor, z: Tensor, network_prediction_type: str, schedule: Schedule
) -> Tensor:
    """Each sample's time from its standard draws ``u ~ U(0, 1)`` and ``z ~ N(0, 1)``: an integer timestep ``k``
    for diffusion, else an FM time from ``t_sampler``."""
    if objective == "diffusion":
        return uniform_timestep(u, schedule.num_train_timesteps)
    return sample_t(t_sampler, u, z, prediction_type(objective, network_prediction_type), schedule)


def trained_t_min(objective: str, t_sampler: str | None, network_prediction_type: str, schedule: Schedule) -> float:
    """The lowest FM time :func:`draw_time` reaches, where sampling the trained network starts (its export's
    ``t_min``): the teacher's own lowest level for diffusion, the time sampler's for the flow objectives."""
    if objective == "diffusion":
        return lowest_t("diffusion-matched", network_prediction_type, schedule)
    return lowest_t(t_sampler, prediction_type(objective, network_prediction_type), schedule)


def objective_loss(
    objective: str,
    network: Callable[[Tensor, Tensor], Tensor],
    schedule: Schedule,
    network_prediction_type: str,
    data: Tensor,
    noise: Tensor,
    times: Tensor,
    dtype: torch.dtype,
) -> Tensor:
    """The loss of one batch. ``network(z, k)`` runs the model on input ``z`` (in ``dtype``) at timesteps
    ``k``; ``times`` are what :func:`draw_time` drew, on any device."""
    ptype = prediction_type(objective, network_prediction_type)
    if objective == "diffusion":
        times = times.to(data.device)
        ac = torch.tensor(schedule.alphas_cumprod, dtype=torch.float32, device=data.device)[times]
        alpha, sigma = ac.sqrt(), (1 - ac).sqrt()
        z = per_sample(alpha, data) * data + per_sample(sigma, noise) * noise
        target = diffusion_target(data, noise, alpha, sigma, ptype)
        return torch.nn.functional.mse_loss(network(z.to(dtype), times).float(), target)
    t = times.to(data.device)
    if objective == "d2f":
        out = network(network_input(data, noise, t, dtype=dtype), schedule.timestep(t))
    else:
        out = network(interpolate(data, noise, t).to(dtype), t)
    return fm_loss(out, data, noise, t, ptype)
