"""A run's guards against NaN and inf: the step's loss read with its deferred checks, the report of a
non-finite loss, and the weights refused before a checkpoint or export holds them."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .._checks import NonFiniteError
from ..deferred import DeferredChecks
from .checkpoint import latest_checkpoint
from .config import TrainConfig
from .draws import Stream


def read_step(checks: DeferredChecks, value: torch.Tensor, step: int, stream: Stream, config, world: int) -> float:
    """The step's mean loss, read with its deferred checks in one transfer: the step's only host
    synchronisation. A network output with NaN or inf makes the loss NaN (every rank's, through the mean, so
    all stop or skip together); other failed checks (NaN in the data, say) stop the run, naming the step."""
    try:
        (total,) = checks.read(value)
    except NonFiniteError as e:
        if e.tensor != "model_output":
            where = (
                f"d2f train: step {step + 1}, batch indices (into the data set) {_batch(step, stream, config, world)}"
            )
            raise NonFiniteError(f"{where}: {e.function}", e.tensor) from e
        total = math.nan
    return total


def nonfinite_report(config: TrainConfig, step: int, stream: Stream, world: int, total: float) -> str:
    last = latest_checkpoint(Path(config.out))
    return (
        f"non-finite loss {total} at step {step + 1}; batch indices (into the data set) "
        f"{_batch(step, stream, config, world)}; last good "
        f"checkpoint: {last if last is not None else 'none'}. Resume from it with a lower lr, or pass "
        "--on-nonfinite skip to skip such steps"
    )


def _batch(step: int, stream: Stream, config, world: int) -> list[int]:
    per_step = config.batch_size * config.grad_accum * world
    return stream.indices(torch.arange(step * per_step, (step + 1) * per_step)).tolist()


def check_weights(config: TrainConfig, step: int, trainable: dict, ema: dict) -> None:
    """Refuse to checkpoint or export weights holding NaN or inf: a finite loss is computed before the update,
    so an update that diverges (too high an lr) shows only here. Every rank checks its (identical) copy, so
    all stop together."""
    finite = torch.stack([torch.isfinite(v).all() for v in (*trainable.values(), *ema.values())])
    if not bool(finite.all()):
        names = [*trainable, *(f"ema.{n}" for n in ema)]
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        last = latest_checkpoint(Path(config.out))
        raise FloatingPointError(
            f"the weights after step {step} hold NaN or inf ({bad[0]}"
            + (f" and {len(bad) - 1} more" if len(bad) > 1 else "")
            + f") although the losses were finite: an update diverged (lr {config.resolved_lr:g}); nothing was "
            f"written for step {step}. Last good checkpoint: {last if last is not None else 'none'}; resume from it "
            "with a lower lr"
        )


def check_trained(config: TrainConfig, start: int, losses: list[float]) -> None:
    """Refuse to export a run whose every step was skipped (``--on-nonfinite skip``): it did not train."""
    if start < config.max_steps and not any(math.isfinite(v) for v in losses[start:]):
        raise FloatingPointError(
            f"every step of this run ({start + 1} to {config.max_steps}) had a non-finite loss and was skipped "
            "(--on-nonfinite skip): the model did not train, so nothing is exported"
        )
