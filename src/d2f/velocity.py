"""``D2FVelocity``: any diffusion network as an FM velocity field (``docs/conventions.md`` §3, §5).

It is a field for the solvers (``d2f.solvers.Field``): besides the velocity itself it gives them its raw
network outputs and the coefficients that turn them into a velocity, so that each solver step fuses
guidance, conversion and update in one pass.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ._checks import (
    TimeLike,
    as_scalars,
    as_time,
    check_bool,
    check_finite_result,
    check_real,
    check_same_shape,
    compute_dtype,
    describe,
)
from .capture import captured_sample
from .grids import grid_steps, sampling_grid
from .guidance import guidance
from .parametrization import (
    SINGULAR_TIMES,
    affine_combination,
    check_prediction_type,
    velocity_coefficients,
    velocity_coefficients_checked,
)
from .path import align_checked, scale
from .schedule import Schedule, check_schedule
from .solvers import Outputs, sample
from .time_samplers import lowest_t


def _network_dtype(net: Any, fallback: torch.dtype) -> torch.dtype:
    dtype = getattr(net, "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(net, torch.nn.Module):
        for p in net.parameters():
            if p.is_floating_point():
                return p.dtype
    return fallback


def _output_tensor(out: Any) -> Tensor:
    """diffusers returns an object with ``.sample`` (or a tuple with ``return_dict=False``)."""
    if isinstance(out, Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, Tensor):
        return sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise ValueError(f"the network returned {type(out).__name__}; expected a tensor or an object with .sample")


def _check_output(out: Tensor, z: Tensor, t: Tensor, expected: tuple[int, ...]) -> None:
    """The network's output as the update takes it: the input's shape (both branches' when guided), on its
    device, and real (the cast to the compute dtype would drop an imaginary part without a word)."""
    if tuple(out.shape) != expected:
        raise ValueError(f"the network returned shape {tuple(out.shape)}, expected {expected}")
    if out.device != z.device:
        raise ValueError(f"the network returned a tensor on {out.device} for an input on {z.device}")
    if out.is_complex():
        at = repr(t.item()) if t.numel() == 1 else describe(t)
        raise ValueError(f"the network returned a complex tensor ({out.dtype}) at t={at}; its output must be real")


def _warn_of_another_prediction_type(schedule: Schedule, prediction_type: str) -> None:
    """Warn where ``prediction_type`` is a diffusers type other than the one ``schedule`` records."""
    recorded = schedule.prediction_type
    if recorded is None or prediction_type in (recorded, "velocity"):
        return
    warnings.warn(
        f"prediction_type={prediction_type!r}, but the schedule records {recorded!r} (its diffusers config): the "
        f"network's output is read as {prediction_type}, which gives noise unless the network was trained for it; "
        "pass prediction_type=schedule.prediction_type if it was not",
        UserWarning,
        stacklevel=3,
    )


def _batch_conditions(uncond: Mapping[str, Any], cond: Mapping[str, Any], batch: int) -> dict[str, Any]:
    """Stack unconditional then conditional kwargs along the batch for one network call."""
    if set(uncond) != set(cond):
        raise ValueError(
            f"guidance needs the same conditioning keys in uncond and in the call: uncond has {sorted(uncond)}, "
            f"the call has {sorted(cond)}"
        )
    out = {}
    for key, c in cond.items():
        u = uncond[key]
        if isinstance(c, Mapping) and isinstance(u, Mapping):  # SDXL's added_cond_kwargs
            out[key] = _batch_conditions(u, c, batch)
        elif isinstance(c, Tensor) and isinstance(u, Tensor):
            if u.ndim >= 1 and u.shape[0] == 1 and batch > 1:
                u = u.expand(batch, *u.shape[1:])
            if u.shape != c.shape:
                raise ValueError(f"uncond[{key!r}] has shape {tuple(u.shape)}, the call's {key} has {tuple(c.shape)}")
            out[key] = torch.cat([u.to(c.device, c.dtype), c])
        elif u == c:
            out[key] = c
        else:
            raise ValueError(
                f"conditioning {key!r} differs between uncond ({u!r}) and the call ({c!r}) and is no tensor"
            )
    return out


class D2FVelocity:
    """The FM velocity of a diffusion network: ``u(x, t) = A(t)*x + B(t)*net(scale(t)*x, timestep(t))``.

    Args:
        net: called as ``net(z, k, **cond)`` with ``z`` in the network's dtype and ``k`` a float32 ``(B,)``
            tensor on ``x``'s device; returns a tensor or an object with ``.sample`` (diffusers).
        schedule: the schedule the network was trained with.
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"velocity"``. A diffusers type other
            than the one ``schedule`` records (``schedule.prediction_type``, from its scheduler config) gives a
            ``UserWarning`` naming both, not an error: a network finetuned to another type (diffusers' training
            scripts' ``--prediction_type``) keeps its base pipeline's scheduler config, and diffusers itself reads
            the output as its scheduler's config says without a check; but most often the mismatch is a mistake
            whose samples are noise. ``"velocity"`` (an FM head on its teacher's schedule) is never warned of.
        guidance_scale: classifier-free guidance; with a value other than 1 the unconditional and the
            conditional branch run batched in one call of ``2B`` samples.
        uncond: the unconditional conditioning kwargs (same keys as the call's), e.g. a null text
            embedding; a tensor of batch 1 is broadcast.
        concat: conditioning channels appended to the aligned input along dim 1, unscaled (image-to-X).
        align_input: ``False`` gives the naive-FM baseline's network: it sees the FM state unscaled and
            the raw ``t`` in [0, 1] as its timestep (use it with ``prediction_type="velocity"``).
        t_min: the lowest FM time the network was trained at, where grids for it start
            (``field.grid(...)``). Unset: a converted diffusion network's,
            ``lowest_t("diffusion-matched", prediction_type, schedule)`` (``schedule.t_min``); ``d2f.load`` sets
            a flow-finetuned export's own.
    """

    def __init__(
        self,
        net: Callable[..., Any],
        schedule: Schedule,
        prediction_type: str,
        guidance_scale: float = 1.0,
        uncond: Mapping[str, Any] | None = None,
        concat: Tensor | None = None,
        align_input: bool = True,
        t_min: float | None = None,
    ):
        if not callable(net):
            raise ValueError(f"net must be callable, got {type(net).__name__}")
        check_schedule(schedule)
        check_prediction_type(prediction_type)
        _warn_of_another_prediction_type(schedule, prediction_type)
        check_real("guidance_scale", guidance_scale, "be a finite number")
        if guidance_scale != 1 and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs uncond, the unconditional conditioning kwargs")
        if uncond is not None and not isinstance(uncond, Mapping):
            raise ValueError(f"uncond must be a mapping of conditioning kwargs (or None), got {type(uncond).__name__}")
        if concat is not None and (not isinstance(concat, Tensor) or concat.ndim < 2):
            raise ValueError(f"concat must be a (B, C, ...) tensor, got {describe(concat)}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond or {})
        self.concat = concat
        self.align_input = check_bool("align_input", align_input)
        self.singular_times = SINGULAR_TIMES[prediction_type]
        if t_min is None:
            t_min = lowest_t("diffusion-matched", prediction_type, schedule)
        self.t_min = float(as_time(t_min, name="t_min"))
        if self.t_min == 1:  # no grid starts there (a grid's ends must differ)
            raise ValueError(
                f"t_min={t_min!r} must be an FM time in [0, 1): the lowest time the network was trained at"
            )
        self._recording = None  # d2f.capture's graph, once sample(capture=True) made one

    def model_output(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The (guided) raw network output at FM state ``x``, in at least float32."""
        check_same_shape(x=x)
        return self._model_output(x, as_time(t, like=x), cond)

    def _model_output(self, x: Tensor, t: Tensor, cond: Mapping[str, Any]) -> Tensor:
        o_u, o_c = self._network_outputs(self._model_input_checked(x, t), t, cond)
        return o_u.to(compute_dtype(o_u)) if o_c is None else guidance(o_u, o_c, self.guidance_scale)

    def _network_outputs(self, z: Tensor, t: Tensor, cond: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        """Raw outputs for the aligned input ``z``: ``(unconditional, conditional)`` when guided, else ``(o, None)``."""
        batch = z.shape[0]
        expected = tuple(z.shape)
        if self.concat is not None:
            if self.concat.shape[0] != batch or self.concat.shape[2:] != z.shape[2:]:
                raise ValueError(
                    f"concat has shape {tuple(self.concat.shape)}, incompatible with x of shape {expected}"
                )
            z = torch.cat([z, self.concat.to(z.device, z.dtype)], dim=1)
        tt = t.expand(batch)
        k = (self.schedule.timestep(tt) if self.align_input else tt).to(torch.float32)
        guided = self.guidance_scale != 1
        if guided:
            z, k, cond = torch.cat([z, z]), torch.cat([k, k]), _batch_conditions(self.uncond, cond, batch)
        out = _output_tensor(self.net(z, k, **cond))
        if guided:
            expected = (2 * batch, *expected[1:])
        _check_output(out, z, t, expected)
        if guided:
            o_u, o_c = out.chunk(2)
            return o_u, o_c
        return out, None

    def __call__(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The FM velocity at state ``x`` and time ``t`` (a float, 0-d or ``(B,)`` tensor)."""
        check_same_shape(x=x)
        tt = as_time(t, like=x)
        a, b = velocity_coefficients_checked(tt, self.prediction_type)
        o = self._model_output(x, tt, cond)
        return check_finite_result(
            "D2FVelocity", "the velocity", affine_combination(a, b, x, o), {"x": x, "model_output": o}
        )

    def grid(self, name: str, n: int, shift: float = 3.0, **ddim_rule: Any) -> Tensor:
        """The grid ``name`` with ``n`` steps for this network, the FM grids from ``t_min``: ``sampling_grid`` with
        its ``shift`` and DDIM step rule (``spacing``, ``steps_offset``, ``set_alpha_to_one``)."""
        return sampling_grid(name, n, self.schedule, self.prediction_type, shift, t_start=self.t_min, **ddim_rule)

    # ------------------------------------------------------------------------- as a field of the solvers
    def input_scale(self, t: float) -> float:
        """``s`` with network input ``z = s * x``: ``scale(t)``, or 1 without ``align_input``."""
        return float(scale(t)) if self.align_input else 1.0

    def input_dtype(self, state: Tensor) -> torch.dtype:
        """The network's dtype (float32, or float64 for a float64 state, when the network does not say)."""
        return _network_dtype(self.net, compute_dtype(state))

    def model_input(self, x: Tensor, t: TimeLike) -> Tensor:
        """The network input of state ``x`` at time ``t``: ``align(x, t)``, or ``x`` without ``align_input``,
        in the network's dtype."""
        return self._model_input_checked(x, as_time(t, like=x))

    def _model_input_checked(self, x: Tensor, t: Tensor) -> Tensor:
        z = align_checked(x, t.expand(x.shape[0])) if self.align_input else x.to(compute_dtype(x))
        return z.to(self.input_dtype(x))

    def outputs(self, z: Tensor, t: float, cond: Mapping[str, Any]) -> Outputs:
        """The raw outputs at network input ``z`` and the velocity coefficients at ``t``."""
        o_u, o_c = self._network_outputs(z, as_scalars(t, like=z, name="t"), cond)
        a, b = velocity_coefficients(t, self.prediction_type)
        return Outputs(o_u, o_c, float(a), float(b), self.guidance_scale)

    @torch.no_grad()
    def sample(
        self, noise: Tensor, ts, solver="euler", callback=None, progress=False, backend="auto", capture=False, **cond
    ) -> Tensor:
        """Generate from ``noise`` with :func:`d2f.sample`, starting at ``x = noise / scale(ts[0])`` (``noise``
        itself without ``align_input``): DDIM's start, whose network input ``scale(ts[0]) * x`` is the noise
        (to float rounding).

        ``ts``, ``solver``, ``callback``, ``progress``, ``backend`` and the conditioning kwargs as
        :func:`d2f.sample` takes them. ``capture=True`` (CUDA only) records the whole loop as a CUDA graph on
        the first call for a given noise shape, grid, solver and conditioning, and replays it on later ones
        (``d2f.capture``); it takes no ``callback`` or ``progress``, which run on the host at every step.
        Returns the FM state at ``ts[-1]`` (float32, or float64 for float64 noise).
        """
        check_same_shape(noise=noise)
        if check_bool("capture", capture):
            for name, value in (("callback", callback), ("progress", progress)):
                if value:
                    raise ValueError(
                        f"capture=True records the loop once and replays it on the device, so {name}={value!r}, "
                        "which runs on the host at every step, would run only while recording; pass one or the other"
                    )
            return captured_sample(self, noise, ts, solver, backend, cond)
        x = noise.to(compute_dtype(noise)) / self.input_scale(grid_steps(ts)[0][0])
        return sample(self, x, ts, solver, callback, progress, backend, **cond)
