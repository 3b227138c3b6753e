"""``TrainConfig``: every setting of a training run, validated, and stored as JSON with the run."""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass
from typing import Any

from ..data.digit_captions import CAPTIONED_DIGITS
from ..networks.widen import COND_INITS
from ..schedule import Schedule
from ..time_samplers import T_SAMPLERS
from .objectives import OBJECTIVES, trained_t_min
from .objectives import prediction_type as objective_prediction_type

MIXED_PRECISION = ("no", "bf16", "fp16")
REPORT_TO = ("tensorboard",)  # accelerate's trackers d2f logs to
ON_NONFINITE = ("stop", "skip")
# Settings that may change between a run and its resumption; any other difference is refused.
RESUMABLE_CHANGES = {
    "out",
    "max_steps",
    "checkpoint_every",
    "sample_steps",
    "num_samples",
    "guidance",
    "on_nonfinite",
    "gradient_checkpointing",  # recomputes activations, computes the same
    "validation_prompts",
    "validation_every",
    "report_to",
}
DEFAULT_T_SAMPLER = "logit-normal"  # best or tied in the settings study (docs/results.md, "Choosing settings")
# ... except for an epsilon network under d2f: logit-normal draws t down to 0.001, far below the lowest level the
# teacher was trained at (tau_min, 0.064 on SD 1.5's schedule), where the velocity derived from epsilon divides by
# a vanishing alpha. The miniature SD's 128 px LoRA, 200 steps: digit accuracy 0.45 with diffusion-matched t
# against 0.20 with logit-normal (docs/results.md, "The miniature Stable Diffusion").
DEFAULT_T_SAMPLER_EPSILON = "diffusion-matched"
# The settings study tuned the lr per capacity; these are its picks (docs/results.md, "Choosing settings").
DEFAULT_LR_LORA = 3e-3
DEFAULT_LR_FULL = 1e-3
# Classifier-free guidance of a run's samples where it has a null condition to guide by: the miniature Stable
# Diffusion's reference scale (evaluation/prompts.py).
DEFAULT_GUIDANCE = 3.0
# The pixel teacher's task, d2f train's default before the Stable Diffusion workflow: the 16x16 teacher adapted to
# 24x24 MNIST digits, samples unguided. E1-E5, depth and the study run on it (TrainConfig.teacher_task).
TEACHER_TASK = {
    "pretrained": "teacher",
    "data": "mnist",
    "resolution": 24,
    "guidance": 1.0,
    "max_steps": 600,
    "batch_size": 32,
    "sample_steps": 25,
}


@dataclass(frozen=True)
class TrainConfig:
    """Settings of ``d2f train`` (the CLI flags are these names with dashes). The defaults are the main job: the
    shipped miniature Stable Diffusion LoRA-finetuned with Diff2Flow to 128 px captioned digits."""

    out: str = "runs/default"
    # "miniature" (the shipped miniature Stable Diffusion), "teacher" (the embedded pixel teacher), a d2f export,
    # a diffusers UNet folder or a pipeline folder
    pretrained: str = "miniature"
    # captioned-digits (the shipped digits as a captioned folder, written into the run) | mnist | digits |
    # an image folder | a latents file (.safetensors / .npy)
    data: str = CAPTIONED_DIGITS
    pairs: str | None = None  # reflow: a `d2f pairs` file, trained on instead of data
    # Image-to-X: each sample's condition, appended to the network input (a folder paired by name with an image
    # folder data, or a latents file of conditions); a UNet that does not take them is widened (networks/widen.py).
    cond_data: str | None = None
    cond_init: str = "zero"  # how a widened conv_in starts: zero | marigold (widen.COND_INITS)
    resolution: int = 128  # the main job: the miniature (trained at 64 px) at twice its size
    classes: tuple[int, ...] | None = None  # keep only these labels (mnist, digits)
    caption_column: str = "text"  # a pipeline and a captioned image folder: metadata.jsonl's caption key
    flip: bool = False  # ... and flip images at random (seeded) before encoding
    objective: str = "d2f"
    # None: logit-normal for fm and for d2f, diffusion-matched for d2f on an epsilon network (t_sampler_for);
    # diffusion draws integer timesteps
    t_sampler: str | None = None
    lora_rank: int = 8  # 0 = full finetuning
    # With LoRA, also train conv_in and conv_out fully (the paper's best); None: yes, except for a UNet from a
    # diffusers pipeline, whose LoRA export is in diffusers' format (LoRA weights only; models.add_lora).
    lora_full_convs: bool | None = None
    max_steps: int = 200  # the main job's, sized to run in about 3 minutes on 2 CPU cores
    batch_size: int = 16
    grad_accum: int = 1
    lr: float | None = None  # None: DEFAULT_LR_LORA with LoRA, DEFAULT_LR_FULL for full finetuning
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    cond_dropout: float = 0.1  # drop class labels to the null label, for classifier-free guidance
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, ~30 % more compute
    seed: int = 0
    checkpoint_every: int = 200  # 0 = never
    sample_steps: int = 10  # network calls of the run's samples (and of the main job's prompt following)
    num_samples: int = 40
    guidance: float | None = None  # None: DEFAULT_GUIDANCE where the run has a null condition, else 1
    validation_prompts: tuple[str, ...] | None = None  # sampled through the base pipeline every validation_every
    validation_every: int = 0  # steps; 0 = never
    report_to: str | None = None  # "tensorboard": loss, lr and validation images under <out>/logs
    on_nonfinite: str = "stop"  # a non-finite loss stops the run (naming the step and batch), or skips the step
    zero_terminal_snr: bool = False  # rescale the pretrained schedule to zero terminal SNR first (v_prediction)
    init: str | None = None  # "teacher-config": train from scratch with the teacher's architecture
    prediction_type: str | None = None  # from scratch only: the new model's prediction type

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_numbers()
        self._check_types()
        self._check_combinations()

    def _fail(self, name: str, allowed: str) -> None:
        raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: {allowed}")

    def _check_choices(self) -> None:
        """The settings that name one of a fixed set."""
        if self.objective not in OBJECTIVES:
            self._fail("objective", f"one of {OBJECTIVES}")
        if self.t_sampler is not None and self.t_sampler not in T_SAMPLERS:
            self._fail("t_sampler", f"one of {T_SAMPLERS}")
        if self.objective == "diffusion" and self.t_sampler is not None:
            raise ValueError(
                f"t_sampler={self.t_sampler!r} contradicts objective='diffusion', which draws integer timesteps "
                "uniformly like the teacher's own training; drop --t-sampler or pick objective d2f or fm"
            )
        if self.mixed_precision not in MIXED_PRECISION:
            self._fail("mixed_precision", f"one of {MIXED_PRECISION}")
        if self.report_to is not None and self.report_to not in REPORT_TO:
            self._fail("report_to", f"None or one of {REPORT_TO}")
        if self.on_nonfinite not in ON_NONFINITE:
            self._fail("on_nonfinite", f"one of {ON_NONFINITE}")

    def _check_numbers(self) -> None:
        """Counts, rates and scales, each in its range."""
        for name in ("resolution", "max_steps", "batch_size", "grad_accum", "sample_steps", "num_samples"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                self._fail(name, "a positive integer")
        for name in ("lora_rank", "warmup_steps", "checkpoint_every", "seed", "validation_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                self._fail(name, "an integer >= 0")
        if self.lr is not None and (
            isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (0 < self.lr < math.inf)
        ):
            self._fail("lr", "None (the default for the capacity) or a number in (0, inf)")
        for name in ("ema_decay", "cond_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0 <= value <= 1):
                self._fail(name, "a number in [0, 1]")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                self._fail(name, "a finite number >= 0")
        if self.guidance is not None and (
            isinstance(self.guidance, bool)
            or not isinstance(self.guidance, (int, float))
            or not math.isfinite(self.guidance)
        ):
            self._fail("guidance", "None (the default for the data) or a finite number")

    def _check_types(self) -> None:
        """Labels, names and switches, each of its type."""
        if self.classes is not None and (
            not self.classes or any(isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in self.classes)
        ):
            self._fail("classes", "a non-empty list of labels >= 0")
        if not isinstance(self.caption_column, str) or not self.caption_column:
            self._fail("caption_column", "a non-empty string")
        for name in ("zero_terminal_snr", "gradient_checkpointing", "flip"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, "True or False")
        if self.lora_full_convs is not None and not isinstance(self.lora_full_convs, bool):
            self._fail("lora_full_convs", "None (the default for the base model), True or False")

    def _check_combinations(self) -> None:
        """Settings that go together, or exclude each other."""
        if self.pairs is not None:
            if self.objective == "diffusion":
                raise ValueError(
                    f"pairs={self.pairs!r} (reflow) trains the straight path from each stored noise to its sample: "
                    "use objective 'd2f' (or 'fm'), not 'diffusion'"
                )
            # data left at a task's default (the main job's, or the teacher task's) is not a choice the pairs undo
            if self.data not in (TrainConfig.data, TEACHER_TASK["data"]) or self.classes is not None:
                raise ValueError(f"pairs={self.pairs!r} replaces data: give data (and classes) or pairs, not both")
        if self.cond_init not in COND_INITS:
            self._fail("cond_init", f"one of {COND_INITS}")
        if self.cond_data is not None and self.pairs is not None:
            raise ValueError(f"cond_data={self.cond_data!r} conditions data; reflow pairs take no conditions")
        if self.validation_prompts is not None and (
            not self.validation_prompts or not all(isinstance(p, str) for p in self.validation_prompts)
        ):
            self._fail("validation_prompts", "None or a non-empty list of prompts")
        if bool(self.validation_prompts) != bool(self.validation_every):
            raise ValueError(
                f"validation_prompts={self.validation_prompts!r} and validation_every={self.validation_every} go "
                "together: give both (prompts and how often), or neither"
            )
        if self.init not in (None, "teacher-config"):
            self._fail("init", "None or 'teacher-config'")
        if self.prediction_type is not None and self.init is None:
            raise ValueError(
                "prediction_type is only for a model trained from scratch (init='teacher-config'); a pretrained "
                "model keeps its own"
            )
        if self.init is not None and self.lora_rank:
            raise ValueError("init='teacher-config' trains a new model from scratch: it needs lora_rank=0")

    def t_sampler_for(self, prediction_type: str) -> str | None:
        """The time sampler this run draws with for a network of ``prediction_type``: the set one, else
        :data:`DEFAULT_T_SAMPLER`, or :data:`DEFAULT_T_SAMPLER_EPSILON` where the objective reads the output as
        epsilon; None for diffusion (integer timesteps)."""
        if self.objective == "diffusion":
            return None
        if self.t_sampler is not None:
            return self.t_sampler
        epsilon = objective_prediction_type(self.objective, prediction_type) == "epsilon"
        return DEFAULT_T_SAMPLER_EPSILON if epsilon else DEFAULT_T_SAMPLER

    def t_min(self, prediction_type: str, schedule: Schedule) -> float:
        """The lowest FM time this run draws for a network of ``prediction_type`` trained on ``schedule``: where
        its samples' grids start (its export's ``t_min``)."""
        return trained_t_min(self.objective, self.t_sampler_for(prediction_type), prediction_type, schedule)

    @property
    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return DEFAULT_LR_LORA if self.lora_rank else DEFAULT_LR_FULL

    def lr_at(self, step: int) -> float:
        """The lr of ``step`` (0-based): linear warmup over ``warmup_steps``, then constant."""
        lr = self.resolved_lr
        return lr * min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else lr

    def check_resumable(self, saved: TrainConfig, where: str) -> None:
        """Refuse to resume a run written with ``saved`` unless only ``RESUMABLE_CHANGES`` differ."""
        mine, theirs = self.to_dict(), saved.to_dict()
        changed = sorted(k for k, v in mine.items() if theirs[k] != v and k not in RESUMABLE_CHANGES)
        if changed:
            raise ValueError(f"--resume: {where} was written with different {', '.join(changed)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for name in ("classes", "validation_prompts"):
            d[name] = list(d[name]) if d[name] is not None else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        for key in data:
            if key not in known:
                hint = difflib.get_close_matches(key, known, n=1)
                raise ValueError(f"unknown training setting {key!r}" + (f"; did you mean {hint[0]!r}?" if hint else ""))
        values = dict(data)
        for name in ("classes", "validation_prompts"):
            if values.get(name) is not None:
                values[name] = tuple(values[name])
        return cls(**values)

    @classmethod
    def teacher_task(cls, **settings: Any) -> TrainConfig:
        """A run of the pixel teacher's task (:data:`TEACHER_TASK`), with ``settings`` on top."""
        return cls(**{**TEACHER_TASK, **settings})

    def guidance_for(self, has_null: bool) -> float:
        """The guidance scale of the run's samples: the set one, else :data:`DEFAULT_GUIDANCE` where the run has a
        null condition (a null class, or the empty prompt's embedding) and 1 where it has none."""
        if self.guidance is not None:
            return self.guidance
        return DEFAULT_GUIDANCE if has_null else 1.0

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


__all__ = [
    "DEFAULT_GUIDANCE",
    "MIXED_PRECISION",
    "TEACHER_TASK",
    "ON_NONFINITE",
    "REPORT_TO",
    "RESUMABLE_CHANGES",
    "TrainConfig",
]
