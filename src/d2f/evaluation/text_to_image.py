"""E6, the paper's text-to-image experiments through the Stable Diffusion path, on the shipped miniature.

Every image is drawn the way a user draws it: ``StableDiffusionPipeline`` from the base folder,
``load_lora_weights`` for a LoRA export (a full export's ``unet/`` in place of the base's), a scheduler set on the
pipeline, guidance 3, one image per :func:`~d2f.evaluation.prompts.evaluation_prompts` prompt, scored by
:func:`~d2f.evaluation.prompts.prompt_following`. The runs are what ``d2f encode`` and ``d2f train`` run:

1. **Zero-shot.** The base pipeline at its own 64 px: ``D2FScheduler`` (FM Euler on the DDIM grid) against
   ``DDIMScheduler``, same noise, 25 steps: the same images up to float rounding.
2. **A new resolution.** The captioned digits written at 128 px (16x16 latents, a size the miniature never saw),
   encoded once by the pipeline, then finetuned with LoRA (rank 8) under the d2f, diffusion and naive FM
   objectives on three seeds, and in full for d2f and diffusion on one seed. The first seed's runs are scored at
   4, 10 and 25 network calls, the others at 4 and 10 (for the spread), with ``D2FScheduler(solver="auto")``
   and with DDIM: diffusers' ``DDIMScheduler`` for the base and the diffusion runs (epsilon UNets), and for the
   flow runs DDIM's grid under FM Euler, which is DDIM's update for a velocity network (docs/conventions.md).
   The base pipeline unfinetuned at 128 px is the zero-shot row.
   "Calls" are denoising steps: each is one batched UNet forward of the prompt and the empty prompt.
3. **Reflow** is :func:`reflow` below: pairs from the base pipeline, a reflow LoRA, 1 and 2 calls against the
   base's diffusers schedulers at 1 to 4.

Cells run in ``workers`` processes (one thread each on this 2-core CPU) and each keeps its scores in its run
folder, so a stopped experiment resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._files import write_json, write_safetensors
from ..networks.miniature import base_pipeline
from .cache import cached, trained_before
from .prompts import evaluation_prompts, pipeline_images, prompt_following, real_features, sample_prompts

E6_SIZE = 128
E6_CALLS = (4, 10, 25)
SPREAD_CALLS = (4, 10)
E6_GUIDANCE = 3.0
E6_OBJECTIVES = ("d2f", "diffusion", "fm")
E6_FULL = ("d2f", "diffusion")
SHOWN_CALLS = 10  # the figure's samples: every method at 10 calls of its auto sampler


SHOWN = "e6_shown.safetensors"  # a run's row of the figure


def save_shown(images: torch.Tensor, folder: Path) -> None:
    write_safetensors(folder / SHOWN, {"images": images.contiguous()})


def load_shown(folder: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    return load_file(str(folder / SHOWN))["images"]


@dataclass(frozen=True)
class Cell:
    """One finetuning run: ``kind`` lora | full, its objective and seed."""

    kind: str
    objective: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.objective}-s{self.seed}"


def cells(seeds: tuple[int, ...], full_seeds: tuple[int, ...]) -> list[Cell]:
    """The first seed's runs first, LoRA then full, then the other seeds' LoRA runs."""
    first = [Cell("lora", o, seeds[0]) for o in E6_OBJECTIVES] + [
        Cell("full", o, s) for s in full_seeds for o in E6_FULL
    ]
    return first + [Cell("lora", o, s) for s in seeds[1:] for o in E6_OBJECTIVES]


def encoded_digits(work: Path, size: int = E6_SIZE) -> Path:
    """Steps a user takes before training: the captioned digits written at ``size`` px, encoded by the miniature
    (``d2f encode miniature FOLDER --resolution size``) once for every run."""
    from ..data.digit_captions import write_digit_folder
    from ..data.encode import encode
    from ..networks.miniature import pipeline_path

    latents = work / f"latents-{size}.safetensors"
    if not latents.is_file():
        folder = work / f"captioned-digits-{size}"
        if not folder.is_dir():
            write_digit_folder(folder, size)
        encode(pipeline_path(), folder, size, latents, progress=False)
    return latents


def scheduler_for(pipe, sampler: str, flow_finetuned: bool):
    """``sampler`` auto: d2f's table; ddim: diffusers' DDIMScheduler for an epsilon UNet, DDIM's grid under FM
    Euler for a flow-finetuned one (the same update, read as a velocity)."""
    from diffusers import DDIMScheduler

    from ..networks.miniature import pipeline_path
    from ..scheduler import D2FScheduler

    if sampler == "ddim" and not flow_finetuned:
        return DDIMScheduler.from_pretrained(pipeline_path(), subfolder="scheduler")
    solver = "auto" if sampler == "auto" else "euler"
    return D2FScheduler.from_config({**pipe.scheduler.config, "flow_finetuned": flow_finetuned}, solver=solver)


def pipeline_draw(pipe, flow_finetuned: bool):
    """Draws from ``pipe`` itself with the scheduler of each sampler (:func:`scheduler_for`)."""

    def draw(sampler: str, calls: int, prompts: list, seed: int) -> torch.Tensor:
        pipe.scheduler = scheduler_for(pipe, sampler, flow_finetuned)
        return pipeline_images(pipe, prompts, calls, E6_GUIDANCE, seed, E6_SIZE)

    return draw


def naive_fm_draw(pipe, field, batch: int = 40):
    """Draws from a naive-FM export, which no diffusers scheduler can sample (its network reads the raw FM time
    and the unscaled state): d2f's solvers on its UNet, with the pipeline's own text encoder and VAE and the noise
    :func:`~d2f.evaluation.prompts.pipeline_images` gets (:func:`~d2f.data.pairs.image_noise`), guided by the empty
    prompt. auto: the table's flow-finetuned row; ddim: Euler on the uniform grid, the nearest a model without a
    diffusion schedule has."""
    from ..auto_sampler import Sampler, auto_sampler
    from ..data.encode import vae_images
    from ..data.pairs import image_noise
    from ..velocity import D2FVelocity

    side = E6_SIZE // pipe.vae_scale_factor
    shape = (pipe.unet.config.in_channels, side, side)
    with torch.no_grad():
        null = pipe.encode_prompt([""], "cpu", 1, False)[0]  # one row; guidance expands it to the batch
    guided = D2FVelocity(
        field.net, field.schedule, "velocity", E6_GUIDANCE, {"encoder_hidden_states": null}, align_input=False
    )

    @torch.no_grad()
    def draw(sampler: str, calls: int, prompts: list, seed: int) -> torch.Tensor:
        chosen = auto_sampler(calls, True) if sampler == "auto" else Sampler("euler", "uniform", calls)
        ts = guided.grid(chosen.grid, chosen.steps)
        chunks = []
        for start in range(0, len(prompts), batch):
            texts = [p.text for p in prompts[start : start + batch]]
            cond = pipe.encode_prompt(texts, "cpu", 1, False)[0]
            noise = image_noise(seed + start, len(texts), shape)
            x = guided.sample(noise, ts, chosen.solver, encoder_hidden_states=cond)
            chunks.append(vae_images(pipe.vae, x).float())
        return torch.cat(chunks)

    return draw


def score(draw, calls: tuple[int, ...], seed: int, reference) -> dict[str, Any]:
    """Prompt following of ``draw``'s images at each sampler and number of calls, and the figure's row."""
    prompts = evaluation_prompts()
    scores: dict[str, Any] = {}
    for sampler in ("auto", "ddim"):
        scores[sampler] = {}
        for n in calls:
            started = time.perf_counter()
            images = draw(sampler, n, prompts, seed)
            scores[sampler][str(n)] = {
                **prompt_following(images, prompts, reference=reference),
                "seconds": round(time.perf_counter() - started, 1),
            }
    return {"scores": scores, "shown": draw("auto", SHOWN_CALLS, sample_prompts(), seed)}


def scored(out: Path, settings: dict[str, Any], draw, calls: tuple[int, ...], seed: int, **fields) -> dict[str, Any]:
    """:func:`score` of ``draw``, its figure row saved and the report (with ``settings`` and ``fields``) cached in
    ``out``."""
    from .classifier import load_classifier

    started = time.perf_counter()
    result = score(draw, calls, seed, real_features(load_classifier(), E6_SIZE))
    out.mkdir(parents=True, exist_ok=True)
    save_shown(result.pop("shown"), out)
    report = {**result, "settings": settings, **fields, "score_seconds": round(time.perf_counter() - started, 1)}
    write_json(out / "e6.json", report)
    return report


def run_cell(work: Path, latents: Path, cell: Cell, max_steps: int, calls: tuple[int, ...]) -> dict[str, Any]:
    """Train ``cell`` (``d2f train --pretrained miniature --data LATENTS --resolution 128 ...``) and score its
    export through the pipeline; cached in its run folder as ``e6.json`` and ``e6_shown.safetensors``."""
    from ..networks.sampling import export_pipeline
    from ..training.config import TrainConfig
    from ..training.loop import train

    out = work / cell.name
    settings = {"max_steps": max_steps, "calls": list(calls)}
    if (result := cached(out / "e6.json", settings)) is not None:
        return result
    config = TrainConfig(
        out=str(out),
        data=str(latents),
        objective=cell.objective,
        lora_rank=8 if cell.kind == "lora" else 0,
        max_steps=max_steps,
        seed=cell.seed,
        checkpoint_every=0,
        num_samples=10,
    )
    if not trained_before(out, config):
        train(config, progress=False)
    metrics = json.loads((out / "metrics.json").read_text())
    if cell.objective == "fm":
        from ..networks.export import load

        flow = True
        draw = naive_fm_draw(base_pipeline(), load(out / "export"))
    else:
        pipe = export_pipeline(out / "export", device="cpu")
        flow = bool(pipe.scheduler.config.flow_finetuned)
        draw = pipeline_draw(pipe, flow)
    return scored(
        out,
        settings,
        draw,
        calls,
        cell.seed,
        cell=cell.name,
        flow_finetuned=flow,
        final_loss=metrics["final_loss"],
        seconds_per_step=metrics["seconds_per_step"],
        train_seconds=metrics["seconds_total"],
    )


def base_cell(work: Path, calls: tuple[int, ...], seed: int = 0) -> dict[str, Any]:
    """The miniature unfinetuned at 128 px (zero-shot at the new resolution), scored like a run."""
    out = work / "base"
    settings = {"calls": list(calls), "seed": seed}
    if (result := cached(out / "e6.json", settings)) is not None:
        return result
    return scored(out, settings, pipeline_draw(base_pipeline(), False), calls, seed, cell="base", flow_finetuned=False)


def zero_shot_equality(seed: int = 0, steps: int = 25) -> dict[str, Any]:
    """Step 1: the base pipeline at 64 px with ``D2FScheduler`` (its defaults) and with its own ``DDIMScheduler``."""
    from ..scheduler import D2FScheduler

    pipe = base_pipeline()
    prompts = evaluation_prompts()
    ddim = pipeline_images(pipe, prompts, steps, E6_GUIDANCE, seed)
    pipe.scheduler = D2FScheduler.from_config(pipe.scheduler.config)
    d2f = pipeline_images(pipe, prompts, steps, E6_GUIDANCE, seed)
    return {
        "steps": steps,
        "size": 64,
        "max_abs_image_diff": float((ddim - d2f).abs().max()),
        "ddim": prompt_following(ddim, prompts),
        "d2f_scheduler": prompt_following(d2f, prompts),
    }


def _start_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(job: tuple) -> dict[str, Any]:
    return run_cell(*job)


def text_to_image(
    out: str | os.PathLike = "runs/e6",
    seeds: tuple[int, ...] = (0, 1, 2),
    full_seeds: tuple[int, ...] = (0,),
    max_steps: int = 400,
    calls: tuple[int, ...] = E6_CALLS,
    spread_calls: tuple[int, ...] = SPREAD_CALLS,
    workers: int = 2,
) -> dict[str, Any]:
    """Steps 1 and 2 of E6. Returns the report (``cells``: each run's scores). The first seed's runs and the base
    are scored at ``calls``, the other seeds' at ``spread_calls`` (the seed spread at 25 calls would cost as much
    CPU time again as all the training)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from ..training.config import TrainConfig

    started = time.perf_counter()
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    latents = encoded_digits(work)
    jobs = [
        (work, latents, cell, max_steps, calls if cell.seed == seeds[0] else spread_calls)
        for cell in cells(seeds, full_seeds)
    ]
    threads = max(1, (os.cpu_count() or 1) // workers)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, context, _start_worker, (threads,)) as pool:
        futures = [pool.submit(_run, job) for job in jobs]
        base = base_cell(work, calls, seeds[0])
        runs = [f.result() for f in futures]
    return {
        "zero_shot": zero_shot_equality(seeds[0]),
        "base": base,
        "cells": runs,
        "settings": {
            "size": E6_SIZE,
            "guidance": E6_GUIDANCE,
            "max_steps": max_steps,
            "batch_size": TrainConfig.batch_size,
            "seeds": list(seeds),
            "full_seeds": list(full_seeds),
            "prompts": len(evaluation_prompts()),
        },
        "seconds": round(time.perf_counter() - started, 1),
    }


E6_REFLOW_CALLS = (1, 2)
BASE_CALLS = (1, 2, 3, 4)
REFLOW_SIZE = 64  # the miniature's own size: reflow straightens the base's map, not a new resolution's
REFLOW_SCORING_SEED = 10**6  # far above any pair's noise seed (pipeline_pairs seeds pair i with seed + 1 + i)


def _scores_at(pipe, calls: int, guidance: float, seed: int, reference) -> dict[str, Any]:
    prompts = evaluation_prompts()
    started = time.perf_counter()
    images = pipeline_images(pipe, prompts, calls, guidance, seed, REFLOW_SIZE)
    return {
        **prompt_following(images, prompts, reference=reference),
        "seconds": round(time.perf_counter() - started, 1),
    }


def base_few_step(seed: int, reference) -> dict[str, Any]:
    """The base pipeline at 1 to 4 calls, guidance 3: each of E5's diffusers schedulers at each of its spacings
    (a call count a scheduler cannot reach exactly is left out), and d2f's ``D2FScheduler(solver="auto")``."""
    import diffusers

    from ..scheduler import D2FScheduler
    from .few_step import DIFFUSERS, steps_for

    pipe = base_pipeline()
    own = dict(pipe.scheduler.config)
    rows: dict[str, dict[str, Any]] = {}
    for name, (class_name, spacings) in DIFFUSERS.items():
        for settings in spacings:
            spacing = "karras" if settings.get("use_karras_sigmas") else settings.get("timestep_spacing", "own")
            label = f"{name} {spacing}"
            scheduler = getattr(diffusers, class_name).from_config({**own, **settings})

            def calls_of(n: int, scheduler=scheduler) -> int:
                scheduler.set_timesteps(n)
                return len(scheduler.timesteps)

            rows[label] = {}
            for nfe in BASE_CALLS:
                steps = steps_for(nfe, calls_of)
                if steps is not None:
                    pipe.scheduler = scheduler
                    rows[label][str(nfe)] = _scores_at(pipe, steps, E6_GUIDANCE, seed, reference)
    pipe.scheduler = D2FScheduler.from_config(own, solver="auto")
    rows["d2f auto (zero-shot)"] = {str(n): _scores_at(pipe, n, E6_GUIDANCE, seed, reference) for n in BASE_CALLS}
    return rows


def reflow(
    out: str | os.PathLike = "runs/e6-reflow",
    num_pairs: int = 2000,
    pair_steps: int = 25,
    max_steps: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Step 3 of E6: ``d2f pairs --model miniature --prompts FOLDER`` (the captioned digits' captions, the
    pipeline's DDIM at ``pair_steps`` steps, guidance 3, at 64 px), then ``d2f train --pretrained miniature
    --pairs PAIRS --resolution 64`` (Diff2Flow, LoRA rank 8), the student sampled unguided through the pipeline
    with ``load_lora_weights`` and ``D2FScheduler`` at 1 and 2 calls, against :func:`base_few_step`."""
    from ..data.captions import find_captions
    from ..data.digit_captions import write_digit_folder
    from ..data.pairs import pipeline_pairs
    from ..networks.miniature import pipeline_path
    from ..networks.sampling import export_pipeline
    from ..training.config import TrainConfig
    from ..training.loop import train
    from .classifier import load_classifier

    started = time.perf_counter()
    work = Path(out)
    settings = {"num_pairs": num_pairs, "pair_steps": pair_steps, "max_steps": max_steps, "seed": seed}
    if (result := cached(work / "e6.json", settings)) is not None:
        return result
    work.mkdir(parents=True, exist_ok=True)
    reference = real_features(load_classifier(), REFLOW_SIZE)
    pairs = work / "pairs.safetensors"
    made = {"num_pairs": num_pairs, "steps": pair_steps, "seed": seed}
    if cached(work / "pairs.json", made) is None:
        folder = work / f"captioned-digits-{REFLOW_SIZE}"
        if not folder.is_dir():
            write_digit_folder(folder, REFLOW_SIZE)
        captions = find_captions(folder).captions
        meta = pipeline_pairs(pipeline_path(), captions, pairs, num_pairs, pair_steps, E6_GUIDANCE, seed=seed)
        write_json(work / "pairs.json", {**meta, "settings": made})
    pair_meta = json.loads((work / "pairs.json").read_text())
    run = work / "reflow"
    config = TrainConfig(
        out=str(run),
        pairs=str(pairs),
        resolution=REFLOW_SIZE,
        max_steps=max_steps,
        seed=seed,
        checkpoint_every=0,
        num_samples=10,
        sample_steps=E6_REFLOW_CALLS[0],
        cond_dropout=0.0,
    )
    if not trained_before(run, config):
        train(config, progress=False)
    metrics = json.loads((run / "metrics.json").read_text())
    pipe = export_pipeline(run / "export", device="cpu")
    # the pairs' noises are seeds seed + 1 ... seed + num_pairs: the scores are drawn from noise the student never saw
    scoring = REFLOW_SCORING_SEED + seed
    student = {str(n): _scores_at(pipe, n, 1.0, scoring, reference) for n in E6_REFLOW_CALLS}
    shown = pipeline_images(pipe, sample_prompts(), E6_REFLOW_CALLS[0], 1.0, scoring, REFLOW_SIZE)
    save_shown(shown, work)
    report = {
        "settings": settings,
        "scoring_seed": scoring,
        "pairs": pair_meta,
        "train": {k: metrics[k] for k in ("final_loss", "seconds_per_step", "seconds_total")},
        "reflow_auto": student,
        "base": base_few_step(scoring, reference),
        "size": REFLOW_SIZE,
        "guidance": {"base": E6_GUIDANCE, "reflow": 1.0},
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_json(work / "e6.json", report)
    return report


SUMMARY_SCORES = ("digit_accuracy", "thickness_accuracy", "slant_accuracy", "fid")


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per method (``lora-d2f``, ...), sampler and number of calls: each score's mean over the seeds, with the
    seeds' standard deviation (0 for one seed) and the number of seeds."""
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(run["cell"].rsplit("-s", 1)[0], []).append(run["scores"])
    summary: dict[str, Any] = {}
    for method, seeds in grouped.items():
        summary[method] = {}
        for sampler, by_calls in seeds[0].items():
            summary[method][sampler] = {}
            for n in by_calls:
                scored = [s[sampler][n] for s in seeds if n in s[sampler]]
                entry: dict[str, Any] = {"seeds": len(scored)}
                for key in SUMMARY_SCORES:
                    values = torch.tensor([s[key] for s in scored], dtype=torch.float64)
                    entry[key] = float(values.mean())
                    entry[f"{key}_std"] = float(values.std()) if len(scored) > 1 else 0.0
                summary[method][sampler][n] = entry
    return summary


def best_base(rows: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """At each number of calls, the base's diffusers scheduler with the highest digit accuracy (FID breaks ties)."""
    best = {}
    for n in map(str, BASE_CALLS):
        found = [(label, r[n]) for label, r in rows.items() if n in r and not label.startswith("d2f")]
        if found:
            label, scores = max(found, key=lambda item: (item[1]["digit_accuracy"], -item[1]["fid"]))
            best[n] = {"scheduler": label, **scores}
    return best


def save_figure(work: Path, reflow_work: Path, rows: list[str], path: Path) -> None:
    """Rows are ``rows`` (cells of :func:`text_to_image`, ``base`` included) then the reflow student at one call
    (64 px, shown at twice its size), columns the ten :func:`sample_prompts` prompts."""
    from ..figures import save_grid

    shown = [load_shown(work / row) for row in rows]
    student = load_shown(reflow_work)
    shown.append(torch.nn.functional.interpolate(student, scale_factor=E6_SIZE // REFLOW_SIZE, mode="nearest"))
    save_grid(torch.cat(shown), path, len(sample_prompts()), upscale=1)


def e6(
    out: str | os.PathLike = "runs/e6",
    max_steps: int = 400,
    num_pairs: int = 2000,
    reflow_steps: int = 1000,
    seed: int = 0,
    figure_png: Path | None = None,
) -> dict[str, Any]:
    """E6 whole: :func:`text_to_image` (seeds ``seed`` to ``seed + 2``, full finetuning on ``seed``) and
    :func:`reflow`, their summary, and the figure (rows: base, each method's first seed, the reflow student)."""
    started = time.perf_counter()
    seeds = (seed, seed + 1, seed + 2)
    report = text_to_image(out, seeds, (seed,), max_steps)
    report["summary"] = summarize(report["cells"])
    report["reflow"] = reflow(f"{out}-reflow", num_pairs, max_steps=reflow_steps, seed=seed)
    report["reflow"]["best_base"] = best_base(report["reflow"]["base"])
    rows = ["base", *(c.name for c in cells((seed,), (seed,)))]
    if figure_png is not None:
        save_figure(Path(out), Path(f"{out}-reflow"), rows, figure_png)
    report["figure_rows"] = [*rows, "reflow (64 px, 1 call, unguided)"]
    report["seconds_total"] = round(time.perf_counter() - started, 1)
    return report
