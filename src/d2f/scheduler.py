"""``D2FScheduler``: a diffusers scheduler that samples a diffusion network as a flow model.

Swap it into any DDPM/DDIM-family pipeline (``pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)``)
and the pipeline runs unchanged. The pipeline's latents hold what DDIM's hold, the network's noisy input
``z = scale(t) * x`` of the FM state ``x``, so pipelines that skip ``init_noise_sigma`` and
``scale_model_input`` (``DDPMPipeline``, ``DDIMPipeline``) sample correctly too:

- ``init_noise_sigma = 1`` and ``scale_model_input`` is the identity, as for DDIM;
- ``timesteps`` are float32 network timesteps ``k = timestep(t)`` of every evaluation (Heun and midpoint
  evaluate twice per step, and ``order = 2`` tells the pipeline; Euler and multistep once);
- ``step`` divides the latent by ``scale(t)``, converts the (already guided) output into a velocity, takes
  the FM step and returns ``scale(t') * x'`` (a two-stage step's predictor likewise); it finds ``t`` by its
  step index, never by inverting a float ``k``. Across a gap of DDIM's step table the latent is kept, as
  DDIM keeps it.

With the defaults (``grid`` unset, which is ``"ddim"``, and ``solver="euler"``) the pipeline reproduces
DDIMScheduler step for step, under every key DDIM takes: ``timestep_spacing``, ``steps_offset``,
``set_alpha_to_one`` (its identity last step included), ``clip_sample``/``clip_sample_range``, ``thresholding``
and ``step``'s ``eta``, ``use_clipped_model_output``, ``generator`` and ``variance_noise``
(``d2f.solvers.ddim_step``, ``docs/conventions.md`` §5). ``grid="uniform"`` and ``grid="shift"`` (SD3's shift)
are FM grids from ``t_min``, the lowest FM time the network was trained at (unset: a converted network's,
``schedule.t_min``; a flow-finetuned export's scheduler config records its own); with Euler, clipping and
``eta`` keep their meaning there (DDIM's transition between the grid's noise levels). Heun, midpoint and
multistep clip or threshold the predicted clean sample at every network call and take the velocity from it, as
DPM-Solver++ does with its data prediction (``docs/conventions.md`` §5); they refuse ``eta > 0``, and
multistep refuses a DDIM step table with gaps (``timestep_spacing`` other than ``leading`` where the step count
does not divide ``num_train_timesteps``).

``solver="auto"`` takes ``num_inference_steps`` as network calls and samples with what E5 measured best for
that budget (``d2f.auto_sampler``): for a converted diffusion network by default, for a network finetuned as a
flow with ``flow_finetuned=True`` (d2f's exports of flow objectives write that, with ``solver="auto"``). It
picks the grid too unless ``grid`` is set.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ._checks import (
    as_scalars,
    check_bool,
    check_choice,
    check_real,
    check_same_shape,
    compute_dtype,
    describe,
)
from .auto_sampler import AUTO, auto_sampler
from .grids import GRIDS, SPACINGS, check_shift, check_steps_offset, ddim_timesteps, grid_steps, sampling_grid
from .parametrization import SINGULAR_TIMES, diffusion_target, diffusion_to_velocity, velocity_to_diffusion
from .path import alpha_sigma, network_input, scale
from .schedule import Schedule
from .solvers import (
    CORRECT,
    EULER,
    MULTISTEP,
    PREDICT,
    PREDICTOR_FRACTION,
    SOLVERS,
    ddim_step,
    multistep_history,
    ode_step,
    stage_times,
)


@dataclass
class D2FSchedulerOutput(BaseOutput):
    """``prev_sample``: the next latent, ``scale(t') * x'`` of the next FM state;
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


# The numeric keys: each is refused unless it is a finite real number (a string would fail a comparison, NaN would
# clip to NaN) that its rule allows.
_NUMERIC_KEYS = {
    "beta_start": ("be a finite number", lambda v: True),
    "beta_end": ("be a finite number", lambda v: True),
    "clip_sample_range": ("be a finite number > 0", lambda v: v > 0),
    "sample_max_value": ("be a finite number >= 1", lambda v: v >= 1),
    "dynamic_thresholding_ratio": (
        "lie in (0, 1): the quantile of the predicted clean sample's magnitudes that thresholding bounds",
        lambda v: 0 < v < 1,
    ),
}


def _check_numbers(config: Mapping[str, Any]) -> None:
    """D2FScheduler's numeric keys, checked where they enter (``shift`` and ``steps_offset`` were read first by
    ``set_timesteps``, or never, with another grid)."""
    for name, (rule, allowed) in _NUMERIC_KEYS.items():
        check_real(name, config[name], rule, allowed)
    check_shift(config["shift"])
    check_steps_offset(config["steps_offset"])
    if config["t_min"] is not None:
        rule = "be None (a converted network's) or an FM time in [0, 1)"
        check_real("t_min", config["t_min"], rule, lambda v: 0 <= v < 1)


class D2FScheduler(SchedulerMixin, ConfigMixin):
    """Flow-matching sampling of a diffusion network inside diffusers pipelines (Diff2Flow conversion).

    Every key of DDIMScheduler, with its defaults: the schedule (``beta_schedule``, ``beta_start``,
    ``beta_end``, ``trained_betas``, ``num_train_timesteps``, ``rescale_betas_zero_snr``, ``prediction_type``),
    the step rule (``timestep_spacing``, ``steps_offset``, ``set_alpha_to_one``) and the clipping of the
    predicted clean sample (``clip_sample``, ``clip_sample_range``, ``thresholding``,
    ``dynamic_thresholding_ratio``, ``sample_max_value``). Keys of other schedulers are kept in the config by
    ``from_config`` and not read. d2f's own: ``solver`` (euler | heun | midpoint | multistep | auto), ``grid``
    (ddim | uniform | shift; unset: ddim, or the table's with ``solver="auto"``), ``shift`` and
    ``flow_finetuned`` (what the network is, read by ``solver="auto"`` only). ``betas``, ``alphas``,
    ``alphas_cumprod`` and ``final_alpha_cumprod`` are DDIM's float32 attributes, from d2f's float64 table.
    ``t_min``: where the uniform and shift grids start, the lowest FM time the network was trained at (unset:
    a converted diffusion network's, ``d2f.time_samplers.lowest_t("diffusion-matched", ...)``, which is
    ``schedule.t_min``).
    The boolean keys (``clip_sample``, ``set_alpha_to_one``, ``thresholding``, ``rescale_betas_zero_snr``,
    ``flow_finetuned``) must be ``True`` or ``False``; the numeric ones finite numbers (numpy scalars too, no strings
    or bools): ``clip_sample_range > 0``, ``sample_max_value >= 1``, ``dynamic_thresholding_ratio`` in (0, 1),
    ``shift`` in ``d2f.grids.SHIFT_RANGE``, ``steps_offset`` an integer >= 0; ``trained_betas`` (a list, array or
    tensor) must be 1-D with ``num_train_timesteps`` entries (``Schedule.from_diffusers``). All are checked here,
    whether ``set_timesteps`` reads them or not.
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
        clip_sample: bool = True,
        clip_sample_range: float = 1.0,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        solver: str = "euler",
        grid: str | None = None,
        shift: float = 3.0,
        flow_finetuned: bool = False,
        t_min: float | None = None,
    ):
        for name, value in (
            ("rescale_betas_zero_snr", rescale_betas_zero_snr),
            ("set_alpha_to_one", set_alpha_to_one),
            ("clip_sample", clip_sample),
            ("thresholding", thresholding),
            ("flow_finetuned", flow_finetuned),
        ):
            check_bool(name, value)
        check_choice("solver", solver, (*SOLVERS, AUTO))
        if grid is not None:
            check_choice("grid", grid, GRIDS)
        check_choice("timestep_spacing", timestep_spacing, SPACINGS)
        _check_numbers(self.config)
        self.schedule = Schedule.from_diffusers(dict(self.config))
        self.betas = torch.tensor(self.schedule.diffusers_config()["trained_betas"], dtype=torch.float32)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.from_numpy(self.schedule.alphas_cumprod.copy()).to(torch.float32)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        # Network calls per requested step; auto's requested steps are network calls.
        self.order = 2 if solver in PREDICTOR_FRACTION else 1
        self._solver = solver  # auto's choice is made per step count, by set_timesteps
        self.init_noise_sigma = 1.0  # DDIM's: the latent at the grid's start is the noise itself
        self.num_inference_steps: int | None = None
        self.timesteps = torch.empty(0)
        self._steps: list[tuple[float, float]] = []
        self._evaluations: list[_Evaluation] = []
        self._step_index: int | None = None
        self._begin_index: int | None = None
        self._first: tuple[torch.Tensor, torch.Tensor] | None = None  # (x, u) at a 2-stage step's start
        self._previous: tuple[torch.Tensor, float] | None = None  # multistep: the last step's (u, h)

    # ------------------------------------------------------------------------------------------ grid
    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Build the FM grid for ``num_inference_steps`` steps and the network timesteps of its evaluations."""
        cfg = self.config
        self.num_inference_steps = num_inference_steps
        if cfg.solver == AUTO:
            self._solver, grid_name, steps = auto_sampler(num_inference_steps, cfg.flow_finetuned)
        else:
            grid_name, steps = "ddim", num_inference_steps
        grid_name = cfg.grid or grid_name
        grid = sampling_grid(
            grid_name,
            steps,
            self.schedule,
            cfg.prediction_type,
            cfg.shift,
            cfg.timestep_spacing,
            cfg.steps_offset,
            cfg.set_alpha_to_one,
            cfg.t_min,
        )
        self._steps = grid_steps(grid)
        if self._solver == "multistep" and grid.ndim == 2:
            raise ValueError(
                f"solver='multistep' needs steps that chain, and DDIM's step table for timestep_spacing="
                f"{cfg.timestep_spacing!r} and {steps} steps has gaps; use timestep_spacing='leading', "
                "a step count that divides num_train_timesteps, or grid='uniform'"
            )
        if grid_name == "ddim" and not cfg.set_alpha_to_one:
            T, spacing = self.schedule.num_train_timesteps, cfg.timestep_spacing
            if ddim_timesteps(T, steps, spacing, cfg.steps_offset)[-1] == 0:
                # DDIM's last step, timestep 0 to alphas_cumprod[0], which ddim_grid drops: taken too (it clips)
                self._steps.append((float(self.schedule.taus[0]),) * 2)
        singular = SINGULAR_TIMES[cfg.prediction_type]
        if self._clips_velocity:  # the velocity of the clipped clean sample has no value at t = 1
            singular = (*singular, 1.0)
        evaluations = [
            _Evaluation(i, stage, t)
            for i, (t0, t1) in enumerate(self._steps)
            for stage, t in enumerate(stage_times(self._solver, t0, t1, singular))
        ]
        if evaluations[0].t in singular:
            raise ValueError(
                f"the grid starts at t={evaluations[0].t}, where prediction_type={self.config.prediction_type!r} has "
                "no velocity (zero terminal SNR with epsilon); use v_prediction or grid='uniform'"
            )
        self._evaluations = evaluations
        t = torch.tensor([e.t for e in evaluations], dtype=torch.float64)
        self.timesteps = self.schedule.timestep(t).to(device=device, dtype=torch.float32)
        self._step_index, self._begin_index, self._first, self._previous = None, None, None, None

    # ----------------------------------------------------------------------------------- indexing
    @property
    def step_index(self) -> int | None:
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Called by img2img pipelines that start part-way (``timesteps[t_start * order:]``)."""
        n = len(self._evaluations)
        if isinstance(begin_index, bool) or not isinstance(begin_index, numbers.Integral) or not 0 <= begin_index < n:
            raise ValueError(f"begin_index={begin_index!r} must be an integer in [0, {n})")
        if self._evaluations[begin_index].stage != 0:
            if self.config.solver == AUTO:
                raise ValueError(
                    f"begin_index={begin_index} falls inside a two-stage step, and {self._named_solver()} cannot "
                    "start one half-way (a pipeline's strength < 1 starts part-way); use strength=1.0, another "
                    "step count, or solver='multistep'"
                )
            raise ValueError(
                f"begin_index={begin_index} falls inside a two-stage {self._solver} step; a pipeline starting "
                f"part-way begins at a multiple of order={self.order}"
            )
        self._begin_index = begin_index

    def _current(self, timestep: float | torch.Tensor | None) -> _Evaluation:
        if not self._evaluations:
            raise ValueError("call set_timesteps(num_inference_steps) before sampling")
        if self._step_index is None:
            if self._begin_index is not None:
                self._step_index = self._begin_index
            else:
                self._step_index = self._index_of(timestep)
        if self._step_index >= len(self._evaluations):
            raise ValueError("step() was called more often than set_timesteps planned")
        return self._evaluations[self._step_index]

    def _index_of(self, timestep: float | torch.Tensor | None) -> int:
        """The evaluation at which a pipeline's first ``timestep`` starts the loop.

        The pipeline hands back our own float32 timesteps, as a number or a tensor (of the batch's size, all one
        timestep, for some pipelines). A Heun step's end is the next step's start, so its timestep repeats: a
        pipeline starting there starts the step, the second match (as diffusers' Heun scheduler takes it)."""
        try:
            k = torch.as_tensor(timestep, dtype=torch.float32).cpu().reshape(-1)
            one = bool((k == k[0]).all())
            matches = (self.timesteps.cpu() == k[0]).nonzero().reshape(-1).tolist() if one else []
        except (TypeError, ValueError, RuntimeError, IndexError):  # None, a string or an empty tensor: no timestep
            matches = []
        if not matches:
            raise ValueError(
                f"timestep {describe(timestep)} is not one of this scheduler's timesteps (a number, or a tensor "
                "whose entries are all that number)"
            )
        return matches[1 if len(matches) > 1 else 0]

    # ------------------------------------------------------------------------------------ the loop
    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor | None = None) -> torch.Tensor:
        """The latent unchanged: it already is the network's input (DDIM's rule). Once ``set_timesteps`` has
        run, a timestep that is not one of ours is refused (it would start the loop at the wrong step)."""
        if self._evaluations:
            self._current(timestep)
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool | None = None,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> D2FSchedulerOutput | tuple[torch.Tensor]:
        """One network evaluation's worth of the FM solver (guidance is applied by the pipeline before), with
        DDIMScheduler.step's arguments.

        The FM state is ``x = sample / scale(t)``, and the output becomes a velocity (``diffusion_to_velocity``).
        Euler with clipping or ``eta > 0`` takes DDIM's transition between the step's FM times
        (``d2f.solvers.ddim_step``): the predicted clean sample clipped as the config says, the noise prediction
        the network's (re-derived from the clipped sample with ``use_clipped_model_output=True``), and for
        ``eta > 0`` the noise
        ``variance_noise`` or, as DDIM draws it,
        ``randn_tensor(model_output.shape, generator=generator, dtype=model_output.dtype)``. Otherwise the
        solver's own update takes the velocity (``d2f.solvers.ode_step`` with ``A = 0, B = 1``); with clipping,
        Heun, midpoint and multistep take it from the clipped clean sample ``D_c`` at the state,
        ``u = (D_c - x) / (1 - t)``, which is DDIM's ``use_clipped_model_output=True`` (so they refuse
        ``False``). Returns the latent ``scale(t') * x'`` at the time ``t'`` it reached (the step's end, or a
        two-stage step's predictor time), in the sample's dtype.
        """
        check_bool("return_dict", return_dict)
        if use_clipped_model_output is not None and not isinstance(use_clipped_model_output, bool):
            raise ValueError(f"use_clipped_model_output={use_clipped_model_output!r} must be None, True or False")
        check_same_shape(model_output=model_output, sample=sample)  # errors in the pipeline's names, not x
        evaluation = self._current(timestep)
        t0, t1 = self._steps[evaluation.step]
        h = t1 - t0
        x = sample.to(compute_dtype(sample)) / float(scale(evaluation.t))
        u = diffusion_to_velocity(model_output, x, evaluation.t, self.config.prediction_type)
        next_index = self._step_index + 1
        predictor = evaluation.stage == 0 and (
            next_index < len(self._evaluations) and self._evaluations[next_index].step == evaluation.step
        )
        s_end = float(scale(t1))
        noise = self._variance_noise(eta, model_output, generator, variance_noise)  # refuses eta > 0 but for Euler
        original = None
        if self._clips_velocity:
            if use_clipped_model_output is False:
                raise ValueError(
                    f"use_clipped_model_output=False keeps the network's noise prediction beside the clipped clean "
                    f"sample, DDIM's transition, which {self._named_solver()} cannot take (it is no velocity); "
                    "leave it unset or True, or use solver='euler'"
                )
            original = self._clip(velocity_to_diffusion(u, x, evaluation.t, "sample"))
            u = diffusion_to_velocity(original, x, evaluation.t, "sample")
        if self._solver == "euler" and (eta != 0 or self._clipping):
            clip = self._clip if self._clipping else None
            x_next, original = ddim_step(x, u, t0, t1, eta, noise, clip, bool(use_clipped_model_output))
            prev = (x_next * s_end).to(sample.dtype)
        elif predictor:  # the pipeline evaluates the network at x + c*h*u next
            self._first = (x, u)
            s_mid = float(scale(self._evaluations[next_index].t))
            _, prev = ode_step(
                PREDICT, x, u, None, None, 0.0, 1.0, h, 1.0, s_mid, sample.dtype, c=PREDICTOR_FRACTION[self._solver]
            )
        elif evaluation.stage == 1:
            x0, u1 = self._first
            _, prev = ode_step(
                CORRECT, x0, u, None, u1, 0.0, 1.0, h, 1.0, s_end, sample.dtype, c=PREDICTOR_FRACTION[self._solver]
            )
            self._first = None
        elif self._solver == "multistep":  # Euler on the first step (and where the pipeline began)
            u_prev, k = multistep_history(self._previous, h)
            _, prev, _ = ode_step(MULTISTEP, x, u, None, u_prev, 0.0, 1.0, h, 1.0, s_end, sample.dtype, k=k)
            self._previous = (u, h)
        else:
            _, prev = ode_step(EULER, x, u, None, None, 0.0, 1.0, h, 1.0, s_end, sample.dtype)
        self._step_index = next_index
        if not return_dict:
            return (prev,)
        if original is None:
            original = velocity_to_diffusion(u, x, evaluation.t, "sample")  # the implied clean latent x + (1-t)*u
        return D2FSchedulerOutput(prev_sample=prev, pred_original_sample=original.to(sample.dtype))

    @property
    def _clipping(self) -> bool:
        """Whether the config clips or thresholds the predicted clean sample."""
        return self.config.clip_sample or self.config.thresholding

    @property
    def _clips_velocity(self) -> bool:
        """Whether clipping goes into the velocity: every solver but Euler, which takes DDIM's own transition."""
        return self._clipping and self._solver != "euler"

    def _named_solver(self) -> str:
        """The solver as the user set it, with auto's choice for this step count: errors speak their terms."""
        if self.config.solver == AUTO:
            return f"solver='auto' (which took {self._solver} for {self.num_inference_steps} network calls)"
        return f"solver={self._solver!r}"

    def _variance_noise(self, eta, model_output, generator, variance_noise) -> torch.Tensor | None:
        """DDIM's checks of ``eta`` and its noise draw (none for ``eta = 0``)."""
        check_real("eta", eta, "be a finite number >= 0 (DDIM's eta; 0 is deterministic)", lambda v: v >= 0)
        if eta and self._solver != "euler":
            raise ValueError(
                f"eta={eta!r} makes DDIM's stochastic step, which D2FScheduler takes with solver='euler' only; "
                f"{self._named_solver()} needs eta=0"
            )
        if variance_noise is not None and generator is not None:
            raise ValueError("pass either generator or variance_noise to step(), not both")
        if variance_noise is not None:  # DDIM broadcasts a batch of 1 and drops an imaginary part without a word
            check_same_shape(model_output=model_output, variance_noise=variance_noise)
        if not eta or variance_noise is not None:
            return variance_noise
        return randn_tensor(
            model_output.shape, generator=generator, device=model_output.device, dtype=model_output.dtype
        )

    def _clip(self, data: torch.Tensor) -> torch.Tensor:
        """DDIM's clipping of the predicted clean sample: dynamic thresholding (Imagen: each sample's
        ``dynamic_thresholding_ratio`` quantile of ``|data|``, at least 1 and at most ``sample_max_value``,
        bounds it and divides it), else ``clip_sample`` to ``[-clip_sample_range, clip_sample_range]``."""
        cfg = self.config
        if not cfg.thresholding:
            return data.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
        flat = data.reshape(data.shape[0], -1)
        bound = torch.quantile(flat.abs(), cfg.dynamic_thresholding_ratio, dim=1).clamp(1, cfg.sample_max_value)
        bound = bound[:, None]
        return (torch.clamp(flat, -bound, bound) / bound).reshape(data.shape)

    # ------------------------------------------------------------------------------------ img2img
    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DDIM's latent at the network timesteps ``timesteps``, ``alpha * data + sigma * noise`` at
        ``t = fm_time(k)`` (``network_input``), in ``original_samples``' dtype."""
        check_same_shape(original_samples=original_samples, noise=noise)  # errors in the pipeline's names
        t = self._fm_time(timesteps, original_samples)
        return network_input(original_samples, noise, t, original_samples.dtype)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """DDIM's v-prediction target at the network timesteps ``timesteps``, ``alpha * noise - sigma * sample``
        at ``t = fm_time(k)`` (what diffusers' training scripts call for ``prediction_type="v_prediction"``), in
        ``sample``'s dtype."""
        check_same_shape(sample=sample, noise=noise)
        t = self._fm_time(timesteps, sample).to(sample.device)
        alpha, sigma = (c.to(compute_dtype(sample, noise)) for c in alpha_sigma(t))
        return diffusion_target(sample, noise, alpha, sigma, "v_prediction").to(sample.dtype)

    def _fm_time(self, timesteps: torch.Tensor, batch: torch.Tensor) -> torch.Tensor:
        """The FM times of network ``timesteps``: one, or one per sample of ``batch`` (whose batch dimension the
        caller has checked)."""
        try:
            k = torch.as_tensor(timesteps)
        except (TypeError, ValueError, RuntimeError) as error:  # None, a string: torch's message names no argument
            raise ValueError(
                f"timesteps must be network timesteps (a number, list, array or tensor), got {describe(timesteps)}"
            ) from error
        as_scalars(k.reshape(-1), name="timesteps")  # refuses complex, bool and grad, which fm_time would name k
        if k.numel() not in (1, batch.shape[0]):
            raise ValueError(
                f"timesteps has {k.numel()} entries but the batch has {batch.shape[0]} samples; "
                "give one timestep, or one per sample"
            )
        return self.schedule.fm_time(k.reshape(-1).double().cpu())

    def scale_noise(self, sample: torch.Tensor, timestep: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """FlowMatch pipelines' name for ``add_noise``."""
        return self.add_noise(sample, noise, timestep)

    def __len__(self) -> int:
        return self.config.num_train_timesteps
