"""``d2f study``: when does Diff2Flow beat diffusion finetuning? A fractional design on E2's task.

The task is E2's: the 16x16 MNIST teacher finetuned to 24x24 digits, batch 32, EMA 0.999, ``max_steps``
steps. Every run is scored at the end with the same noise and labels, at 2, 4, 10 and 25 FM Euler steps on
three grids (uniform in t, the DDIM-equivalent grid, SD3's shift 3), by FID against the 5000 real digits
(the evaluation classifier's features, ``num_samples`` samples) and by class accuracy.

The design (a full factorial would take days on 2 cores):

1. **lr**, tuned per objective *and* capacity (d2f, diffusion and naive fm with LoRA rank 8; d2f and diffusion
   with LoRA rank 32 and full finetuning), seed 0, scored at 10 steps on its natural grid (uniform for d2f and
   fm, DDIM for diffusion). Each search starts at 3e-4, 1e-3, 3e-3 and 1e-2 and, while its best lr sits at an
   edge of what it tried, adds the next lr outward on the half-decade ladder 3e-5 ... 1e-1, so a best lr is
   interior unless it is a ladder end (reported). A run that diverges (non-finite loss or samples) scores as
   diverged. Each objective and capacity is used at its own best lr from then on.
2. **time sampler and seeds**: d2f with each ``--t-sampler`` (uniform, logit-normal, diffusion-matched),
   diffusion and fm, each with every seed.
3. **zero terminal SNR**: the teacher finetuned for ``zsnr_steps`` on its own 16px task with its schedule
   rescaled to zero terminal SNR, then d2f (uniform t) and diffusion from it, every seed.
4. **capacity**: d2f (uniform and logit-normal t) and diffusion with LoRA rank 32 and full finetuning, every
   seed, each at its own tuned lr.

Verdicts compare d2f with diffusion finetuning at the same capacity and teacher, each on its best grid at
that step count: *win* or *lose* when the seeds' FID ranges do not overlap, *tie* otherwise. How coarse that
is: if seed-to-seed noise were all there is, the ranges of two seeds a side would fail to overlap by chance
with probability 2 / C(4, 2) = 1/3, of three seeds a side 2 / C(6, 3) = 1/10. The per-seed values are in the
JSON.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean

import torch
from tqdm.auto import tqdm

from .._checks import NonFiniteError
from .._files import read_json, write_atomic, write_json
from ..data.images import mnist
from ..figures import save_line_plot
from ..networks.export import load
from ..time_samplers import T_SAMPLERS
from ..training.draws import DRAWS
from .classifier import load_classifier
from .metrics import features, score
from .study_tables import best_grid, markdown

STUDY_STEPS = (2, 4, 10, 25)
STUDY_GRIDS = ("uniform", "ddim", "shift")
LR_LADDER = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
LRS = LR_LADDER[2:6]  # where every lr search starts
CAPACITY = {8: "lora8", 32: "lora32", 0: "full"}  # LoRA rank (0: full finetuning) -> label
LR_SEARCH = {8: ("d2f", "diffusion", "fm"), 32: ("d2f", "diffusion"), 0: ("d2f", "diffusion")}
CAPACITY_T_SAMPLERS = ("uniform", "logit-normal")  # the lr searches' t, and d2f train's default
NATURAL_GRID = {"d2f": "uniform", "fm": "uniform", "diffusion": "ddim"}


@dataclass(frozen=True)
class Cell:
    objective: str
    lr: float
    seed: int = 0
    t_sampler: str | None = None  # d2f and fm; None for diffusion
    lora_rank: int = 8
    teacher: str = "teacher"  # "teacher" or "zsnr" (the zero-terminal-SNR finetune)

    @property
    def name(self) -> str:
        rank = f"r{self.lora_rank}" if self.lora_rank else "full"
        sampler = f"-{self.t_sampler}" if self.t_sampler else ""
        return f"{self.teacher}-{rank}-{self.objective}{sampler}-lr{self.lr:g}-seed{self.seed}"


def clear_unfinished(folder: Path) -> None:
    """The study owns its runs folder: a run stopped before its export (a killed worker) starts over, since
    ``d2f train`` refuses a folder holding another run's files."""
    if folder.exists():
        print(f"d2f study: removing {folder}, an unfinished run, to train it again", file=sys.stderr)
        shutil.rmtree(folder)


class Study:
    def __init__(self, out: str, max_steps: int, num_samples: int, seeds: tuple[int, ...], zsnr_steps: int):
        self.out, self.max_steps, self.num_samples, self.seeds = Path(out), max_steps, num_samples, seeds
        self.zsnr_steps = zsnr_steps
        self.classifier = load_classifier()
        self.real = features(self.classifier, mnist(24).images)
        self.noise = torch.randn(num_samples, 1, 24, 24, generator=torch.Generator().manual_seed(1234))
        self.labels = torch.arange(num_samples) % 10
        self.results: dict[str, dict] = {}
        # Finished runs are reused by name, so a runs folder must belong to one setting of the budget.
        settings = {"max_steps": max_steps, "num_samples": num_samples, "zsnr_steps": zsnr_steps, "draws": DRAWS}
        marker = self.out / "settings.json"
        if marker.is_file() and read_json(marker) != settings:
            raise ValueError(
                f"{self.out} holds runs made with {read_json(marker)}, not {settings}; choose another --runs folder"
            )
        self.out.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():  # written whole: workers starting at once read it meanwhile
            write_json(marker, settings)

    def teacher_path(self, teacher: str) -> str:
        return "teacher" if teacher == "teacher" else str(self.out / "zsnr-teacher" / "export")

    def make_zsnr_teacher(self) -> None:
        from ..training.config import TrainConfig
        from ..training.loop import train

        if (self.out / "zsnr-teacher" / "export" / "d2f.json").is_file():
            return
        clear_unfinished(self.out / "zsnr-teacher")
        train(
            TrainConfig.teacher_task(
                out=str(self.out / "zsnr-teacher"),
                objective="diffusion",
                zero_terminal_snr=True,
                resolution=16,
                lora_rank=0,
                lr=1e-4,
                batch_size=64,
                max_steps=self.zsnr_steps,
                checkpoint_every=0,
                num_samples=20,
            ),
            progress=False,
        )

    def finished(self, cell: Cell, grids=STUDY_GRIDS, steps=STUDY_STEPS) -> dict | None:
        """The cell's scores if an earlier run already scored it on ``grids`` x ``steps``, else None."""
        folder = self.out / cell.name
        if not (folder / "scores.json").is_file():
            return None
        result = read_json(folder / "scores.json")
        if result.get("diverged"):
            self.results[cell.name] = result
            return result
        if not all(f"{g}/{n}" in result["scores"] for g in self._grids(cell, grids) for n in steps):
            return None
        if "device" not in result:  # scores written before the device was recorded
            result["device"] = read_json(folder / "metrics.json")["device"]
        self.results[cell.name] = result
        return result

    def run(self, cell: Cell, grids=STUDY_GRIDS, steps=STUDY_STEPS) -> dict:
        """Train ``cell`` (unless done before) and score it on ``grids`` x ``steps``; cached in its folder.

        A run whose loss or samples go non-finite is recorded as ``{"diverged": reason}`` and not retried."""
        cached = self.out / cell.name / "scores.json"
        result = self.finished(cell, grids, steps)
        if result is not None:
            return result
        try:
            result = self._train_and_score(cell, grids, steps)
        except (FloatingPointError, NonFiniteError) as e:
            # Too high an lr is a result of the lr search, not a failure of the study.
            result = {"cell": asdict(cell), "diverged": str(e).splitlines()[0], "scores": {}}
            cached.parent.mkdir(parents=True, exist_ok=True)
        write_json(cached, result)
        self.results[cell.name] = result
        return result

    def _train_and_score(self, cell: Cell, grids, steps) -> dict:
        from ..training.config import TrainConfig
        from ..training.loop import train

        folder = self.out / cell.name
        cached = folder / "scores.json"
        if not (folder / "export" / "d2f.json").is_file():
            clear_unfinished(folder)
            metrics = train(
                TrainConfig.teacher_task(
                    out=str(folder),
                    pretrained=self.teacher_path(cell.teacher),
                    objective=cell.objective,
                    t_sampler=cell.t_sampler,
                    lora_rank=cell.lora_rank,
                    lr=cell.lr,
                    max_steps=self.max_steps,
                    seed=cell.seed,
                    checkpoint_every=0,
                    num_samples=10,
                    sample_steps=10,
                ),
                progress=False,
            )
        else:
            metrics = read_json(folder / "metrics.json")
        field = load(str(folder / "export"))
        scores = read_json(cached)["scores"] if cached.is_file() else {}
        for grid in self._grids(cell, grids):
            for n in steps:
                if f"{grid}/{n}" not in scores:
                    ts = field.grid(grid, n)
                    images = field.sample(self.noise, ts, class_labels=self.labels)
                    scores[f"{grid}/{n}"] = score(self.classifier, self.real, images, self.labels)
        return {
            "cell": asdict(cell),
            "seconds_train": metrics["seconds_train"],
            "device": metrics["device"],
            "scores": scores,
        }

    @staticmethod
    def _grids(cell: Cell, grids) -> list[str]:
        return [g for g in grids if not (cell.objective == "fm" and g == "ddim")]  # naive FM has no DDIM grid


_WORKER: Study | None = None


def _start_worker(args: tuple, threads: int) -> None:
    global _WORKER
    torch.set_num_threads(threads)
    _WORKER = Study(*args)


def _run_in_worker(cell: Cell, grids, steps) -> dict:
    return _WORKER.run(cell, grids, steps)


def _run_cells(s: Study, args: tuple, jobs: list[tuple], workers: int, bar, report_only: bool = False) -> None:
    """Run ``(cell, grids, steps)`` jobs, in ``workers`` processes when > 1 (each with its share of the cores).

    ``report_only``: train nothing; read back the cells that are finished."""
    if report_only:
        for job in jobs:
            if s.finished(*job) is not None:
                bar.update()
            else:  # an lr run scored on one grid only is not finished for a group
                s.results.pop(job[0].name, None)
        return
    if workers <= 1:
        for job in jobs:
            s.run(*job)
            bar.update()
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")  # no fork of a process that holds torch threads
    with ProcessPoolExecutor(workers, context, _start_worker, (args, threads)) as pool:
        futures = {pool.submit(_run_in_worker, *job): job[0] for job in jobs}
        for future in as_completed(futures):
            s.results[futures[future].name] = future.result()
            bar.update()


def _fid(result: dict, grid: str, n: int) -> float:
    return math.inf if result.get("diverged") else result["scores"][f"{grid}/{n}"]["fid"]


def _lr_cell(objective: str, lr: float, rank: int, seed: int) -> Cell:
    return Cell(objective, lr, seed, None if objective == "diffusion" else "uniform", rank)


def _tune_lr(s: Study, args: tuple, workers: int, bar, report_only: bool, seed: int) -> dict:
    """FID at 10 steps on the natural grid for every lr tried, keyed by (objective, rank).

    Searches run side by side, a round at a time; a search whose best lr is at an edge of what it tried gets
    the next ladder lr beyond that edge in the next round."""
    tried = {(objective, rank): list(LRS) for rank, objectives in LR_SEARCH.items() for objective in objectives}
    while True:
        cells = {(key, lr): _lr_cell(key[0], lr, key[1], seed) for key, lrs in tried.items() for lr in lrs}
        jobs = [(c, (NATURAL_GRID[c.objective],), (10,)) for c in cells.values() if c.name not in s.results]
        bar.total += len(jobs)
        bar.refresh()
        _run_cells(s, args, jobs, workers, bar, report_only)
        missing = [c.name for c in cells.values() if c.name not in s.results]
        if missing:
            raise ValueError(f"{s.out}: the lr runs {missing} are not finished; run the study without report_only")
        fids = {
            key: {lr: _fid(s.results[cells[key, lr].name], NATURAL_GRID[key[0]], 10) for lr in lrs}
            for key, lrs in tried.items()
        }
        grown = False
        for key, lrs in tried.items():
            best = LR_LADDER.index(min(fids[key], key=fids[key].get))
            if best == LR_LADDER.index(lrs[0]) and best > 0:
                lrs.insert(0, LR_LADDER[best - 1])
                grown = True
            elif best == LR_LADDER.index(lrs[-1]) and best < len(LR_LADDER) - 1:
                lrs.append(LR_LADDER[best + 1])
                grown = True
        if not grown:
            return fids


def _verdict(d2f: list[float], diffusion: list[float]) -> str:
    if max(d2f) < min(diffusion):
        return "win"
    if min(d2f) > max(diffusion):
        return "lose"
    return "tie"


def study(
    out: str = "runs/study",
    max_steps: int = 400,
    num_samples: int = 300,
    seeds: tuple[int, ...] = (0, 1, 2),
    zsnr_steps: int = 500,
    plot_png: Path | None = None,
    workers: int = 1,
    report_only: bool = False,
) -> dict:
    """Run the design above (resumable: finished runs are read back from ``out``); returns the report.

    ``workers > 1`` trains that many runs at once in separate processes (on a GPU host they share the GPU).
    ``report_only`` trains nothing and reports the groups whose runs are all finished (the others are listed
    under ``not_run``).
    """
    started = time.perf_counter()
    args = (out, max_steps, num_samples, seeds, zsnr_steps)
    s = Study(*args)
    bar = tqdm(desc="d2f study", unit="run", total=0)  # each phase adds its runs as it queues them

    # 1. lr per objective and capacity, seed 0, scored at 10 steps on the natural grid.
    lr_fids = _tune_lr(s, args, workers, bar, report_only, seeds[0])
    best_lr = {key: min(fids, key=fids.get) for key, fids in lr_fids.items()}

    def cells(objective: str, sampler: str | None, rank: int = 8, teacher: str = "teacher") -> list[Cell]:
        return [Cell(objective, best_lr[objective, rank], seed, sampler, rank, teacher) for seed in seeds]

    groups: dict[str, list[Cell]] = {}
    for sampler in T_SAMPLERS:  # 2. time samplers and seeds
        groups[f"lora8 d2f t={sampler}"] = cells("d2f", sampler)
    groups["lora8 diffusion"] = cells("diffusion", None)
    groups["lora8 fm"] = cells("fm", "uniform")
    if not report_only:
        s.make_zsnr_teacher()  # 3. zero terminal SNR
    groups["zsnr lora8 d2f t=uniform"] = cells("d2f", "uniform", teacher="zsnr")
    groups["zsnr lora8 diffusion"] = cells("diffusion", None, teacher="zsnr")
    for rank in (32, 0):  # 4. capacity
        label = CAPACITY[rank]
        for sampler in CAPACITY_T_SAMPLERS:
            groups[f"{label} d2f t={sampler}"] = cells("d2f", sampler, rank)
        groups[f"{label} diffusion"] = cells("diffusion", None, rank)
    unique = {cell.name: cell for group in groups.values() for cell in group}
    bar.total += len(unique)
    bar.refresh()
    _run_cells(s, args, [(cell, STUDY_GRIDS, STUDY_STEPS) for cell in unique.values()], workers, bar, report_only)
    bar.close()
    not_run = [label for label, group in groups.items() if any(c.name not in s.results for c in group)]
    diverged = {
        label: [c.name for c in group if s.results[c.name].get("diverged")]
        for label, group in groups.items()
        if label not in not_run and any(s.results[c.name].get("diverged") for c in group)
    }
    groups = {label: group for label, group in groups.items() if label not in not_run and label not in diverged}

    table = {}
    for label, group in groups.items():
        results = [s.results[c.name] for c in group]
        table[label] = {
            grid_n: {
                "fid": [r["scores"][grid_n]["fid"] for r in results],
                "class_accuracy": [r["scores"][grid_n]["class_accuracy"] for r in results],
            }
            for grid_n in results[0]["scores"]
        }
    verdicts = {}
    for label in groups:
        if " d2f " not in f" {label} ":
            continue
        base = label.split(" d2f")[0] + " diffusion"
        if base not in table:
            continue
        verdicts[label] = {}
        for n in STUDY_STEPS:
            d2f_grid, diff_grid = best_grid(table[label], n), best_grid(table[base], n)
            d2f_fids, diff_fids = table[label][f"{d2f_grid}/{n}"]["fid"], table[base][f"{diff_grid}/{n}"]["fid"]
            verdicts[label][str(n)] = {
                "verdict": _verdict(d2f_fids, diff_fids),
                "d2f": {"grid": d2f_grid, "fid": d2f_fids},
                "diffusion": {"grid": diff_grid, "fid": diff_fids},
            }
    if plot_png is not None:
        series = {}
        labels = ("lora8 d2f t=logit-normal", "lora8 d2f t=uniform", "lora8 diffusion", "full d2f t=logit-normal")
        for label in (*labels, "full diffusion"):
            for grid in ("uniform", "ddim") if label in table else ():
                series[f"{label}, {grid}"] = (
                    list(STUDY_STEPS),
                    [fmean(table[label][f"{grid}/{n}"]["fid"]) for n in STUDY_STEPS],
                )
        save_line_plot(series, plot_png, "Study: FID (log) vs sampling steps, mean of seeds", "steps", log_y=True)
    return {
        "task": "the 16x16 MNIST teacher finetuned to 24x24 digits (E2's task)",
        "max_steps": max_steps,
        "num_samples": num_samples,
        "seeds": list(seeds),
        "zsnr_teacher_steps": zsnr_steps,
        "lr_selection": {
            "fid_at_10_steps_natural_grid": {
                CAPACITY[rank]: {
                    objective: {f"{lr:g}": _jsonable(fid) for lr, fid in sorted(lr_fids[objective, rank].items())}
                    for objective in objectives
                }
                for rank, objectives in LR_SEARCH.items()
            },
            "best": {
                CAPACITY[rank]: {objective: best_lr[objective, rank] for objective in objectives}
                for rank, objectives in LR_SEARCH.items()
            },
            "best_at_ladder_end": sorted(
                f"{CAPACITY[rank]} {objective}"
                for (objective, rank), lr in best_lr.items()
                if lr in (LR_LADDER[0], LR_LADDER[-1])
            ),
        },
        "groups": table,
        "devices": {
            label: sorted({str(s.results[c.name].get("device")) for c in group}) for label, group in groups.items()
        },
        "verdicts_vs_diffusion": verdicts,
        "not_run": not_run,
        "diverged": diverged,
        "verdict_rule": "win/lose: the seeds' FID ranges do not overlap (each side on its best grid); else tie",
        "reference": "FID in the evaluation classifier's features against the 5000 real digits at 24px",
        "draws": DRAWS,
        "seconds": round(time.perf_counter() - started, 1),
    }


def _jsonable(fid: float) -> float | str:
    return "diverged" if math.isinf(fid) else fid


def write_study(
    out: str, runs: str, max_steps: int, num_samples: int, seeds: tuple[int, ...], workers: int, report_only: bool
) -> str:
    """``d2f study``: run :func:`study` with its runs in ``runs`` and write ``study.json``, its tables
    ``study.md`` and the plot ``study_steps.png`` to ``out``; returns the tables."""
    for name, value in (("max_steps", max_steps), ("num_samples", num_samples), ("workers", workers)):
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')}={value} is not allowed: >= 1")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    report = study(
        runs,
        max_steps,
        num_samples,
        seeds,
        plot_png=folder / "study_steps.png",
        workers=workers,
        report_only=report_only,
    )
    tables = markdown(report)
    write_json(folder / "study.json", report)
    write_atomic(folder / "study.md", tables)
    return tables
