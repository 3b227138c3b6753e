"""``D2FVelocity``: any diffusion network as an FM velocity field (``docs/conventions.md`` §3, §5)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import TimeLike, as_time, check_choice, check_same_shape, compute_dtype, describe
from .guidance import guidance
from .ode_step import EULER, HEUN_CORRECT, HEUN_PREDICT, ode_step
from .parametrization import (
    SINGULAR_TIMES,
    affine_combination,
    check_prediction_type,
    velocity_coefficients,
    velocity_coefficients_of,
)
from .path import align_checked, scale
from .schedule import Schedule
from .solvers import SOLVERS, Callback, check_singular_starts, grid_steps, relabel_ratio, walk
from .solvers import sample as integrate


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
        if isinstance(c, Tensor) and isinstance(u, Tensor):
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
        prediction_type: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or ``"velocity"``.
        guidance_scale: classifier-free guidance; with a value other than 1 the unconditional and the
            conditional branch run batched in one call of ``2B`` samples.
        uncond: the unconditional conditioning kwargs (same keys as the call's), e.g. a null text
            embedding; a tensor of batch 1 is broadcast.
        concat: conditioning channels appended to the aligned input along dim 1, unscaled (image-to-X).
        align_input: ``False`` gives the naive-FM baseline's network: it sees the FM state unscaled and
            the raw ``t`` in [0, 1] as its timestep (use it with ``prediction_type="velocity"``).
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
    ):
        if not callable(net):
            raise ValueError(f"net must be callable, got {type(net).__name__}")
        if not isinstance(schedule, Schedule):
            raise ValueError(f"schedule must be a d2f.Schedule, got {type(schedule).__name__}")
        check_prediction_type(prediction_type)
        if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r} must be a finite number")
        if guidance_scale != 1 and uncond is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs uncond, the unconditional conditioning kwargs")
        if concat is not None and (not isinstance(concat, Tensor) or concat.ndim < 2):
            raise ValueError(f"concat must be a (B, C, ...) tensor, got {describe(concat)}")
        self.net = net
        self.schedule = schedule
        self.prediction_type = prediction_type
        self.guidance_scale = float(guidance_scale)
        self.uncond = dict(uncond or {})
        self.concat = concat
        self.align_input = bool(align_input)
        self.singular_times = SINGULAR_TIMES[prediction_type]

    def model_output(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The (guided) raw network output at FM state ``x``, in at least float32."""
        check_same_shape(x=x)
        return self._model_output(x, as_time(t, like=x), cond)

    def _scale(self, t: float) -> float:
        return float(scale(t)) if self.align_input else 1.0

    def _model_output(self, x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        z = align_checked(x, t.expand(x.shape[0])) if self.align_input else x.to(compute_dtype(x))
        z = z.to(_network_dtype(self.net, compute_dtype(x)))
        o_u, o_c = self._network_outputs(z, t, cond)
        return o_u.to(compute_dtype(o_u)) if o_c is None else guidance(o_u, o_c, self.guidance_scale)

    def _network_outputs(self, z: Tensor, t: Tensor, cond: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
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
        if tuple(out.shape) != expected:
            raise ValueError(f"the network returned shape {tuple(out.shape)}, expected {expected}")
        if guided:
            o_u, o_c = out.chunk(2)
            return o_u, o_c
        return out, None

    def __call__(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The FM velocity at state ``x`` and time ``t`` (a float, 0-d or ``(B,)`` tensor)."""
        check_same_shape(x=x)
        tt = as_time(t, like=x)
        a, b = velocity_coefficients_of(tt, self.prediction_type)
        return affine_combination(a, b, x, self._model_output(x, tt, cond))

    @torch.no_grad()
    def sample(
        self,
        noise: Tensor,
        ts: Tensor | Sequence[float],
        solver: str = "euler",
        callback: Callback | None = None,
        progress: bool = False,
        backend: str = "auto",
        **cond: Any,
    ) -> Tensor:
        """Generate from ``noise``: start at ``x = noise / scale(ts[0])`` (as DDIM does) and integrate.

        (Without ``align_input`` the state starts at ``noise`` itself.)

        Returns the FM state at ``ts[-1]`` (float32, or float64 for float64 noise); ``solver``,
        ``callback`` and ``progress`` as in :func:`d2f.sample`. Euler and Heun run one fused step per
        network call (``backend`` as in :func:`d2f.fm_loss`): guidance, conversion, update and the next
        network input in one pass. A ``callback`` (which needs each velocity) or ``solver="midpoint"``
        uses the generic solver instead.
        """
        check_same_shape(noise=noise)
        check_choice("solver", solver, SOLVERS)
        steps = grid_steps(ts)
        state_dtype = torch.float64 if noise.dtype == torch.float64 else torch.float32
        x = noise.to(state_dtype) / self._scale(steps[0][0])
        if solver == "midpoint" or callback is not None:

            def field(state: Tensor, t: float) -> Tensor:
                return self(state, t, **cond)

            field.singular_times = self.singular_times  # type: ignore[attr-defined]
            return integrate(field, x, ts, solver=solver, callback=callback, progress=progress)

        check_singular_starts(steps, self.singular_times)
        z_dtype = _network_dtype(self.net, state_dtype)
        g = self.guidance_scale

        def outputs(z: Tensor, t: float) -> tuple[Tensor, Tensor | None]:
            return self._network_outputs(z, torch.tensor(t, dtype=torch.float64, device=z.device), cond)

        def coefficients(t: float) -> tuple[float, float]:
            a, b = velocity_coefficients(t, self.prediction_type)
            return float(a), float(b)

        def advance(i: int, state: tuple[Tensor, Tensor], t0: float, t1: float) -> tuple[Tensor, Tensor]:
            x, z = state
            h, s1 = t1 - t0, self._scale(t1)
            o_u, o_c = outputs(z, t0)
            if solver == "euler" or t1 in self.singular_times:
                return ode_step(EULER, x, o_u, o_c, None, *coefficients(t0), h, g, s1, z_dtype, backend)
            u1, z_pred = ode_step(HEUN_PREDICT, x, o_u, o_c, None, *coefficients(t0), h, g, s1, z_dtype, backend)
            o_u, o_c = outputs(z_pred, t1)
            return ode_step(HEUN_CORRECT, x, o_u, o_c, u1, *coefficients(t1), h, g, s1, z_dtype, backend)

        def relabel(state: tuple[Tensor, Tensor], t_from: float, t_to: float) -> tuple[Tensor, Tensor]:
            return (state[0] * relabel_ratio(t_from, t_to) if self.align_input else state[0]), state[1]

        x, _ = walk(steps, (x, noise.to(z_dtype)), advance, relabel, progress, f"d2f {solver}")
        return x
