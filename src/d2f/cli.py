"""The ``d2f`` command: ``d2f train``, ``d2f encode``, ``d2f sample``, ``d2f eval``, ``d2f pairs``, ``d2f reproduce``,
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
    from .networks.widen import COND_INITS
    from .training.config import (
        DEFAULT_GUIDANCE,
        DEFAULT_LR_FULL,
        DEFAULT_LR_LORA,
        MIXED_PRECISION,
        OBJECTIVES,
        ON_NONFINITE,
        REPORT_TO,
        TrainConfig,
    )

    defaults = TrainConfig()
    p = sub.add_parser(
        "train",
        help="finetune a diffusion UNet into a flow model (no arguments: the shipped miniature Stable Diffusion)",
        description="Finetune a diffusers UNet with Diff2Flow (or naive FM / diffusion). With no arguments: write the "
        "shipped digits as a captioned folder at 128 px, encode it with the shipped miniature Stable Diffusion, "
        "LoRA-finetune its UNet with Diff2Flow, and draw samples.png and the prompt-following scores through "
        "StableDiffusionPipeline + load_lora_weights + D2FScheduler. The pixel teacher's task (E1-E5): "
        "--pretrained teacher --data mnist --resolution 24 --guidance 1.",
    )

    def setting(flag: str, help: str, **options) -> None:
        """``flag`` for the ``TrainConfig`` field of its name (or ``dest``), defaulting to the field's default."""
        dest = options.setdefault("dest", flag[2:].replace("-", "_"))
        p.add_argument(flag, default=getattr(defaults, dest), help=help, **options)

    p.add_argument("--out", default=None, help="output folder; unset: runs/<objective>-<data>")
    setting("--pretrained", "'miniature', 'teacher', a d2f export, a diffusers UNet or pipeline folder")
    setting("--data", "captioned-digits | mnist | digits | image folder | latents .safetensors/.npy")
    setting("--pairs", "reflow: train on a `d2f pairs` file (noise -> sample) instead of --data")
    setting(
        "--cond-data",
        "image-to-X: each sample's condition, appended to the network input: a folder paired by name with the "
        "image folder --data, or a latents file (one per sample); a UNet that does not take it is widened",
    )
    setting(
        "--cond-init",
        "a widened conv_in's new weights: zero (the condition starts ignored) or marigold (copied, halved)",
        choices=COND_INITS,
    )
    setting(
        "--resolution",
        "train at this size in pixels (square); with a latents file from d2f encode, the size it was encoded at",
        type=int,
    )
    setting("--classes", "keep only these labels (mnist, digits)", type=int, nargs="+")
    _caption_arguments(p, defaults.caption_column)
    setting(
        "--objective",
        "d2f (Diff2Flow), fm (naive flow matching) or diffusion (the teacher's own loss)",
        choices=OBJECTIVES,
    )
    setting(
        "--t-sampler",
        "unset: logit-normal (fm; d2f on v or sample networks), diffusion-matched (d2f on epsilon ones)",
        choices=T_SAMPLERS,
    )
    setting("--lora-rank", "0 = full finetuning", type=int)
    setting(
        "--full-convs",
        "with LoRA, train conv_in and conv_out fully; unset: yes, but not for a pipeline's UNet, whose LoRA export "
        "loads with pipe.load_lora_weights (LoRA weights only)",
        dest="lora_full_convs",
        action=argparse.BooleanOptionalAction,
    )
    setting("--max-steps", "optimizer steps in all (counted across resumes)", type=int)
    setting("--batch-size", "per process", type=int)
    setting("--grad-accum", "micro-batches per optimizer step", type=int)
    setting(
        "--lr",
        f"unset: {DEFAULT_LR_LORA:g} with LoRA, {DEFAULT_LR_FULL:g} for full finetuning (the settings study)",
        type=float,
    )
    setting("--warmup-steps", "linear lr warmup, then constant", type=int)
    setting("--weight-decay", "AdamW's decoupled weight decay", type=float)
    setting("--grad-clip", "0 = off", type=float)
    setting("--ema-decay", "EMA of the trainable weights, exported and sampled", type=float)
    setting(
        "--cond-dropout",
        "probability of training a sample on the null condition (for classifier-free guidance)",
        type=float,
    )
    setting(
        "--zero-terminal-snr",
        "rescale the pretrained schedule to zero terminal SNR (Lin et al.) and train on it; v_prediction only",
        action="store_true",
    )
    setting("--mixed-precision", "autocast the forward pass; trainable weights stay float32", choices=MIXED_PRECISION)
    setting(
        "--gradient-checkpointing",
        "recompute the UNet's activations in backward: less memory for more compute, the same result",
        action="store_true",
    )
    setting("--seed", "seeds LoRA init, data order and every draw", type=int)
    setting(
        "--on-nonfinite",
        "a NaN/inf loss stops the run (naming the step, batch and last checkpoint), or skips that step",
        choices=ON_NONFINITE,
    )
    setting("--checkpoint-every", "0 = never", type=int)
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="continue from the latest checkpoint in --out, or from the given checkpoint folder",
    )
    setting("--sample-steps", "ODE steps of the final samples", type=int)
    setting("--num-samples", "images in samples.png (from a pipeline: one per --validation-prompt instead)", type=int)
    setting(
        "--guidance",
        f"classifier-free guidance of the samples; unset: {DEFAULT_GUIDANCE:g} with a null condition, else 1",
        type=float,
    )
    setting(
        "--validation-prompt",
        "repeatable: sample these prompts through the base pipeline with D2FScheduler (CFG --guidance, fixed "
        "seed) every --validation-every steps, into <out>/validation/",
        dest="validation_prompts",
        action="append",
    )
    setting("--validation-every", "steps; 0 = never", type=int)
    setting(
        "--report-to",
        "log loss, lr and validation images with accelerate's tracker, under <out>/logs",
        choices=REPORT_TO,
    )
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def _caption_arguments(p: argparse.ArgumentParser, caption_column: str) -> None:
    """How a captioned image folder is read (``d2f encode``, and ``d2f train`` on a pipeline)."""
    p.add_argument("--caption-column", default=caption_column, help="metadata.jsonl's caption key (or .txt files)")
    p.add_argument("--flip", action="store_true", help="flip images left-right at random (seeded by --seed)")


def _encode_parser(sub) -> None:
    p = sub.add_parser(
        "encode",
        help="encode a captioned image folder with a pipeline's VAE and text encoders into a latents file",
        description="Latents (VAE mean times scaling_factor), text embeddings and the null embedding (and SDXL's "
        "pooled embeddings and time ids) for d2f train --data. d2f train on a pipeline and an image folder "
        "runs this itself.",
    )
    p.add_argument("--pretrained", required=True, help="a diffusers pipeline folder (SD 1.x/2.x or SDXL)")
    p.add_argument("--data", required=True, help="an image folder with metadata.jsonl or a .txt beside each image")
    p.add_argument("--resolution", type=int, required=True, help="center crop and resize to this many pixels")
    p.add_argument("--out", required=True, help="the latents file to write (.safetensors)")
    p.add_argument(
        "--cond-data",
        default=None,
        help="image-to-X: condition images paired by name with --data's, encoded into the file's concat key",
    )
    _caption_arguments(p, "text")
    p.add_argument("--sample", action="store_true", help="draw from the VAE's latent distribution, not its mean")
    p.add_argument("--seed", type=int, default=0, help="seeds --flip and --sample")
    p.add_argument("--batch-size", type=int, default=8, help="images per VAE call")
    p.add_argument("--device", default=None, help="where the VAE and text encoders run; unset: cuda if available")


def _sampling_arguments(p: argparse.ArgumentParser, num_samples: int, sampler: dict | None = None) -> None:
    """The flags of ``d2f.networks.sampling.SamplingSettings`` that ``d2f sample``, ``eval`` and ``pairs`` share.
    ``sampler``: the solver, grid and shift an unset flag stands for; the flags then default to None, so that a
    caller can tell one that was given."""
    from .auto_sampler import AUTO
    from .grids import GRIDS
    from .solvers import SOLVERS

    def sampler_flag(name: str, value: object, help: str, **kind) -> None:
        if sampler is not None:
            value, help = None, f"{help}; unset: {sampler[name]}"
        p.add_argument(f"--{name}", default=value, help=help, **kind)

    p.add_argument("--model", default="teacher", help="a d2f export folder, or 'teacher'")
    p.add_argument(
        "--steps",
        type=int,
        default=25,
        help="network calls with --solver auto; else ODE steps (network calls: twice that for heun/midpoint)",
    )
    sampler_flag(
        "solver",
        AUTO,
        "the ODE solver; auto: E5's best for --steps network calls and this model (see d2f.auto_sampler)",
        choices=(*SOLVERS, AUTO),
    )
    sampler_flag(
        "grid",
        AUTO,
        "uniform in t, ddim (DDIM's own), shift; auto: the table's with --solver auto, else uniform",
        choices=(*GRIDS, AUTO),
    )
    sampler_flag("shift", 3.0, "with --grid shift", type=float)
    p.add_argument("--guidance", type=float, default=1.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--num-samples", type=int, default=num_samples, help="images to generate")
    p.add_argument("--seed", type=int, default=0, help="seeds the starting noise (drawn on the CPU)")
    p.add_argument("--device", default=None, help="where the network runs; unset: cuda if available")


def _sample_parser(sub) -> None:
    p = sub.add_parser("sample", help="sample a d2f export into a PNG grid")
    _sampling_arguments(p, num_samples=40)
    p.add_argument("--lora", default=None, help="a LoRA export folder to apply to --model")
    p.add_argument(
        "--cond-data",
        default=None,
        help="an export trained with conditions: one sample per condition, at most --num-samples; an image folder, "
        "or a latents file: its concat key (d2f encode --cond-data), else its latents when it holds nothing else",
    )
    p.add_argument("--resolution", type=int, default=None, help="unset: the export's training resolution")
    p.add_argument("--out", default="grid.png", help="the PNG to write")


_EXPORT_PAIRS = {"solver": "euler", "grid": "uniform", "shift": 3.0}  # d2f pairs' sampler for an export


def _pairs_parser(sub) -> None:
    p = sub.add_parser(
        "pairs",
        help="sample noise -> image pairs from an export, for reflow (d2f train --pairs)",
        description="Sample an export with many ODE steps and store each image with the noise it came from.",
    )
    _sampling_arguments(p, num_samples=5000, sampler=_EXPORT_PAIRS)
    p.set_defaults(steps=50)
    p.add_argument(
        "--prompts",
        default=None,
        help="a captioned image folder whose captions prompt --model, a Stable Diffusion pipeline (a folder, or "
        "'miniature'): pairs of latents drawn by the pipeline's own scheduler in --steps steps with --guidance (as "
        "given: the defaults 50 and 1 are an export's; the miniature's reference is --steps 25 --guidance 3); "
        "--solver, --grid and --shift are refused with it",
    )
    p.add_argument("--resolution", type=int, default=None, help="with --prompts: image size (unset: the pipeline's)")
    p.add_argument("--out", required=True, help="the pairs file to write (.safetensors)")


def _eval_parser(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="FID, precision/recall and class accuracy of an export's samples; or depth metrics (--task dense)",
    )
    _sampling_arguments(p, num_samples=1000)
    p.add_argument(
        "--task",
        choices=("mnist", "dense"),
        default="mnist",
        help="mnist: FID and the rest against the embedded digits; dense: AbsRel, RMSE and delta1 of predicted "
        "depth on held-out pairs (--data, --cond-data), after scale-and-shift alignment",
    )
    p.add_argument("--data", default=None, help="--task dense: the held-out targets (depth images, or latents)")
    p.add_argument(
        "--cond-data", default=None, help="--task dense: their conditions, paired by name (or order); unset: concat"
    )
    p.add_argument("--ensemble", type=int, default=1, help="--task dense: samples per prediction, merged (median)")
    p.add_argument("--out", default=None, help="also write the report to this JSON file")


def _reproduce_parser(sub) -> None:
    from .evaluation.reproduce import EXPERIMENTS

    p = sub.add_parser(
        "reproduce",
        help="the paper's experiments in miniature: E1 zero-shot, E2 finetuning, E3 reflow, E4 terminal SNR, "
        "E5 few-step samplers against diffusers' at equal network calls, depth: image-to-depth finetuning, E6: "
        "text-to-image through the miniature Stable Diffusion (zero-shot, 128 px finetuning, reflow)",
    )
    p.add_argument("--experiment", choices=(*EXPERIMENTS, "all"), default="all", help="which experiment to run")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="unset: 1000 for e1, e3, e4 (150 per seed at 32 and 64 px or --budget small); 300 per checkpoint "
        "for e2; 2000 per seed for e5; 500 held-out for depth; for e6, the reflow pairs (2000; its scores are on "
        "120 fixed prompts)",
    )
    p.add_argument("--scale", type=float, default=1.0, help="multiply sample counts and training steps")
    p.add_argument("--seed", type=int, default=0, help="seeds training and sampling")
    p.add_argument("--out", default="results", help="folder for the JSON results and figures")
    p.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="e4 only: 16 (default, the embedded teacher), or 32 or 64 (the teachers shipped for E4, 3 seeds)",
    )
    p.add_argument(
        "--budget",
        default=None,
        help="e4 only: full (default) runs each size's protocol; small runs the 32 and 64 px one (150 steps, "
        "batch 32, 150 samples, 3 seeds) at 16 px too, for a comparison at equal budget",
    )


def _study_parser(sub) -> None:
    p = sub.add_parser(
        "study",
        help="when does Diff2Flow beat diffusion finetuning? lr, t-sampler, grid, steps, rank, zero SNR",
        description="The settings study on E2's task (see d2f.evaluation.study); resumable: finished runs in "
        "--runs are read back. Writes study.json, study.md (its tables) and study_steps.png to --out.",
    )
    p.add_argument("--max-steps", type=int, default=400, help="finetuning steps of every run")
    p.add_argument("--num-samples", type=int, default=300, help="samples per FID")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds of every setting")
    p.add_argument("--runs", default="runs/study", help="folder for the training runs")
    p.add_argument("--workers", type=int, default=1, help="runs trained at once, in separate processes")
    p.add_argument(
        "--report-only", action="store_true", help="train nothing: report the groups whose runs are finished"
    )
    p.add_argument("--out", default="results", help="folder for study.json and the plot")


def _teacher_parser(sub) -> None:
    p = sub.add_parser("teacher", help="retrain the embedded MNIST teacher (or a 32 or 64 px one) from scratch")
    p.add_argument("--out", default="runs/teacher", help="the run folder")
    p.add_argument(
        "--resolution", type=int, default=16, help="16 (the embedded teacher), or 32 or 64 (E4's larger teachers)"
    )
    p.add_argument("--max-steps", type=int, default=None, help="training steps (unset: the recipe's, 3000 at 16 px)")
    p.add_argument("--seed", type=int, default=0, help="seeds the initial weights and every draw")
    p.add_argument(
        "--prediction-type",
        default="v_prediction",
        help="what the network predicts: v_prediction (the shipped teachers), epsilon (SD 1.x's) or sample",
    )


def _miniature_parser(sub) -> None:
    p = sub.add_parser(
        "miniature", help="retrain the miniature Stable Diffusion pipeline (VAE, then UNet) on the captioned digits"
    )
    p.add_argument("--out", default="runs/miniature", help="a new folder: the pipeline goes to <out>/pipeline")
    p.add_argument("--vae-steps", type=int, default=None, help="the VAE's training steps (unset: the recipe's)")
    p.add_argument("--unet-steps", type=int, default=None, help="the UNet's training steps (unset: the recipe's)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights, the captions' phrasings and every draw")


def _classifier_parser(sub) -> None:
    sub.add_parser("classifier", help="retrain the evaluation classifier (d2f/assets/mnist_classifier.*)")


def _sampling_settings(args: argparse.Namespace):
    from .networks.sampling import SamplingSettings

    return SamplingSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(SamplingSettings)})


def _print_json(report: dict, out: str | None = None) -> None:
    from ._files import write_json

    print(json.dumps(report, indent=1))
    if out:
        write_json(out, report)


def _train(args: argparse.Namespace) -> None:
    from .training.config import TrainConfig
    from .training.loop import train

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    values["classes"] = tuple(args.classes) if args.classes else None
    values["validation_prompts"] = tuple(args.validation_prompts) if args.validation_prompts else None
    values["out"] = args.out or f"runs/{args.objective}-{Path(args.data).name}"
    _print_json(train(TrainConfig(**values), resume=args.resume, progress=args.progress))


def _sample(args: argparse.Namespace) -> None:
    from .data.datasets import sample_conditions
    from .networks.sampling import write_sample_grid

    settings = _sampling_settings(args)
    concat = None
    if args.cond_data is not None:
        concat = sample_conditions(args.cond_data, args.lora or args.model, args.resolution, args.num_samples)
    write_sample_grid(args.model, settings, args.num_samples, args.resolution, args.out, args.lora, concat)
    print(f"wrote {args.out}")


def _eval(args: argparse.Namespace) -> None:
    from ._files import output_path
    from .evaluation.evaluate import evaluate

    out = output_path(args.out) if args.out else None
    settings = _sampling_settings(args)
    if args.task == "dense":
        from .evaluation.dense import evaluate_dense

        if not args.data:
            raise ValueError(
                "--task dense needs --data (held-out targets) and their conditions: --cond-data, or a latents file "
                "whose concat key holds them"
            )
        report = evaluate_dense(args.model, settings, args.data, args.cond_data, args.num_samples, args.ensemble)
        _print_json(report, out)
        return
    given = [flag for flag, value in (("--data", args.data), ("--cond-data", args.cond_data)) if value is not None]
    if given or args.ensemble != 1:
        raise ValueError(f"{', '.join(given) or '--ensemble'}: for --task dense only")
    _print_json(evaluate(args.model, settings, args.num_samples), out)


def _encode(args: argparse.Namespace) -> None:
    from .data.encode import encode

    options = ("caption_column", "flip", "sample", "seed", "batch_size", "device", "cond_data")
    report = encode(args.pretrained, args.data, args.resolution, args.out, **{k: getattr(args, k) for k in options})
    report.pop("tensors")
    _print_json(report)


def _pairs(args: argparse.Namespace) -> None:
    from .data.pairs import generate_pairs, pipeline_pairs

    if args.prompts is None:
        if args.resolution is not None:
            raise ValueError(
                "--resolution is for a pipeline's pairs (with --prompts); an export samples "
                "at the resolution it was trained at"
            )
        for name, default in _EXPORT_PAIRS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        meta = generate_pairs(args.model, args.out, args.num_samples, _sampling_settings(args), progress=True)
    else:
        from .data.captions import find_captions

        if args.model == "teacher":
            raise ValueError(
                "--prompts draws pairs from a Stable Diffusion pipeline: pass --model PIPELINE (a folder, or "
                "'miniature'); --model teacher is a class-conditional d2f export"
            )
        if not Path(args.prompts).is_dir():
            raise ValueError(f"--prompts {args.prompts}: no such folder (a captioned image folder)")
        ignored = [f"--{name} {getattr(args, name)}" for name in _EXPORT_PAIRS if getattr(args, name) is not None]
        if ignored:
            raise ValueError(
                f"{', '.join(ignored)} set with --prompts: a pipeline's pairs are drawn by its "
                "own scheduler (--steps and --guidance); solver, grid and shift are for d2f exports"
            )
        meta = pipeline_pairs(
            args.model,
            find_captions(args.prompts).captions,
            args.out,
            args.num_samples,
            args.steps,
            args.guidance,
            args.resolution,
            args.seed,
            progress=True,
            device=args.device,
        )
    _print_json({"out": args.out, "num_pairs": args.num_samples, **meta})


def _reproduce(args: argparse.Namespace) -> None:
    from .evaluation.reproduce import reproduce

    reports = reproduce(
        args.experiment, args.out, args.seed, args.num_samples, args.scale, args.resolution, args.budget
    )
    _print_json({name: report.get("seconds") for name, report in reports.items()})
    print(f"wrote {', '.join(sorted(reports))} to {args.out}")


def _study(args: argparse.Namespace) -> None:
    from .evaluation.study import write_study

    print(
        write_study(
            args.out, args.runs, args.max_steps, args.num_samples, tuple(args.seeds), args.workers, args.report_only
        )
    )
    print(f"wrote {Path(args.out) / 'study.json'} and study.md")


def _teacher(args: argparse.Namespace) -> None:
    from .training.loop import train
    from .training.recipes import teacher_config

    _print_json(train(teacher_config(args.out, args.max_steps, args.seed, args.resolution, args.prediction_type)))


def _miniature(args: argparse.Namespace) -> None:
    from ._files import write_json
    from .evaluation.prompts import reference_scores
    from .training.recipes import train_miniature

    report = train_miniature(args.out, args.vae_steps, args.unet_steps, args.seed)
    scores = reference_scores(Path(args.out) / "pipeline", args.seed)
    write_json(Path(args.out) / "prompt_following.json", scores)
    _print_json({**report, "prompt_following": scores})


def _classifier(args: argparse.Namespace) -> None:
    from .evaluation.classifier import train_classifier

    _print_json(train_classifier())


# name: (adds its parser, runs it)
COMMANDS = {
    "train": (_train_parser, _train),
    "sample": (_sample_parser, _sample),
    "eval": (_eval_parser, _eval),
    "pairs": (_pairs_parser, _pairs),
    "encode": (_encode_parser, _encode),
    "reproduce": (_reproduce_parser, _reproduce),
    "study": (_study_parser, _study),
    "teacher": (_teacher_parser, _teacher),
    "miniature": (_miniature_parser, _miniature),
    "classifier": (_classifier_parser, _classifier),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="d2f", description="Diffusion models as flow-matching models (Diff2Flow).")
    sub = parser.add_subparsers(dest="command", required=True)
    for add_parser, _ in COMMANDS.values():
        add_parser(sub)
    for command in sub.choices.values():  # every flag's help line ends with its default
        command.formatter_class = argparse.ArgumentDefaultsHelpFormatter
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command][1](args)
    # The boundary for what a user can fix: a bad flag or file (ValueError, including d2f.NonFiniteError), a
    # missing extra, an unreadable, unwritable or full disk (OSError, naming the file), a diverged run. Anything
    # else is a bug in d2f or below it and keeps its traceback.
    except (ValueError, ImportError, OSError, FloatingPointError) as e:
        print(f"d2f {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"d2f {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0
