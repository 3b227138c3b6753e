"""Sampling recorded once as a CUDA graph and replayed: ``D2FVelocity.sample(..., capture=True)``.

Sampling a small network is launch-bound: the host spends longer issuing each step's kernels than the device
takes to run them. The sampling loop makes no host synchronisation (its checks are deferred,
``d2f.deferred``), so it can be recorded as one CUDA graph and replayed with a single launch.

The first call for a given key (the noise's shape, dtype and device, the grid, the solver, the backend, the
conditioning's structure, shapes, dtypes and non-tensor values, and the field's network, guidance scale,
``uncond`` and ``concat``) runs the loop once eagerly on a side stream (lazy initialisation, kernel
compilation and cuDNN's algorithm choices happen there, outside the recording), records it, and replays it.
Later calls with the same key copy their noise and conditioning into the recorded buffers and replay. The
checks' flags are gathered inside the graph into one vector, read once after each replay: an error names
the step and tensor as the eager loop's does.

The graph reads the network's weights where they are: weights changed in place (an optimizer's step, a
``load_state_dict``) are seen by the next replay; modules or parameters replaced by new tensors are not. One
recording is kept per field, and a call with another key records anew.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .deferred import DeferredChecks, Queued, deferred_checks, raise_first
from .grids import grid_steps


class Recording(NamedTuple):
    key: Hashable
    graph: Any  # torch.cuda.CUDAGraph
    noise: Tensor
    cond: dict[str, Any]
    out: Tensor
    queued: list[Queued]  # the checks queued on the device, in order
    flags: Tensor | None  # their flags, gathered by the graph


def _signature(value: Any, name: str) -> Hashable:
    """What a recording depends on in a conditioning value: a tensor's shape, dtype and device (its values are
    copied in), a mapping's keys and values, anything else itself."""
    if isinstance(value, Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device)
    if isinstance(value, Mapping):
        return tuple(sorted((str(k), _signature(v, f"{name}[{k!r}]")) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise ValueError(
            f"capture=True: the conditioning {name}={value!r} is neither a tensor, a mapping nor hashable, so a "
            "recording cannot tell whether a later call passes the same; pass it as a tensor"
        ) from None
    return ("value", value)


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _copy_into(static: Any, value: Any) -> None:
    if isinstance(static, Tensor):
        static.copy_(value)
    elif isinstance(static, Mapping):
        for k, v in static.items():
            _copy_into(v, value[k])


def _key(field: Any, noise: Tensor, ts: Any, solver: str, backend: str, cond: Mapping[str, Any]) -> Hashable:
    held = [field.concat, *field.uncond.values()]
    return (
        tuple(noise.shape),
        noise.dtype,
        noise.device,
        tuple(grid_steps(ts)),
        solver,
        backend,
        _signature(dict(cond), "cond"),
        id(field.net),
        field.guidance_scale,
        tuple(id(v) for v in held if isinstance(v, Tensor)),
    )


def _record(field: Any, noise: Tensor, ts: Any, solver: str, backend: str, cond: dict, key: Hashable) -> Recording:
    static_noise, static_cond = noise.clone(), _clone(cond)

    def run() -> Tensor:
        return field.sample(static_noise, ts, solver, None, False, backend, **static_cond)

    device = noise.device
    side = torch.cuda.Stream(device=device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        run()  # the warm-up, with its checks read: bad inputs fail here, before anything is recorded
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with deferred_checks() as checks:  # the loop's own scope joins this one, so nothing is read while recording
        with torch.cuda.graph(graph):
            out = run()
            queued = checks.take()
            on_device = [q for q in queued if q[0].device == device]
            flags = torch.cat([f.to(torch.float32) for f, _, _ in on_device]) if on_device else None
    # Checks of host values (the grid's times and coefficients) were made while recording and never change.
    DeferredChecks([q for q in queued if q[0].device != device]).read()
    return Recording(key, graph, static_noise, static_cond, out, on_device, flags)


def captured_sample(field: Any, noise: Tensor, ts: Any, solver: str, backend: str, cond: dict[str, Any]) -> Tensor:
    """``field.sample(noise, ts, solver, backend=backend, **cond)`` through the field's recording for this key
    (made first if there is none); returns a fresh tensor."""
    if noise.device.type != "cuda":
        raise ValueError(
            f"capture=True records the sampling loop as a CUDA graph, so the noise must be on a CUDA device; it is "
            f"on {noise.device}"
        )
    key = _key(field, noise, ts, solver, backend, cond)
    recording = getattr(field, "_recording", None)
    if recording is None or recording.key != key:
        field._recording = None  # the old graph's memory goes before the new one is recorded
        recording = field._recording = _record(field, noise, ts, solver, backend, cond, key)
    recording.noise.copy_(noise)
    _copy_into(recording.cond, cond)
    recording.graph.replay()
    out = recording.out.clone()
    if recording.flags is not None:
        raise_first(recording.queued, recording.flags.tolist())
    return out
