"""``D2FVelocity``: any diffusion network as an FM velocity field (``docs/conventions.md`` §3, §5)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from ._checks import TimeLike, as_time, check_same_shape, compute_dtype, describe
from .guidance import guidance
from .parametrization import SINGULAR_TIMES, affine_combination, check_prediction_type, velocity_coefficients_of
from .path import align_checked, scale
from .schedule import Schedule
from .solvers import Callback, grid_steps
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
    """

    def __init__(
        self,
        net: Callable[..., Any],
        schedule: Schedule,
        prediction_type: str,
        guidance_scale: float = 1.0,
        uncond: Mapping[str, Any] | None = None,
        concat: Tensor | None = None,
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
        self.singular_times = SINGULAR_TIMES[prediction_type]

    def model_output(self, x: Tensor, t: TimeLike, **cond: Any) -> Tensor:
        """The (guided) raw network output at FM state ``x``, in at least float32."""
        check_same_shape(x=x)
        return self._model_output(x, as_time(t, like=x), cond)

    def _model_output(self, x: Tensor, t: Tensor, cond: dict[str, Any]) -> Tensor:
        batch = x.shape[0]
        tt = t.expand(batch)
        dtype = _network_dtype(self.net, compute_dtype(x))
        z = align_checked(x, tt).to(dtype)
        if self.concat is not None:
            if self.concat.shape[0] != batch or self.concat.shape[2:] != x.shape[2:]:
                raise ValueError(
                    f"concat has shape {tuple(self.concat.shape)}, incompatible with x of shape {tuple(x.shape)}"
                )
            z = torch.cat([z, self.concat.to(x.device, dtype)], dim=1)
        k = self.schedule.timestep(tt).to(torch.float32)
        guided = self.guidance_scale != 1
        if guided:
            z, k, cond = torch.cat([z, z]), torch.cat([k, k]), _batch_conditions(self.uncond, cond, batch)
        out = _output_tensor(self.net(z, k, **cond))
        expected = (2 * batch if guided else batch, *x.shape[1:])
        if tuple(out.shape) != expected:
            raise ValueError(f"the network returned shape {tuple(out.shape)}, expected {expected}")
        if guided:
            return guidance(*out.chunk(2), self.guidance_scale)
        return out.to(compute_dtype(out))

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
        **cond: Any,
    ) -> Tensor:
        """Generate from ``noise``: start at ``x = noise / scale(ts[0])`` (as DDIM does) and integrate.

        Returns the FM state at ``ts[-1]`` (float32, or float64 for float64 noise); see
        :func:`d2f.sample` for ``solver``, ``callback`` and ``progress``.
        """
        check_same_shape(noise=noise)
        t0 = grid_steps(ts)[0][0]
        x = noise.to(torch.float64 if noise.dtype == torch.float64 else torch.float32) / float(scale(t0))

        def field(state: Tensor, t: float) -> Tensor:
            return self(state, t, **cond)

        field.singular_times = self.singular_times  # type: ignore[attr-defined]
        return integrate(field, x, ts, solver=solver, callback=callback, progress=progress)
