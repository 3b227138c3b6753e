"""E5, few-step sampling at equal network calls: d2f's FM solvers against the schedulers diffusers users run.

Rows, each at every NFE (network calls per sample) of its model's list that it reaches exactly:

- ``diffusers:<name>`` on the embedded teacher as it is (``DIFFUSERS``), at ``nfe``: each scheduler with the
  settings diffusers documents for few steps, several candidates each; the candidate with the lowest FID at
  the calibration NFE (first seed) is the row, and every candidate's calibration FID is in the JSON (DDIM's
  own rule, ``{}``, is the DDIM-equivalent grid: d2f's Euler on ``grid="ddim"`` gives its samples);
- ``d2f:<solver>/<grid>``, d2f's FM solvers on the uniform and shift grids: on the converted teachers
  (zero-shot, ``TEACHER_ROWS``), and on an E2-style d2f LoRA finetune (24 px) and an E3-style reflow model
  (16 px), both trained here under ``out`` (``FINETUNED_ROWS``). The converted teachers also take midpoint and
  multistep on the grid of DDIM's own rule (leading spacing, offset 1, ending at data), on which Euler is DDIM.

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

import functools
import hashlib
import json
import math
import time
from pathlib import Path

import torch
from numpy.polynomial import polynomial as P

from .._files import write_atomic, write_json
from ..data.images import mnist
from ..figures import save_line_plot
from ..networks.export import ddim_config, load
from ..networks.miniature import base_pipeline
from ..networks.sampling import scheduler_loop
from ..networks.teachers import teacher_path
from ..solvers import stage_times
from ..training.loop import train
from ..velocity import D2FVelocity
from .cache import cached, trained_before
from .classifier import load_classifier
from .experiments import finetune_run
from .metrics import class_accuracy, features, fid, kid, precision_recall
from .prompts import evaluation_prompts, pipeline_images, prompt_following, real_features
from .reflow import train_reflow

E5_NFE = (1, 2, 3, 4, 6, 8, 10)  # every model's: NFE <= 10, where the samplers differ
CONVERTED = ("teacher", "teacher_epsilon")  # the teachers as converted, zero-shot: v-prediction and epsilon
FINETUNED = ("e2_d2f_lora", "e3_reflow")  # finetuned as flows, here
E5_MODELS = (*CONVERTED, *FINETUNED)
E5_SEEDS = (0, 1, 2)
CALIBRATION_NFE = (6, 5)  # the first one a scheduler reaches exactly (Heun reaches odd counts only)
TIMED_NFE = 4  # each row's samples per second are measured here

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
    "deis": ("DEISMultistepScheduler", tuple({"solver_order": 2, **_MULTISTEP, **s} for s in _SPACINGS)),
    # SA-Solver as diffusers ships it: predictor and corrector of order 2, stochastic (its default tau) between
    # timesteps 200 and 800, its noise drawn from the seed's generator.
    "sa_solver": ("SASolverScheduler", tuple({**_MULTISTEP, **s} for s in _SPACINGS)),
    "euler": ("EulerDiscreteScheduler", _SPACINGS),
    "heun": ("HeunDiscreteScheduler", _SPACINGS),
}
# d2f's candidates: its solvers, and Adams-Bashforth 3 (``ab3``, a candidate of this experiment only).
FINETUNED_ROWS = tuple(
    (solver, grid) for grid in ("uniform", "shift") for solver in ("euler", "midpoint", "multistep", "ab3")
)
TEACHER_ROWS = (("heun", "uniform"), *FINETUNED_ROWS, ("midpoint", "ddim"), ("multistep", "ddim"))


def d2f_grid(field: D2FVelocity, grid: str, steps: int, shift: float = 3.0) -> torch.Tensor:
    return field.grid(grid, steps, shift)


def d2f_calls(field: D2FVelocity, solver: str, grid: str, steps: int, shift: float = 3.0) -> int:
    """Network calls of ``steps`` steps of ``solver`` on ``grid`` (``d2f.solvers.stage_times``; AB3 calls once per
    step, at its start)."""
    ts = d2f_grid(field, grid, steps, shift).tolist()
    one_call = "multistep" if solver == "ab3" else solver
    return sum(len(stage_times(one_call, a, b, field.singular_times)) for a, b in zip(ts, ts[1:]))


def adams_bashforth_weights(nodes: list[float], t0: float, t1: float) -> list[float]:
    """The weights ``w_j`` of ``x' = x + h * sum_j w_j * u(t_j)`` that integrate, over ``[t0, t1]`` (``h = t1 - t0``),
    the polynomial through the velocities at ``nodes`` (``t0`` first, then the earlier evaluations):
    ``w_j = (1/h) * integral of L_j`` with ``L_j`` the Lagrange basis polynomial of node ``j``. One node is Euler, two
    are ``d2f.solvers``' multistep (Adams-Bashforth 2) and three Adams-Bashforth 3 (docs/conventions.md §5)."""
    h = t1 - t0
    weights = []
    for j, node in enumerate(nodes):
        others = [m - t0 for i, m in enumerate(nodes) if i != j]  # in tau = t - t0, which keeps the powers small
        basis = P.polyfromroots(others) / math.prod(node - t0 - m for m in others)
        integral = P.polyint(basis)
        weights.append(float(P.polyval(h, integral) - P.polyval(0.0, integral)) / h)
    return weights


@torch.no_grad()
def ab3_sample(field: D2FVelocity, noise: torch.Tensor, ts: torch.Tensor, **cond) -> torch.Tensor:
    """Adams-Bashforth 3 from ``noise`` over the 1-D grid ``ts``, one network call per step: Euler on the first
    step and Adams-Bashforth 2 on the second, while the history fills (``D2FVelocity.sample``'s start)."""
    times = ts.tolist()
    x = noise.float() / field.input_scale(times[0])
    history: list[tuple[float, torch.Tensor]] = []  # (t, u), the newest first
    for t0, t1 in zip(times, times[1:]):
        history = [(t0, field(x, t0, **cond)), *history[:2]]
        weights = adams_bashforth_weights([t for t, _ in history], t0, t1)
        x = x + (t1 - t0) * sum(w * u for w, (_, u) in zip(weights, history))
    return x


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
        kid_mean, kid_std = kid(self.real, fake, seed=self.seed)
        return {
            "fid": fid(self.real, fake),
            "kid": kid_mean,
            "kid_std": kid_std,
            "precision": precision,
            "recall": recall,
            "class_accuracy": class_accuracy(self.classifier, images, self.labels),
        }


def _diffusers_images(name, settings, teacher, steps: int, scorer: Scorer) -> torch.Tensor:
    generator = torch.Generator().manual_seed(2000 + scorer.seed)  # the stochastic schedulers' noise, per seed

    def run(noise, labels):
        scheduler = diffusers_scheduler(name, settings, teacher)
        return scheduler_loop(teacher.net, scheduler, noise, steps, {"class_labels": labels}, generator=generator)

    return scorer.batches(run)


def _d2f_images(field: D2FVelocity, solver: str, ts: torch.Tensor, scorer: Scorer) -> torch.Tensor:
    if solver == "ab3":
        return scorer.batches(lambda noise, labels: ab3_sample(field, noise, ts, class_labels=labels))
    return scorer.batches(lambda noise, labels: field.sample(noise, ts, solver=solver, class_labels=labels))


class Cells:
    """Every cell of one model, scored once and kept in ``folder`` (``<row>/nfe<N>-seed<S>.json``, beside the
    settings it was made with), so that a stopped run resumes and a rerun scores only what is new. ``scored_only``:
    cells are read, never drawn."""

    def __init__(self, folder: Path, model_settings: dict, num_samples: int, scored_only: bool = False):
        self.folder, self.model_settings, self.num_samples = folder, model_settings, num_samples
        self.scored_only = scored_only

    def get(self, row: str, sampler: dict, nfe: int, scorer: Scorer, draw) -> dict | None:
        """The cell of ``row`` (``sampler``: its settings and step count) at ``nfe`` for the scorer's seed:
        ``{"scores", "seconds"}``, with ``seconds`` the time ``draw()`` took to sample; with ``scored_only``, None
        where it was not scored before."""
        tag = hashlib.sha1(json.dumps(sampler, sort_keys=True).encode()).hexdigest()[:8]
        file = self.folder / f"{row.replace(':', '-').replace('/', '-')}-{tag}" / f"nfe{nfe}-seed{scorer.seed}.json"
        settings = {"model": self.model_settings, "num_samples": self.num_samples, "row": row, **sampler}
        if (kept := cached(file, settings)) is not None or self.scored_only:
            return kept
        started = time.perf_counter()
        images = draw()
        cell = {
            "settings": settings,
            "seconds": round(time.perf_counter() - started, 2),
            "scores": scorer.score(images),
        }
        file.parent.mkdir(parents=True, exist_ok=True)
        write_json(file, cell)
        return cell


RUNS = "runs.jsonl"  # under E5's folder: one line per run that drew cells, so the wall time survives resumes


def _record_run(out: str, part: str, started: float, **asked) -> None:
    """Add one run of ``part`` (``few_step`` or ``pipeline``) to ``out/runs.jsonl``: when it started, its wall
    seconds and what it was asked. The file is rewritten whole (``write_atomic``), so a crash leaves no half line."""
    line = {
        "part": part,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        **asked,
    }
    path = Path(out) / RUNS
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text() if path.is_file() else ""
    write_atomic(path, before + json.dumps(line) + "\n")


def wall_time(out: str) -> dict:
    """E5's wall time: every run ``out/runs.jsonl`` lists (training, calibration and scoring included; a report
    that only reads cells is no run) and their sum in seconds."""
    path = Path(out) / RUNS
    runs = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    return {"runs": runs, "seconds": round(sum(run["seconds"] for run in runs), 1)}


def calibrate(reaches, cell) -> tuple[dict, dict] | None:
    """Each ``DIFFUSERS`` scheduler's settings: of its candidates, the one with the lowest FID at the first
    ``CALIBRATION_NFE`` that every candidate reaches exactly (``reaches(name, settings, nfe)``), each scored by
    ``cell(name, settings, nfe)`` (its :class:`Cells` cell, which is then its row's cell at that NFE). Returns
    the chosen settings per scheduler and every candidate's FID and KID; None while a candidate is not scored
    (``Cells.scored_only``)."""
    chosen, report = {}, {}
    for name, (_, candidates) in DIFFUSERS.items():
        nfe = next(c for c in CALIBRATION_NFE if all(reaches(name, settings, c) for settings in candidates))
        tried = []
        for settings in candidates:
            if (scored := cell(name, settings, nfe)) is None:
                return None
            tried.append({"settings": settings, "nfe": nfe, **{k: scored["scores"][k] for k in ("fid", "kid")}})
        report[name] = tried
        chosen[name] = min(tried, key=lambda row: row["fid"])["settings"]
    return chosen, report


def _calibrate(teacher: D2FVelocity, scorer: Scorer, cells: Cells) -> tuple[dict, dict] | None:
    """:func:`calibrate` on a teacher, on ``scorer``'s seed."""

    def cell(name: str, settings: dict, nfe: int) -> dict | None:
        steps = steps_for(nfe, diffusers_calls, name, settings, teacher)
        draw = functools.partial(_diffusers_images, name, settings, teacher, steps, scorer)
        return cells.get(f"diffusers:{name}", {"settings": settings, "steps": steps}, nfe, scorer, draw)

    def reaches(name: str, settings: dict, nfe: int) -> bool:
        return steps_for(nfe, diffusers_calls, name, settings, teacher) is not None

    return calibrate(reaches, cell)


def _add(cells: dict, nfe: int, scores: dict) -> None:
    cell = cells.setdefault(str(nfe), {key: [] for key in scores})
    for key, value in scores.items():
        cell[key].append(value)


def beyond_spread(better: list[float], worse: list[float]) -> bool:
    """Whether ``better`` beats ``worse`` beyond the seed spread: every seed of it scores lower than every seed of
    the other."""
    return max(better) < min(worse)


def separations(rows: dict, metric: str = "kid") -> dict:
    """Per NFE, the rows ranked by their mean ``metric`` over seeds, and for each row the rows it beats beyond the
    seed spread (:func:`beyond_spread`)."""
    result = {}
    nfes = sorted({n for row in rows.values() for n in row["cells"]}, key=int)
    for nfe in nfes:
        scored = {name: row["cells"][nfe][metric] for name, row in rows.items() if nfe in row["cells"]}
        ranked = sorted(scored, key=lambda name: sum(scored[name]) / len(scored[name]))
        beats = {a: [b for b in ranked if beyond_spread(scored[a], scored[b])] for a in ranked}
        result[nfe] = {"ranked": ranked, "beats_beyond_seed_spread": beats}
    return result


# The rows solver="auto" can take (AB3 is no solver of d2f's), in the tie rule's order: where rows are within the
# seed spread of each other, the first here is kept. One network call per step before two, no history before
# history, the uniform grid before the shift grid (one setting less), both before DDIM's grid (a step rule
# read off the network's diffusion schedule, for converted networks only).
SIMPLICITY = tuple(
    f"d2f:{solver}/{grid}"
    for solver in ("euler", "multistep", "midpoint", "heun")
    for grid in ("uniform", "shift", "ddim")
)


def auto_table(report: dict, metric: str = "kid") -> dict[str, dict[str, str]]:
    """The row ``solver="auto"`` should take, per kind of model and NFE, from E5's ``report``: ``converted`` weighs
    the teachers zero-shot and the miniature Stable Diffusion (``report["pipeline"]``, where present),
    ``flow_finetuned`` the finetunes; an NFE enters the table where a model of the report's ``models`` was
    measured at it (the pipeline alone decides none, since it is one epsilon network of latents where the
    teachers are networks of pixels). Of the ``SIMPLICITY`` rows that every model measured at that NFE has, those
    that no other of them beats beyond the seed spread (:func:`beyond_spread`) on any of those
    models, the simplest; where none is unbeaten on every model, the one with the lowest rank by the mean, summed
    over the models."""
    table: dict[str, dict[str, str]] = {}
    for kind, names in (("converted", CONVERTED), ("flow_finetuned", FINETUNED)):
        models = [report["models"][name] for name in names if name in report["models"]]
        nfes = sorted({n for model in models for row in model["rows"].values() for n in row["cells"]}, key=int)
        if kind == "converted" and report.get("pipeline"):
            models.append(report["pipeline"])
        for nfe in nfes:
            measured = [
                {
                    r: m["rows"][r]["cells"][nfe][metric]
                    for r in SIMPLICITY
                    if nfe in m["rows"].get(r, {}).get("cells", {})
                }
                for m in models
            ]
            measured = [scores for scores in measured if scores]
            rows = [r for r in SIMPLICITY if all(r in scores for scores in measured)]
            if not rows:
                continue
            beaten = {r for r in rows for s in measured if any(beyond_spread(s[a], s[r]) for a in rows)}
            rank = {r: sum(sorted(rows, key=lambda q, s=s: sum(s[q])).index(r) for s in measured) for r in rows}
            unbeaten = [r for r in rows if r not in beaten]
            table.setdefault(kind, {})[nfe] = unbeaten[0] if unbeaten else min(rows, key=rank.get)
    return table


def _draws(model: str, field: D2FVelocity, chosen: dict, nfe: int):
    """``(row, sampler, draw)`` for every row of ``model`` that reaches ``nfe`` exactly: ``sampler`` its settings
    (diffusers') and step count, ``draw(scorer)`` its samples on the scorer's seed."""
    for name, settings in chosen.items():
        if (steps := steps_for(nfe, diffusers_calls, name, settings, field)) is not None:
            draw = functools.partial(_diffusers_images, name, settings, field, steps)
            yield f"diffusers:{name}", {"settings": settings, "steps": steps}, draw
    for solver, grid in TEACHER_ROWS if model in CONVERTED else FINETUNED_ROWS:
        if (steps := steps_for(nfe, d2f_calls, field, solver, grid)) is not None:
            ts = d2f_grid(field, grid, steps)
            yield f"d2f:{solver}/{grid}", {"steps": steps}, functools.partial(_d2f_images, field, solver, ts)


def _models(out: str, names, seed: int, finetune_steps, reflow_pairs, reflow_pair_steps, reflow_steps, scored_only):
    """``{model: (field, resolution, settings)}`` for ``names``: the teachers, and the finetunes trained here
    (once: a finished run is used again; ``scored_only``: a finetune not finished is left out, and left alone)."""
    models = {}
    for name in names:
        if name in CONVERTED:
            path = "teacher" if name == "teacher" else str(teacher_path(prediction_type="epsilon"))
            models[name] = (load(path), 16, {"model": name})
        elif name == "e2_d2f_lora":
            config = finetune_run(out, "lora", "d2f", seed, finetune_steps, finetune_steps)
            if scored_only and not (Path(config.out) / "metrics.json").is_file():
                continue
            if not trained_before(Path(config.out), config):
                train(config, progress=False)
            models[name] = (load(str(Path(config.out) / "export")), 24, {"train": config.to_dict()})
        else:
            work = Path(out) / "e3"
            settings = {"pairs": reflow_pairs, "pair_steps": reflow_pair_steps, "steps": reflow_steps, "seed": seed}
            if (made := cached(work / "e5_reflow.json", settings)) is None:
                if scored_only:
                    continue
                config, metrics, pair_meta = train_reflow(
                    str(work), reflow_pairs, reflow_pair_steps, reflow_steps, seed
                )
                made = {
                    "settings": settings,
                    "train": {
                        **config.to_dict(),  # its "pairs" is the file; the generation's record is beside it
                        "pair_generation": pair_meta,
                        "seconds_train": metrics["seconds_train"],
                    },
                }
                write_json(work / "e5_reflow.json", made)
            models[name] = (load(str(Path(made["train"]["out"]) / "export")), 16, {"train": made["train"]})
    return models


def few_step(
    out: str = "runs/e5",
    num_samples: int = 2000,
    nfe: tuple[int, ...] = E5_NFE,
    seeds: tuple[int, ...] = E5_SEEDS,
    models: tuple[str, ...] = E5_MODELS,
    finetune_steps: int = 600,
    reflow_pairs: int = 2000,
    reflow_pair_steps: int = 25,
    reflow_steps: int = 300,
    plot_png: Path | None = None,
    scored_only: bool = False,
) -> dict:
    """E5. Returns ``{"models": {model: {"resolution", "rows": {row: {"settings"?, "cells": {nfe: {metric:
    [one per seed]}}, "samples_per_second": at TIMED_NFE}}, "separations": ...}}, "calibration": ..., ...}``.

    Each cell is kept under ``out/cells`` as it is scored (:class:`Cells`): a stopped run resumes, and ``models``
    picks the models to score now. The NFE are taken in the order of ``nfe``, each over every row and seed, so the
    first ones are whole when a run stops. ``scored_only``: score nothing new, report the cells scored before on
    every seed (a run in progress, or one stopped; a teacher whose calibration is not whole is left out).
    ``plot_png`` gets FID against NFE per model (``<stem>_<model>.png``: the mean over seeds, the seed range
    shaded)."""
    for name in models:
        if name not in E5_MODELS:
            raise ValueError(f"models: {name!r} is not allowed: each one of {E5_MODELS}")
    started, started_wall = time.perf_counter(), time.time()
    classifier = load_classifier()
    loaded = _models(out, models, seeds[0], finetune_steps, reflow_pairs, reflow_pair_steps, reflow_steps, scored_only)
    report: dict = {"models": {}}
    seconds = {"load_and_train": round(time.perf_counter() - started, 1)}
    chosen, calibration = {}, {}
    for model, (field, resolution, model_settings) in loaded.items():
        model_started = time.perf_counter()
        cells = Cells(Path(out) / "cells" / model, model_settings, num_samples, scored_only)
        scorers = {seed: Scorer(classifier, resolution, num_samples, seed) for seed in seeds}
        if model in CONVERTED:
            if (calibrated := _calibrate(field, scorers[seeds[0]], cells)) is None:
                continue
            chosen[model], calibration[model] = calibrated
        rows: dict = {}
        for target in nfe:
            for name, sampler, draw in _draws(model, field, chosen.get(model, {}), target):
                kept = [
                    cells.get(name, sampler, target, scorer, functools.partial(draw, scorer))
                    for scorer in scorers.values()
                ]
                if None in kept:
                    continue
                shown = {key: value for key, value in sampler.items() if key != "steps"}  # steps vary by NFE
                row = rows.setdefault(name, {**shown, "cells": {}, "seconds": {}})
                for cell in kept:
                    _add(row["cells"], target, cell["scores"])
                row["seconds"][str(target)] = [cell["seconds"] for cell in kept]
        sampled = 0.0  # the rows' sampling time, whenever their cells were scored
        for row in rows.values():
            timed = row.pop("seconds")
            sampled += sum(map(sum, timed.values()))
            if str(TIMED_NFE) in timed:
                row["samples_per_second"] = round(num_samples / min(timed[str(TIMED_NFE)]), 1)
        seconds[model] = round(time.perf_counter() - model_started, 1)
        report["models"][model] = {
            "resolution": resolution,
            "seconds_sampling": round(sampled, 1),
            "nfe": sorted({int(n) for row in rows.values() for n in row["cells"]}),
            "rows": rows,
            "separations": separations(rows),
        }
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
            "train": {model: settings for model, (_, _, settings) in loaded.items() if model not in CONVERTED},
            "reference": "FID and KID (cubic kernel, mean and std over 100 subsets of 1000) in the evaluation "
            "classifier's features against the 5000 real digits at the model's resolution; precision/recall (k=3) "
            "against num_samples of them",
            "samples_per_second": f"num_samples per second of sampling (scoring excluded) at NFE {TIMED_NFE}, "
            "as measured when each cell was scored: the fastest of the seeds, the one least slowed by other work on "
            "the machine",
            "seconds": round(time.perf_counter() - started, 1),
            "seconds_by_part": seconds,
        }
    )
    if not scored_only:
        _record_run(out, "few_step", started_wall, models=list(models), nfe=list(nfe), num_samples=num_samples)
    return report


PIPELINE_NFE = (2, 3, 4, 5, 6, 7, 8, 9, 10)
PIPELINE_GUIDANCE = 3.0
PIPELINE_SEED = 3 * 10**6  # image i of seed s starts from seed PIPELINE_SEED + 1000 * s + i: apart from E6's


class PipelineScorer:
    """One seed of the pipeline comparison: one image per evaluation prompt, image ``i`` from
    ``PIPELINE_SEED + 1000 * seed + i``'s noise, scored by prompt following and by KID against the real digits."""

    def __init__(self, classifier, reference: torch.Tensor, seed: int, num_prompts: int | None = None):
        self.classifier, self.reference, self.seed = classifier, reference, seed
        self.prompts = evaluation_prompts()[:num_prompts]

    def draw(self, pipe, steps: int) -> torch.Tensor:
        return pipeline_images(pipe, self.prompts, steps, PIPELINE_GUIDANCE, PIPELINE_SEED + 1000 * self.seed)

    def score(self, images: torch.Tensor) -> dict:
        return prompt_following(images, self.prompts, self.classifier, self.reference)


def pipeline_few_step(
    out: str = "runs/e5",
    nfe: tuple[int, ...] = PIPELINE_NFE,
    seeds: tuple[int, ...] = E5_SEEDS,
    num_prompts: int | None = None,
    scored_only: bool = False,
) -> dict | None:
    """E5 on the shipped miniature Stable Diffusion, zero-shot through ``StableDiffusionPipeline`` at its own 64 px
    and guidance 3: ``D2FScheduler`` with each of d2f's rows on the teachers (AB3 is no solver of it) against
    E5's diffusers schedulers, each at the spacing with the lowest FID at the calibration NFE (first seed), as on
    the teachers. NFE is ``len(scheduler.timesteps)``: each is one batched UNet call of the prompt and the empty
    prompt. ``num_prompts``: the first so many evaluation prompts (unset: all 120). Returns ``{"rows": {row:
    {"settings", "cells": {nfe: {score: [one per seed]}}}}, "separations", "calibration", ...}``; cells are kept
    under ``out/cells/pipeline`` as for the teachers. ``scored_only`` as for :func:`few_step` (None while the
    calibration is not whole)."""
    import diffusers

    from ..scheduler import D2FScheduler

    started, started_wall = time.perf_counter(), time.time()
    classifier = load_classifier()
    pipe = base_pipeline()
    own = dict(pipe.scheduler.config)
    reference = real_features(classifier, pipe.unet.config.sample_size * pipe.vae_scale_factor)
    scorers = [PipelineScorer(classifier, reference, seed, num_prompts) for seed in seeds]
    model = {"model": "miniature", "guidance": PIPELINE_GUIDANCE}
    cells = Cells(Path(out) / "cells" / "pipeline", model, len(scorers[0].prompts), scored_only)

    def scheduler(name: str, settings: dict):
        if name.startswith("d2f:"):
            return D2FScheduler.from_config(own, **settings)
        return getattr(diffusers, DIFFUSERS[name][0]).from_config({**own, **settings})

    def calls(name: str, settings: dict, steps: int) -> int:
        chosen = scheduler(name, settings)
        chosen.set_timesteps(steps)
        return len(chosen.timesteps)

    def cell(name: str, settings: dict, target: int, scorer: PipelineScorer) -> dict | None:
        if (steps := steps_for(target, calls, name, settings)) is None:
            return None
        pipe.scheduler = scheduler(name, settings)
        draw = functools.partial(scorer.draw, pipe, steps)
        return cells.get(name, {"settings": settings, "steps": steps}, target, scorer, draw)

    calibrated = calibrate(
        lambda name, settings, nfe: steps_for(nfe, calls, name, settings) is not None,
        lambda name, settings, nfe: cell(name, settings, nfe, scorers[0]),
    )
    if calibrated is None:
        return None
    chosen, calibration = calibrated
    rows = {f"diffusers:{name}": {"settings": settings, "cells": {}} for name, settings in chosen.items()}
    for solver, grid in TEACHER_ROWS:
        if solver != "ab3":
            rows[f"d2f:{solver}/{grid}"] = {"settings": {"solver": solver, "grid": grid}, "cells": {}}
    for target in nfe:
        for name, row in rows.items():
            kept = [cell(name.removeprefix("diffusers:"), row["settings"], target, scorer) for scorer in scorers]
            if None not in kept:  # reached exactly, and scored on every seed
                for one in kept:
                    _add(row["cells"], target, one["scores"])
    rows = {name: row for name, row in rows.items() if row["cells"]}
    if not scored_only:
        _record_run(out, "pipeline", started_wall, nfe=list(nfe), seeds=list(seeds))
    return {
        "rows": rows,
        "separations": separations(rows),
        "calibration": {"nfe_first_reachable_of": list(CALIBRATION_NFE), "seed": seeds[0], "candidates": calibration},
        "seeds": list(seeds),
        "images_per_seed": len(scorers[0].prompts),
        "guidance": PIPELINE_GUIDANCE,
        "seconds": round(time.perf_counter() - started, 1),
    }


def e5(out: str = "runs/e5", seeds: tuple[int, ...] = E5_SEEDS, scored_only: bool = False, **settings) -> dict:
    """E5 whole: :func:`few_step` (``settings`` as it takes them), the pipeline comparison on the same seeds
    (``report["pipeline"]``), the auto table they give (:func:`auto_table`) and the experiment's wall time over
    every run that drew its cells (:func:`wall_time`). ``scored_only``: the report of the cells scored so far."""
    report = few_step(out, seeds=seeds, scored_only=scored_only, **settings)
    report["pipeline"] = pipeline_few_step(out, seeds=seeds, scored_only=scored_only)
    report["auto_table"] = auto_table(report)
    report["wall_time"] = wall_time(out)
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
