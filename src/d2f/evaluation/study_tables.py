"""The settings study's report as Markdown tables (``study.md``), so the results text quotes numbers it did
not retype; and ``best_grid``, which the study's verdicts and these tables share."""

from __future__ import annotations

from statistics import fmean

GRID_LETTER = {"uniform": "u", "ddim": "d", "shift": "s"}


def best_grid(group: dict, n: int, grids=tuple(GRID_LETTER)) -> str:
    """The grid among ``grids`` with the lowest mean FID over seeds at ``n`` steps, in a report's group table."""
    return min((g for g in grids if f"{g}/{n}" in group), key=lambda g: fmean(group[f"{g}/{n}"]["fid"]))


def _fid(x: float | str) -> str:
    return x if isinstance(x, str) else f"{x:.3g}"


def _seeds(fids: list[float]) -> str:
    return " / ".join(_fid(x) for x in fids)


def lr_table(report: dict) -> str:
    """FID at 10 steps on the natural grid per lr tried (seed 0); the picked lr in bold."""
    lr = report["lr_selection"]
    scores = lr["fid_at_10_steps_natural_grid"]
    columns = sorted({float(x) for by_objective in scores.values() for fids in by_objective.values() for x in fids})
    lines = ["| capacity, objective | " + " | ".join(f"{x:g}" for x in columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for capacity, by_objective in scores.items():
        for objective, fids in by_objective.items():
            cells = []
            for x in columns:
                fid = fids.get(f"{x:g}")
                text = "" if fid is None else _fid(fid)
                cells.append(f"**{text}**" if x == lr["best"][capacity][objective] else text)
            lines.append(f"| {capacity} {objective} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def group_table(report: dict) -> str:
    """FID per seed of every group on its best grid at each step count (grid letter in brackets); diffusion
    groups also on their own DDIM grid."""
    groups = report["groups"]
    steps = sorted({int(key.split("/")[1]) for group in groups.values() for key in group})
    grids = sorted({key.split("/")[0] for group in groups.values() for key in group}, key=list(GRID_LETTER).index)
    lines = ["| group | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, group in groups.items():
        rows = [(label, grids)] + ([(f"{label}, its own DDIM", ["ddim"])] if label.endswith("diffusion") else [])
        for name, allowed in rows:
            cells = []
            for n in steps:
                grid = best_grid(group, n, allowed)
                cells.append(f"{_seeds(group[f'{grid}/{n}']['fid'])} ({GRID_LETTER[grid]})")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict_table(report: dict) -> str:
    """d2f against diffusion finetuning at the same capacity and teacher, each on its best grid."""
    verdicts = report["verdicts_vs_diffusion"]
    steps = sorted({int(n) for by_steps in verdicts.values() for n in by_steps})
    lines = ["| d2f group | " + " | ".join(f"{n} steps" for n in steps) + " |", "|---|" + "---|" * len(steps)]
    for label, by_steps in verdicts.items():
        lines.append(f"| {label} | " + " | ".join(by_steps[str(n)]["verdict"] for n in steps) + " |")
    return "\n".join(lines)


def markdown(report: dict) -> str:
    seeds = ", ".join(str(s) for s in report["seeds"])
    parts = [
        "# Settings study",
        f"{report['task']}; {report['max_steps']} steps, {report['num_samples']} samples, seeds {seeds}.",
        "## lr search (FID at 10 steps, natural grid, seed 0)",
        lr_table(report),
        "## FID per seed, best grid (u uniform, d DDIM, s shift)",
        group_table(report),
        f"## Verdicts ({report['verdict_rule']})",
        verdict_table(report),
    ]
    if report["not_run"] or report["diverged"]:
        parts.append(f"Not run: {report['not_run']}; diverged: {report['diverged']}")
    return "\n\n".join(parts) + "\n"
