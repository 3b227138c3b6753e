"""``d2f reproduce``: run the experiments E1-E6 and depth, and write their JSON results and figures.

Default scale (one seed, 2-core CPU, measured): E1 5.3 min, E2 28.5 min, E3, E4 and E5 as stated in the
README; E4 at 64 and 32 px (``resolution``, 3 seeds) 44.8 and 27.7 min on one core, at 16 px on their
budget (``budget='small'``) 6.0 min; E6 about 1 h 40 min in two worker processes (docs/results.md).
``scale`` multiplies the sample counts and the training steps; the committed results are scale 1.
The training runs go to ``runs/`` (not committed), the scores and figures to ``out``.
"""

from __future__ import annotations

from pathlib import Path

from .._files import write_json
from ..figures import save_line_plot
from ..training.draws import DRAWS

EXPERIMENTS = ("e1", "e2", "e3", "e4", "e5", "depth", "e6")
FILES = {
    "e1": "zero_shot.json",
    "e2": "finetune.json",
    "e3": "reflow.json",
    "e4": "terminal_snr.json",
    "e5": "few_step.json",
    "depth": "depth.json",
    "e6": "text_to_image.json",
}


def plot_finetune(report: dict, path: Path) -> None:
    """E2: FID (mean over seeds) against finetuning steps, one line per run and sampler."""
    series = {}
    for kind in ("lora", "full"):
        for objective, entry in report[kind].items():
            for key, label in (("fid", ""), ("fid_ddim_grid", ", DDIM grid")):
                if key in entry:
                    runs = entry[key]
                    mean = [sum(r[i] for r in runs) / len(runs) for i in range(len(report["steps"]))]
                    series[f"{kind} {objective}{label}"] = (report["steps"], mean)
    save_line_plot(series, path, "E2: FID (log scale) vs finetuning steps", "finetuning step", log_y=True)


def e4_suffix(resolution: int, budget: str = "full") -> str:
    """What E4's result file and its runs folder add to their 16 px names at ``resolution`` px and ``budget``
    (``terminal_snr_64.json``, ``runs/e4-64``), so that no run overwrites another's; 32 and 64 px have one
    budget."""
    if resolution != 16:
        return f"_{resolution}"
    return "" if budget == "full" else "_16_small"


def reproduce(
    experiment: str,
    out: str = "results",
    seed: int = 0,
    num_samples: int | None = None,
    scale=1.0,
    resolution: int | None = None,
    budget: str | None = None,
):
    """Run one experiment (or ``all``) and write ``out/<name>.json`` plus its figure; returns the reports.

    ``resolution``: E4's (16, 32 or 64; unset: 16) and ``budget`` its protocol (``E4_BUDGETS``; unset:
    ``full``); the other experiments have theirs fixed."""
    from .depth import depth
    from .experiments import finetune, zero_shot
    from .few_step import e5
    from .reflow import reflow
    from .terminal_snr import e4_settings, terminal_snr
    from .text_to_image import e6

    if experiment != "all" and experiment not in EXPERIMENTS:
        raise ValueError(f"experiment={experiment!r} is not allowed: one of {EXPERIMENTS} or 'all'")
    for name, value in (("resolution", resolution), ("budget", budget)):
        if value is not None and experiment != "e4":
            raise ValueError(f"{name}={value!r} is for experiment 'e4' only, not {experiment!r}")
    e4_resolution = 16 if resolution is None else resolution
    e4_budget = "full" if budget is None else budget
    e4 = e4_settings(e4_resolution, e4_budget)
    e4_name = e4_suffix(e4_resolution, e4_budget)
    files = {**FILES, "e4": FILES["e4"].replace(".json", f"{e4_name}.json")}
    if not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale={scale!r} is not allowed: a number > 0")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)

    def n(default: int) -> int:
        return num_samples or max(10, round(default * scale))

    def steps(default: int, every: int = 1) -> int:
        return max(every, round(default * scale / every) * every)

    runners = {
        "e1": lambda: zero_shot(n(1000), seed=seed, grid_png=folder / "zero_shot_samples.png"),
        "e2": lambda: finetune("runs/e2", max_steps=steps(600, 150), num_samples=n(300), seed=seed),
        "e3": lambda: reflow(
            "runs/e3", max_steps=steps(1000), num_samples=n(1000), seed=seed, grid_png=folder / "reflow_samples.png"
        ),
        "e4": lambda: terminal_snr(
            "runs/e4" + e4_name.replace("_", "-"),
            max_steps=steps(e4["max_steps"]),
            num_samples=n(e4["num_samples"]),
            seed=seed,
            plot_png=folder / files["e4"].replace(".json", ".png"),
            resolution=e4_resolution,
            budget=e4_budget,
        ),
        "e5": lambda: e5(
            "runs/e5",
            seeds=(seed, seed + 1, seed + 2),
            num_samples=n(2000),
            finetune_steps=steps(600),
            reflow_steps=steps(300),
            plot_png=folder / "few_step_fid.png",
        ),
        "depth": lambda: depth(
            "runs/depth",
            steps=steps(300),
            held_out=n(500),
            seeds=(seed, seed + 1, seed + 2),
            figure_png=folder / "depth.png",
        ),
        "e6": lambda: e6(
            "runs/e6",
            max_steps=steps(400),
            num_pairs=n(2000),
            reflow_steps=steps(1000),
            seed=seed,
            figure_png=folder / "text_to_image.png",
        ),
    }
    reports = {}
    for name in EXPERIMENTS if experiment == "all" else (experiment,):
        report = {**runners[name](), "draws": DRAWS}  # how the training runs drew noise, t and dropout
        write_json(folder / files[name], report)
        if name == "e2":
            plot_finetune(report, folder / "finetune_fid.png")
        reports[name] = report
    return reports
