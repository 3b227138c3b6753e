"""When d2f reads its checks: at once (the default), or later, inside ``deferred_checks()``.

Every check d2f makes on tensor values (t in [0, 1], NaN or inf in an input, a result that overflowed) first
reduces what it checks to a few flags on the tensors' device, then hands them to :func:`verify`. Reading
flags back to the host is a synchronisation: the host waits until the device has finished everything queued
before it, so a loop that checks after every call cannot run ahead of the device, and cannot be captured in
a CUDA graph.

Outside a scope, :func:`verify` reads the flags at once and raises where the call is: the check costs one
synchronisation per call. Inside ``with deferred_checks() as checks:`` it only queues them; ``checks.read()``
reads every queued flag in one transfer (together with values the caller reads anyway, such as a loss) and
raises the error of the first check that failed, in the order the calls were made, exactly as that call
would have raised it. Leaving the scope normally reads what is still queued. Until then the failing call's
results, and what was computed from them, hold NaN, inf or values from an out-of-range t.

So an error is reported at the next ``read()``, no earlier: d2f's trainer reads once per step, with the
step's loss and before the optimizer update (the step, its batch indices and the last good checkpoint are
in the error); the sampler reads once after its last step, and names the first step that failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch
from torch import Tensor

# From the flags read back (as floats, in the order given), the check's error, or None when they show none.
ErrorFor = Callable[[list[float]], Exception | None]
# Applied to a queued check's error when it is raised: the caller's context (a sampler's step, say).
Context = Callable[[Exception], Exception]
Queued = tuple[Tensor, ErrorFor, "Context | None"]


class DeferredChecks:
    """Checks queued by :func:`verify` inside :func:`deferred_checks`, read together by :meth:`read`."""

    def __init__(self, queued: list[Queued] | None = None) -> None:
        self._queue: list[Queued] = list(queued or [])
        self._context: Context | None = None  # applied to the errors of checks queued while it is set

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, flags: Tensor, error: ErrorFor) -> None:
        self._queue.append((flags.detach().reshape(-1), error, self._context))

    @contextlib.contextmanager
    def within(self, context: Context) -> Iterator[None]:
        """Checks queued inside the block raise ``context(error)``, itself inside the enclosing context."""
        saved = self._context
        self._context = context if saved is None else lambda error: saved(context(error))
        try:
            yield
        finally:
            self._context = saved

    def take(self) -> list[Queued]:
        """Empty the queue unread and return it: a recorded CUDA graph's flags are read after each replay, which
        rewrites them in place (``d2f.capture``), not while recording."""
        queue, self._queue = self._queue, []
        return queue

    def read(self, *values: Tensor) -> list[float]:
        """Read the queued flags and ``values`` (tensors of one element each) in one transfer per device; raise
        the first failed check's error, else return the values as floats. Empties the queue either way."""
        queue, self._queue = self._queue, []
        read = _read([v.detach().reshape(-1) for v in values] + [flags for flags, _, _ in queue])
        raise_first(queue, read[len(values) :])
        return read[: len(values)]


def raise_first(queued: list[Queued], values: list[float]) -> None:
    """Raise the error of the first of ``queued`` whose flags (``values``, all of them in order) show one."""
    token = _ACTIVE.set(None)  # an error's own checks (while it describes the failure) read at once
    try:
        start = 0
        for flags, error, context in queued:
            found = error(values[start : start + flags.numel()])
            start += flags.numel()
            if found is not None:
                raise found if context is None else context(found)
    finally:
        _ACTIVE.reset(token)


_ACTIVE: ContextVar[DeferredChecks | None] = ContextVar("d2f_deferred_checks", default=None)


def _read(parts: list[Tensor]) -> list[float]:
    """The values of ``parts``, in order, with one device-to-host transfer per device they live on."""
    by_device: dict[torch.device, list[int]] = {}
    for i, part in enumerate(parts):
        by_device.setdefault(part.device, []).append(i)
    values: list[list[float]] = [[] for _ in parts]
    for indices in by_device.values():
        flat = torch.cat([parts[i].to(torch.float32) for i in indices]).tolist()
        start = 0
        for i in indices:
            values[i] = flat[start : start + parts[i].numel()]
            start += parts[i].numel()
    return [v for part in values for v in part]


@contextlib.contextmanager
def deferred_checks() -> Iterator[DeferredChecks]:
    """Queue d2f's checks instead of reading each at its call; see the module's documentation.

    Inside another scope this one is that scope (its checks are read with the outer ones), so the outermost
    scope decides when to read: d2f's sampler reads after its loop, or with the caller's own reads when the
    caller has a scope. When the block raises, the queued checks are dropped unread (the block's own
    exception is the one that matters).
    """
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    checks = DeferredChecks()
    token = _ACTIVE.set(checks)
    try:
        yield checks
    finally:
        _ACTIVE.reset(token)
    checks.read()


def deferring() -> bool:
    """Whether a :func:`deferred_checks` scope is active: a check may then be read after its inputs are gone, so
    it must take whatever naming the culprit needs into its flags up front."""
    return _ACTIVE.get() is not None


def verify(flags: Tensor, error: ErrorFor) -> None:
    """Check ``flags``: raise ``error(values)`` now, or queue it when a :func:`deferred_checks` scope is active.

    ``error`` must not rely on tensors that change after the call (it may run much later); it may read small
    tensors it keeps.
    """
    checks = _ACTIVE.get()
    if checks is not None:
        checks.add(flags, error)
        return
    found = error(flags.reshape(-1).tolist())
    if found is not None:
        raise found
