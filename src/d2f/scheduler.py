"""``D2FScheduler``: a diffusers scheduler that samples a diffusion network as a flow model.

Swap it into any DDPM/DDIM-family pipeline (``pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)``)
and the pipeline runs unchanged. The pipeline's latents hold the FM state ``x``:

- ``init_noise_sigma = 1 / scale(t_0)``, so the pipeline's ``randn * init_noise_sigma`` is DDIM's start;
- ``scale_model_input`` multiplies by ``scale(t)``: the network sees its own noisy input ``z``;
- ``timesteps`` are float32 network timesteps ``k = timestep(t)`` of every evaluation (Heun and midpoint
  evaluate twice per step, and ``order = 2`` tells the pipeline);
- ``step`` converts the (already guided) output into a velocity and takes the FM step; it finds ``t`` by
  its step index, never by inverting a float ``k``;
- after the last step ``prev_sample`` is put back into the network's latent space, ``scale(t_end) * x``,
  which is what DDIM returns (it equals ``x`` when the grid ends at ``t = 1``).

With the default ``grid="ddim"`` and ``solver="euler"`` the pipeline reproduces DDIMScheduler (eta = 0)
exactly, for the config's own ``timestep_spacing``, ``steps_offset`` and ``set_alpha_to_one``
(``docs/conventions.md`` §5). ``grid="uniform"`` and ``grid="shift"`` (SD3's shift) are FM grids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ._checks import check_choice, compute_dtype
from .grids import GRIDS, SPACINGS, grid_steps, sampling_grid
from .parametrization import SINGULAR_TIMES, diffusion_to_velocity, velocity_to_diffusion
from .path import interpolate, relabel_ratio, scale
from .schedule import Schedule
from .solvers import CORRECT, EULER, PREDICT, PREDICTOR_FRACTION, SOLVERS, ode_step, stage_times


@dataclass
class D2FSchedulerOutput(BaseOutput):
    """``prev_sample``: the next FM state (the network's latent after the last step);
    ``pred_original_sample``: the clean latent implied by this evaluation, ``x + (1 - t) * u`` at the state
    ``x`` and time ``t`` the network was evaluated at (for a two-stage step's second evaluation: the predictor
    state, as diffusers' Heun scheduler does)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


@dataclass(frozen=True)
class _Evaluation:
    step: int  # which FM step
    stage: int  # 0: at the step's start; 1: Heun's end point or the midpoint
    t: float  # FM time of this network evaluation


class D2FScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching sampling of a diffusion network inside diffusers pipelines (Diff2Flow conversion).

    Schedule keys are diffusers' own (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``,
    ``num_train_timesteps``, ``rescale_betas_zero_snr``, ``prediction_type``) and the DDIM step rule's
    (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``); keys of other schedulers are ignored by
    ``from_config``. d2f's own: ``solver`` (euler | heun | midpoint), ``grid`` (ddim | uniform | shift) and
    ``shift``.
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        rescale_betas_zero_snr: bool = False,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        solver: str = "euler",
        grid: str = "ddim",
        shift: float = 3.0,
    ):
        check_choice("solver", solver, SOLVERS)
        check_choice("grid", grid, GRIDS)
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
        self.schedule = Schedule.from_diffusers(dict(self.config))
        self.order = 1 if solver == "euler" else 2
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self._steps: list[tuple[float, float]] = []
        self._evaluations: list[_Evaluation] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, u) at a 2-stage step's start

    # ------------------------------------------------------------------------------------------ grid
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the FM grid for ``num_inference_steps`` steps and the network timesteps of its evaluations."""
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        grid = sampling_grid(
            cfg.grid,
            num_inference_steps,
            self.schedule,
            cfg.prediction_type,
            cfg.shift,
            cfg.timestep_spacing,
            cfg.steps_offset,
            cfg.set_alpha_to_one,
        )
        self._steps = grid_steps(grid)
        singular = SINGULAR_TIMES[cfg.prediction_type]
        evaluations = [
            _Evaluation(i, stage, t)
            for i, (t0, t1) in enumerate(self._steps)
            for stage, t in enumerate(stage_times(cfg.solver, t0, t1, singular))
        ]
        if evaluations[0].t in singular:
            raise ValueError(
                f"the grid starts at t={evaluations[0].t}, where prediction_type={self.config.prediction_type!r} has "
                "no velocity (zero terminal SNR with epsilon); use v_prediction or grid='uniform'"
            )
        self._evaluations = evaluations
        t = torch.tensor([e.t for e in evaluations], dtype=torch.float64)
        self.timesteps = self.schedule.timestep(t).to(device=device, dtype=torch.float32)
        self.init_noise_sigma = 1 / float(scale(self._steps[0][0]))
        self._step_index, self._begin_index, self._first = None, None, None

    # ----------------------------------------------------------------------------------- indexing
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Called by img2img pipelines that start part-way (``timesteps[t_start * order:]``)."""
        if not 0 <= begin_index < len(self._evaluations):
            raise ValueError(f"begin_index={begin_index} is outside [0, {len(self._evaluations)})")
        if self._evaluations[begin_index].stage != 0:
            raise ValueError(f"begin_index={begin_index} falls inside a two-stage step; use a multiple of order")
        self._begin_index = begin_index

    def _current(self, timestep: float | torch.Tensor | None) -> _Evaluation:
        if not self._evaluations:
            raise ValueError("call set_timesteps(num_inference_steps) before sampling")
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                # The pipeline hands back our own float32 timesteps: exact equality finds the first one.
                matches = (self.timesteps.cpu() == torch.as_tensor(timestep, dtype=torch.float32).cpu()).nonzero()
                if matches.numel() == 0:
                    raise ValueError(f"timestep {timestep!r} is not one of this scheduler's timesteps")
                self._step_index = int(matches[0])
        if self._step_index >= len(self._evaluations):
            raise ValueError("step() was called more often than set_timesteps planned")
        return self._evaluations[self._step_index]

    # ------------------------------------------------------------------------------------ the loop
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """``z = scale(t) * x``: the network's input for the FM state held in the pipeline's latents."""
        return sample * float(scale(self._current(timestep).t))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> D2FSchedulerOutput | tuple[torch.Tensor]:
        """One network evaluation's worth of the FM solver (guidance is applied by the pipeline before).

        The output becomes a velocity (``diffusion_to_velocity``) and the solver's own update
        (``d2f.solvers.ode_step`` with ``A = 0, B = 1``) takes it.
        """
        evaluation = self._current(timestep)
        t0, t1 = self._steps[evaluation.step]
        h, c = t1 - t0, PREDICTOR_FRACTION.get(self.config.solver, 1.0)
        x = sample.to(compute_dtype(sample))
        u = diffusion_to_velocity(model_output, x, evaluation.t, self.config.prediction_type)
        next_index = self._step_index + 1
        predictor = evaluation.stage == 0 and (
            next_index < len(self._evaluations) and self._evaluations[next_index].step == evaluation.step
        )
        if predictor:  # the pipeline evaluates the network at x + c*h*u next
            self._first = (x, u)
            _, prev = ode_step(PREDICT, x, u, None, None, 0.0, 1.0, h, 1.0, 1.0, sample.dtype, c=c)
        elif evaluation.stage == 1:
            x0, u1 = self._first
            carry = self._carry(evaluation.step)
            _, prev = ode_step(CORRECT, x0, u, None, u1, 0.0, 1.0, h, 1.0, carry, sample.dtype, c=c)
            self._first = None
        else:
            _, prev = ode_step(EULER, x, u, None, None, 0.0, 1.0, h, 1.0, self._carry(evaluation.step), sample.dtype)
        self._step_index = next_index
        if not return_dict:
            return (prev,)
        original = velocity_to_diffusion(u, x, evaluation.t, "sample")  # the implied clean latent x + (1-t)*u
        return D2FSchedulerOutput(prev_sample=prev, pred_original_sample=original.to(sample.dtype))

    def _carry(self, step: int) -> float:
        """The factor on the state after ``step``: across a DDIM step-table gap ``scale(t) * x`` is kept fixed,
        and after the last step the state returns to the network's latent ``z = scale(t_end) * x``."""
        end = self._steps[step][1]
        if step + 1 < len(self._steps):
            start = self._steps[step + 1][0]
            return 1.0 if start == end else relabel_ratio(end, start)
        return float(scale(end))

    # ------------------------------------------------------------------------------------ img2img
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The FM state at the network timesteps ``timesteps``: ``interpolate(data, noise, fm_time(k))``."""
        return interpolate(
            original_samples, noise, self.schedule.fm_time(torch.as_tensor(timesteps).reshape(-1).double().cpu())
        )

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """FlowMatch pipelines' name for ``add_noise``."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
