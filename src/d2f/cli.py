"""The ``d2f`` command: ``d2f train``, ``d2f sample``, ``d2f eval``, ``d2f pairs``, ``d2f reproduce``,
``d2f study``, ``d2f teacher``, ``d2f classifier``.

``python -m d2f`` is the same command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .time_samplers import T_SAMPLERS


def _train_parser(sub) -> None:
    from .training.config import (
        DEFAULT_LR_FULL,
        DEFAULT_LR_LORA,
        MIXED_PRECISION,
        OBJECTIVES,
        ON_NONFINITE,
        TrainConfig,
    )

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="finetune a diffusion UNet into a flow model (no arguments: the embedded MNIST demo)",
        description="Finetune a diffusers UNet with Diff2Flow (or naive FM / diffusion). With no arguments: "
        "convert the embedded MNIST teacher, show zero-shot FM samples, and LoRA-finetune it to 24x24 digits.",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/<objective>-<data>)")
    p.add_argument(
        "--pretrained", default=defaults.pretrained, help="'teacher', a d2f export or a diffusers UNet folder"
    )
    p.add_argument("--data", default=defaults.data, help="mnist | digits | image folder | latents .safetensors/.npy")
    p.add_argument(
        "--pairs", default=None, help="reflow: train on a `d2f pairs` file (noise -> sample) instead of --data"
    )
    p.add_argument("--resolution", type=int, default=defaults.resolution)
    p.add_argument("--classes", type=int, nargs="+", default=None, help="keep only these labels (mnist, digits)")
    p.add_argument("--objective", choices=OBJECTIVES, default=defaults.objective)
    p.add_argument("--t-sampler", choices=T_SAMPLERS, default=None, help="default: logit-normal (d2f, fm)")
    p.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="0 = full finetuning")
    p.add_argument(
        "--no-full-convs",
        dest="lora_full_convs",
        action="store_false",
        help="with LoRA, keep conv_in and conv_out frozen too",
    )
    p.add_argument("--max-steps", type=int, default=defaults.max_steps)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="per process")
    p.add_argument("--grad-accum", type=int, default=defaults.grad_accum)
    p.add_argument(
        "--lr",
        type=float,
        default=defaults.lr,
        help=f"default: {DEFAULT_LR_LORA:g} with LoRA, {DEFAULT_LR_FULL:g} for full finetuning (the settings study)",
    )
    p.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument("--grad-clip", type=float, default=defaults.grad_clip, help="0 = off")
    p.add_argument("--ema-decay", type=float, default=defaults.ema_decay)
    p.add_argument("--cond-dropout", type=float, default=defaults.cond_dropout)
    p.add_argument(
        "--zero-terminal-snr",
        action="store_true",
        help="rescale the pretrained schedule to zero terminal SNR (Lin et al.) and train on it; v_prediction only",
    )
    p.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=defaults.mixed_precision)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument(
        "--on-nonfinite",
        choices=ON_NONFINITE,
        default=defaults.on_nonfinite,
        help="a NaN/inf loss stops the run (naming the step, batch and last checkpoint), or skips that step",
    )
    p.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every, help="0 = never")
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in --out, or from the given checkpoint folder",
    )
    p.add_argument("--sample-steps", type=int, default=defaults.sample_steps)
    p.add_argument("--num-samples", type=int, default=defaults.num_samples)
    p.add_argument("--guidance", type=float, default=defaults.guidance)
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _sampling_arguments(p: argparse.ArgumentParser, num_samples: int) -> None:
    """The flags ``d2f sample`` and ``d2f eval`` share (see d2f.training.sampling.sample_export)."""
    from .solvers import SOLVERS
    from .training.sampling import SAMPLE_GRIDS

    p.add_argument("--model", default="teacher", help="a d2f export folder, or 'teacher'")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument(
        "--grid", choices=SAMPLE_GRIDS, default="uniform", help="uniform in t (default), ddim (DDIM's own), shift"
    )
    p.add_argument("--shift", type=float, default=3.0, help="with --grid shift")
    p.add_argument("--guidance", type=float, default=1.0)
    p.add_argument("--num-samples", type=int, default=num_samples)
    p.add_argument("--seed", type=int, default=0)


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample a d2f export into a PNG grid")
    _sampling_arguments(p, num_samples=40)
    p.add_argument("--lora", default=None, help="a LoRA export folder to apply to --model")
    p.add_argument("--resolution", type=int, default=None, help="default: the export's training resolution")
    p.add_argument("--out", default="grid.png")


def _pairs_parser(sub) -> None:
    p = sub.add_parser(
        "pairs",
        help="sample noise -> image pairs from an export, for reflow (d2f train --pairs)",
        description="Sample an export with many ODE steps and store each image with the noise it came from.",
    )
    _sampling_arguments(p, num_samples=5000)
    p.set_defaults(steps=50, grid="uniform")
    p.add_argument("--out", required=True, help="the pairs file to write (.safetensors)")


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="FID, precision/recall and class accuracy of an export's samples")
    _sampling_arguments(p, num_samples=1000)
    p.add_argument("--out", default=None, help="also write the report to this JSON file")


def _reproduce_parser(sub) -> None:
    from .evaluation.reproduce import EXPERIMENTS

    p = sub.add_parser(
        "reproduce",
        help="the paper's experiments in miniature: E1 zero-shot, E2 finetuning, E3 reflow, E4 terminal SNR",
    )
    p.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="all")
    p.add_argument(
        "--num-samples", type=int, default=None, help="default: 1000 for e1, e3, e4; 300 per checkpoint for e2"
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply sample counts and training steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="results", help="folder for the JSON results and figures")


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="when does Diff2Flow beat diffusion finetuning? lr, t-sampler, grid, steps, rank, zero SNR",
        description="The settings study on E2's task (see d2f.evaluation.study); resumable: finished runs in "
        "--runs are read back. Writes study.json, study.md (its tables) and study_steps.png to --out.",
    )
    p.add_argument("--max-steps", type=int, default=400, help="finetuning steps of every run")
    p.add_argument("--num-samples", type=int, default=300, help="samples per FID")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--runs", default="runs/study", help="folder for the training runs")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, in separate processes")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: report the groups whose runs are finished"
    )
    p.add_argument("--out", default="results", help="folder for study.json and the plot")


def _teacher_parser(sub) -> None:
    p = sub.add_parser("teacher", help="retrain the embedded MNIST teacher from scratch")
    p.add_argument("--out", default="runs/teacher")
    p.add_argument("--max-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2f", description="Diffusion models as flow-matching models (Diff2Flow).")
    sub = parser.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _sample_parser(sub)
    _eval_parser(sub)
    _pairs_parser(sub)
    _reproduce_parser(sub)
    _study_parser(sub)
    _teacher_parser(sub)
    sub.add_parser("classifier", help="retrain the evaluation classifier (d2f/assets/mnist_classifier.*)")
    return parser


def run_train(args: argparse.Namespace) -> dict:
    from .training.config import TrainConfig
    from .training.loop import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["classes"] = tuple(args.classes) if args.classes else None
    values["out"] = args.out or f"runs/{args.objective}-{Path(args.data).name}"
    return train(TrainConfig(**values), resume=args.resume, progress=args.progress)


def teacher_config(out: str, max_steps: int, seed: int):
    """The embedded teacher's recipe: v-prediction diffusion on 16x16 MNIST with SD's schedule."""
    from .training.config import TrainConfig

    return TrainConfig(
        out=out,
        init="teacher-config",
        prediction_type="v_prediction",
        objective="diffusion",
        resolution=16,
        lora_rank=0,
        max_steps=max_steps,
        batch_size=64,
        lr=2e-3,
        warmup_steps=100,
        ema_decay=0.999,
        cond_dropout=0.1,
        checkpoint_every=500,
        seed=seed,
        guidance=1.0,
    )


def run_sample(args: argparse.Namespace) -> None:
    from .training.export import read_export
    from .training.images import save_grid
    from .training.sampling import sample_export

    model = args.lora or args.model
    if args.lora:
        base = read_export(Path(args.lora)).meta["base"]
        if base != args.model and base != str(Path(args.model).resolve()):
            raise ValueError(f"--lora {args.lora} was trained on base {base!r}, not --model {args.model!r}")
    images, _, _, _ = sample_export(
        model,
        args.steps,
        args.solver,
        args.grid,
        args.shift,
        args.guidance,
        args.num_samples,
        args.resolution,
        args.seed,
        progress=True,
    )
    save_grid(images, Path(args.out))
    print(f"wrote {args.out}")


def run_eval(args: argparse.Namespace) -> None:
    from .evaluation.evaluate import evaluate

    report = evaluate(
        args.model, args.steps, args.solver, args.grid, args.num_samples, args.seed, args.guidance, args.shift
    )
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            metrics = run_train(args)
            print(json.dumps(metrics, indent=1))
        elif args.command == "sample":
            run_sample(args)
        elif args.command == "eval":
            run_eval(args)
        elif args.command == "pairs":
            from .training.pairs import generate_pairs

            meta = generate_pairs(
                args.model,
                args.out,
                args.num_samples,
                args.steps,
                args.solver,
                args.grid,
                args.shift,
                args.guidance,
                args.seed,
                progress=True,
            )
            print(json.dumps({"out": args.out, "num_pairs": args.num_samples, **meta}, indent=1))
        elif args.command == "reproduce":
            from .evaluation.reproduce import reproduce

            reports = reproduce(args.experiment, args.out, args.seed, args.num_samples, args.scale)
            print(json.dumps({name: report.get("seconds") for name, report in reports.items()}, indent=1))
            print(f"wrote {', '.join(sorted(reports))} to {args.out}")
        elif args.command == "study":
            from .evaluation.study import study

            for name in ("max_steps", "num_samples", "workers"):
                if getattr(args, name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} is not allowed: >= 1")
            Path(args.out).mkdir(parents=True, exist_ok=True)
            report = study(
                args.runs,
                args.max_steps,
                args.num_samples,
                tuple(args.seeds),
                plot_png=Path(args.out) / "study_steps.png",
                workers=args.workers,
                report_only=args.report_only,
            )
            from .evaluation.study_tables import markdown

            tables = markdown(report)
            (Path(args.out) / "study.json").write_text(json.dumps(report, indent=1))
            (Path(args.out) / "study.md").write_text(tables)
            print(tables)
            print(f"wrote {Path(args.out) / 'study.json'} and study.md")
        elif args.command == "classifier":
            from .evaluation.classifier import train_classifier

            print(json.dumps(train_classifier(), indent=1))
        else:
            from .training.loop import train

            print(json.dumps(train(teacher_config(args.out, args.max_steps, args.seed)), indent=1))
    except (ValueError, ImportError, FileNotFoundError, FloatingPointError) as e:
        print(f"d2f {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0
