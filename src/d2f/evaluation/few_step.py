"""E5, few-step sampling at equal network calls: d2f's FM solvers against the schedulers diffusers users run.

Rows, each at every NFE (network calls per sample) of its model's list that it reaches exactly:

- ``diffusers:<name>`` on the embedded teacher as it is (``DIFFUSERS``), at ``nfe``: each scheduler with the
  settings diffusers documents for few steps, several candidates each; the candidate with the lowest FID at
  the calibration NFE (first seed) is the row, and every candidate's calibration FID is in the JSON (DDIM's
  own rule, ``{}``, is the DDIM-equivalent grid: d2f's Euler on ``grid="ddim"`` gives its samples);
- ``d2f:<solver>/<grid>``, d2f's FM solvers on the uniform and shift grids: on the converted teacher
  (zero-shot, ``TEACHER_ROWS``, at ``nfe``), and on an E2-style d2f LoRA finetune (24 px) and an E3-style
  reflow model (16 px), both trained here under ``out`` (``FINETUNED_ROWS``, at ``finetuned_nfe``).

The finetuned models skip Heun, and every model skips Heun on the shift grid and a grid calibrated to the
model's velocity (steps placed where it changes fastest): all were measured in the first E5 run (commit
63a0774, ``docs/results.md``) and lost at every NFE on every model, so the time goes to the rows that compete.

NFE is counted as the network is called: a two-stage d2f step costs two calls, one when its second stage
would fall on a singular end; a diffusers scheduler costs ``len(timesteps)`` (Heun's warm-up evaluation
included, UniPC's corrector free because it reuses the next call). Every row of a seed samples the same noise
and labels (0..9 in turn), and is scored by FID against the 5000 real digits, precision and recall (k = 3)
against ``num_samples`` of them, and the class accuracy of ``d2f eval``'s classifier.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data.images import mnist
from ..figures import save_line_plot
from ..networks.export import ddim_config, load
from ..networks.sampling import scheduler_loop
from ..networks.teachers import teacher_path
from ..solvers import stage_times
from ..training.loop import train
from ..velocity import D2FVelocity
from .classifier import load_classifier
from .experiments import finetune_run
from .metrics import class_accuracy, features, fid, precision_recall
from .reflow import train_reflow

E5_NFE = (1, 2, 3, 4, 6, 8, 10, 15, 25)  # the teachers' rows, diffusers' included
CONVERTED = ("teacher", "teacher_epsilon")  # the teachers as converted, zero-shot: v-prediction and epsilon
FINETUNED_NFE = (1, 2, 3, 4, 6, 8, 10)
E5_SEEDS = (0, 1, 2)
CALIBRATION_NFE = (6, 5)  # the first one a scheduler reaches exactly (Heun reaches odd counts only)

# diffusers' few-step advice: trailing timesteps (Lin et al., "Common diffusion noise schedules and sample
# steps are flawed") or Karras sigmas where the scheduler has them; lower_order_final for the multistep ones.
_SPACINGS = ({"timestep_spacing": "trailing"}, {"use_karras_sigmas": True})
_MULTISTEP = {"lower_order_final": True}
DIFFUSERS = {
    "ddim": ("DDIMScheduler", ({"timestep_spacing": "trailing"}, {})),  # {}: the teacher's own rule
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        tuple({"algorithm_type": "dpmsolver++", "solver_order": 2, **_MULTISTEP, **s} for s in _SPACINGS),
    ),
    "dpmpp_3m": (
        "DPMSolverMultistepScheduler",
        tuple({"algorithm_type": "dpmsolver++", "solver_order": 3, **_MULTISTEP, **s} for s in _SPACINGS),
    ),
    "dpmpp_2m_sde": (
        "DPMSolverMultistepScheduler",
        tuple({"algorithm_type": "sde-dpmsolver++", "solver_order": 2, **_MULTISTEP, **s} for s in _SPACINGS),
    ),
    "unipc_bh2": ("UniPCMultistepScheduler", tuple({"solver_type": "bh2", **_MULTISTEP, **s} for s in _SPACINGS)),
    "euler": ("EulerDiscreteScheduler", _SPACINGS),
    "heun": ("HeunDiscreteScheduler", _SPACINGS),
}
FINETUNED_ROWS = tuple((solver, grid) for grid in ("uniform", "shift") for solver in ("euler", "midpoint", "multistep"))
TEACHER_ROWS = (("heun", "uniform"), *FINETUNED_ROWS)


def d2f_grid(field: D2FVelocity, grid: str, steps: int, shift: float = 3.0) -> torch.Tensor:
    return field.grid(grid, steps, shift)


def d2f_calls(field: D2FVelocity, solver: str, grid: str, steps: int, shift: float = 3.0) -> int:
    """Network calls of ``steps`` steps of ``solver`` on ``grid`` (``d2f.solvers.stage_times``)."""
    ts = d2f_grid(field, grid, steps, shift).tolist()
    return sum(len(stage_times(solver, a, b, field.singular_times)) for a, b in zip(ts, ts[1:]))


def diffusers_scheduler(name: str, settings: dict, teacher: D2FVelocity):
    import diffusers

    class_name, _ = DIFFUSERS[name]
    config = {**ddim_config(teacher.schedule, teacher.prediction_type), **settings}
    return getattr(diffusers, class_name).from_config(config)


def diffusers_calls(name: str, settings: dict, teacher: D2FVelocity, steps: int) -> int:
    """Network calls of the scheduler ``name`` with ``settings`` asked for ``steps`` steps."""
    scheduler = diffusers_scheduler(name, settings, teacher)
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def steps_for(nfe: int, calls, *row) -> int | None:
    """The step count whose ``calls(*row, steps)`` is exactly ``nfe``, or None where none is."""
    return next((n for n in range(1, nfe + 1) if calls(*row, n) == nfe), None)


class Scorer:
    """One seed's noise and labels, and the scores of samples against the real digits at one resolution."""

    def __init__(self, classifier, resolution: int, num_samples: int, seed: int, batch: int = 500):
        self.classifier, self.batch = classifier, batch
        self.real = features(classifier, mnist(resolution).images)
        pick = torch.randperm(len(self.real), generator=torch.Generator().manual_seed(seed))[:num_samples]
        self.real_subset = self.real[pick]
        generator = torch.Generator().manual_seed(1000 + seed)
        self.noise = torch.randn(num_samples, 1, resolution, resolution, generator=generator)
        self.labels = torch.arange(num_samples) % 10
        self.seed = seed

    def batches(self, sample) -> torch.Tensor:
        """``sample(noise, labels)`` over the seed's noise in batches."""
        starts = range(0, len(self.noise), self.batch)
        return torch.cat([sample(self.noise[i : i + self.batch], self.labels[i : i + self.batch]) for i in starts])

    def score(self, images: torch.Tensor) -> dict[str, float]:
        fake = features(self.classifier, images)
        precision, recall = precision_recall(self.real_subset, fake)
        return {
            "fid": fid(self.real, fake),
            "precision": precision,
            "recall": recall,
            "class_accuracy": class_accuracy(self.classifier, images, self.labels),
        }


def _diffusers_images(name, settings, teacher, scorer: Scorer, steps: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2000 + scorer.seed)  # the SDE scheduler's noise, per seed

    def run(noise, labels):
        scheduler = diffusers_scheduler(name, settings, teacher)
        return scheduler_loop(teacher.net, scheduler, noise, steps, {"class_labels": labels}, generator=generator)

    return scorer.batches(run)


def _d2f_images(field: D2FVelocity, solver: str, ts: torch.Tensor, scorer: Scorer) -> torch.Tensor:
    return scorer.batches(lambda noise, labels: field.sample(noise, ts, solver=solver, class_labels=labels))


def _calibrate(teacher: D2FVelocity, scorer: Scorer) -> tuple[dict, dict]:
    """Each scheduler's candidates at the calibration NFE: the chosen settings and every candidate's FID."""
    chosen, report = {}, {}
    for name, (_, candidates) in DIFFUSERS.items():
        tried = []
        for settings in candidates:
            row = (name, settings, teacher)
            nfe = next(c for c in CALIBRATION_NFE if steps_for(c, diffusers_calls, *row))
            steps = steps_for(nfe, diffusers_calls, *row)
            images = _diffusers_images(name, settings, teacher, scorer, steps)
            tried.append({"settings": settings, "nfe": nfe, "fid": scorer.score(images)["fid"]})
        report[name] = tried
        chosen[name] = min(tried, key=lambda row: row["fid"])["settings"]
    return chosen, report


def _add(cells: dict, nfe: int, scores: dict) -> None:
    cell = cells.setdefault(str(nfe), {key: [] for key in scores})
    for key, value in scores.items():
        cell[key].append(value)


def few_step(
    out: str = "runs/e5",
    num_samples: int = 200,
    nfe: tuple[int, ...] = E5_NFE,
    finetuned_nfe: tuple[int, ...] = FINETUNED_NFE,
    seeds: tuple[int, ...] = E5_SEEDS,
    finetune_steps: int = 600,
    reflow_pairs: int = 2000,
    reflow_pair_steps: int = 25,
    reflow_steps: int = 300,
    plot_png: Path | None = None,
) -> dict:
    """E5. Returns ``{"models": {model: {"resolution", "rows": {row: {"settings"?, "cells": {nfe: {metric:
    [one per seed]}}}}}}, "calibration": ..., ...}``; ``plot_png`` gets FID against NFE per model
    (``<stem>_<model>.png``: the mean over seeds, the seed range shaded)."""
    started = time.perf_counter()
    classifier = load_classifier()
    finetune = finetune_run(out, "lora", "d2f", seeds[0], finetune_steps, finetune_steps)
    train(finetune, progress=False)
    reflow_config, reflow_metrics, pair_meta = train_reflow(
        str(Path(out) / "e3"), reflow_pairs, reflow_pair_steps, reflow_steps, seeds[0]
    )
    models = {
        "teacher": (load("teacher"), 16),
        "teacher_epsilon": (load(str(teacher_path(prediction_type="epsilon"))), 16),
        "e2_d2f_lora": (load(str(Path(finetune.out) / "export")), 24),
        "e3_reflow": (load(str(Path(reflow_config.out) / "export")), 16),
    }
    calibration_scorer = Scorer(classifier, 16, num_samples, seeds[0])
    chosen, calibration = {}, {}
    for model in CONVERTED:
        chosen[model], calibration[model] = _calibrate(models[model][0], calibration_scorer)
    report: dict = {"models": {}}
    seconds = {"train_and_calibrate": round(time.perf_counter() - started, 1)}
    for model, (field, resolution) in models.items():
        model_started = time.perf_counter()
        rows: dict = {}
        d2f_rows, targets = (TEACHER_ROWS, nfe) if model in CONVERTED else (FINETUNED_ROWS, finetuned_nfe)
        for seed in seeds:
            scorer = (
                calibration_scorer
                if (seed, resolution) == (seeds[0], 16)
                else Scorer(classifier, resolution, num_samples, seed)
            )
            for name, settings in chosen.get(model, {}).items():
                row = rows.setdefault(f"diffusers:{name}", {"settings": settings, "cells": {}})
                for target in targets:
                    steps = steps_for(target, diffusers_calls, name, settings, field)
                    if steps is not None:
                        images = _diffusers_images(name, settings, field, scorer, steps)
                        _add(row["cells"], target, scorer.score(images))
            for solver, grid in d2f_rows:
                row = rows.setdefault(f"d2f:{solver}/{grid}", {"cells": {}})
                for target in targets:
                    steps = steps_for(target, d2f_calls, field, solver, grid)
                    if steps is not None:
                        ts = d2f_grid(field, grid, steps)
                        _add(row["cells"], target, scorer.score(_d2f_images(field, solver, ts, scorer)))
        seconds[model] = round(time.perf_counter() - model_started, 1)
        report["models"][model] = {"resolution": resolution, "nfe": list(targets), "rows": rows}
        if plot_png is not None:
            plot_fid(rows, model, plot_png.with_name(f"{plot_png.stem}_{model}{plot_png.suffix}"))
    report.update(
        {
            "seeds": list(seeds),
            "num_samples": num_samples,
            "calibration": {
                "nfe_first_reachable_of": list(CALIBRATION_NFE),
                "seed": seeds[0],
                "candidates": calibration,
            },
            "train": {
                "e2_d2f_lora": finetune.to_dict(),
                "e3_reflow": {
                    **reflow_config.to_dict(),  # its "pairs" is the file; the generation's record is beside it
                    "pair_generation": pair_meta,
                    "seconds_train": reflow_metrics["seconds_train"],
                },
            },
            "reference": "FID in the evaluation classifier's features against the 5000 real digits at the model's "
            "resolution; precision/recall (k=3) against num_samples of them",
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_by_part": seconds,
        }
    )
    return report


def plot_fid(rows: dict, model: str, path: Path) -> None:
    series, bands = {}, {}
    for name, row in rows.items():
        nfes = sorted(row["cells"], key=int)
        fids = [row["cells"][n]["fid"] for n in nfes]
        xs = [int(n) for n in nfes]
        series[name] = (xs, [sum(f) / len(f) for f in fids])
        bands[name] = ([min(f) for f in fids], [max(f) for f in fids])
    title = f"E5 {model}: FID (log scale) vs network calls, mean and range over seeds"
    save_line_plot(series, path, title, "NFE", log_y=True, size=(900, 560), bands=bands)
