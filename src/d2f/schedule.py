"""The diffusion noise schedule and the time map between FM time ``t`` and network timestep ``k``.

The map is the only part of Diff2Flow that depends on the schedule (``docs/conventions.md`` §2):
``tau_k = alpha_k / (alpha_k + sigma_k)`` on the integer grid, extended by ``k = -1 -> tau = 1`` and,
unless the schedule already reaches zero SNR, ``k = T -> tau = 0``. Between grid points both directions
are piecewise linear, so integer timestep ``k`` always means ``alphas_cumprod[k]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ._checks import (
    TimeLike,
    as_scalars,
    as_time,
    check_bool,
    check_choice,
    check_positive_int,
    check_real,
    describe,
    time_dtype,
)
from ._versioned import Document
from .deferred import verify
from .parametrization import DIFFUSERS_PREDICTION_TYPES

_BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_DOCUMENT = Document("d2f.Schedule", 1, frozenset({"alphas_cumprod"}), frozenset({"prediction_type"}))


def _rescale_zero_terminal_snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Lin et al. 2024, Algorithm 1: shift sqrt(alphabar) so its last entry is 0, keep its first."""
    root = np.sqrt(alphas_cumprod)
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    return root**2


def _checked_betas(betas: Any, name: str) -> np.ndarray:
    """``betas`` as a float64 table, refused unless 1-D, non-empty and each in (0, 1); only the last may be 1
    (zero terminal SNR: a later 1 would make ``alphas_cumprod`` stop decreasing)."""
    if isinstance(betas, Tensor):
        betas = betas.detach().cpu().numpy()
    try:
        real = not np.iscomplexobj(betas)  # else the float64 cast would drop the imaginary part
        b = np.array(betas, dtype=np.float64) if real else None
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a 1-D table of numbers, got {describe(betas)}") from None
    if b is None:
        raise ValueError(f"{name} must be real, got {describe(betas)}")
    if b.ndim != 1 or b.size < 1:
        raise ValueError(f"{name} must be a non-empty 1-D table of betas, got shape {b.shape}")
    allowed = (b > 0) & (b < 1)  # false for NaN
    allowed[-1] |= b[-1] == 1
    if not allowed.all():
        k = int(np.argmin(allowed))
        raise ValueError(
            f"{name} must be in (0, 1), the last one may be 1 (zero terminal SNR); {name}[{k}]={float(b[k])!r}"
        )
    return b


def _beta_end_points(beta_start: object, beta_end: object) -> tuple[float, float]:
    """The end points of a linear or scaled-linear table, each a number in (0, 1)."""
    return tuple(
        check_real(name, value, "be a number in (0, 1)", lambda b: 0 < b < 1)
        for name, value in (("beta_start", beta_start), ("beta_end", beta_end))
    )


def _cosine_betas(num_train_timesteps: int, max_beta: float) -> np.ndarray:
    """diffusers' ``squaredcos_cap_v2`` (GLIDE), evaluated in float64."""

    def alphabar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    return np.array([min(1 - alphabar((i + 1) / T) / alphabar(i / T), max_beta) for i in range(T)])


class Schedule:
    """An immutable variance-preserving noise schedule, held as a float64 ``alphas_cumprod`` table.

    ``alphas_cumprod[k]`` is alphabar at integer timestep ``k`` (``k = 0`` almost clean). The FM time of
    timestep ``k`` is ``tau_k = sqrt(ab_k) / (sqrt(ab_k) + sqrt(1 - ab_k))``, strictly decreasing in ``k``.
    """

    __slots__ = ("_alphas_cumprod", "_prediction_type", "_tau_ext", "_k_max", "_tables")

    def __init__(self, alphas_cumprod: Any, prediction_type: str | None = None):
        ac = np.array(alphas_cumprod, dtype=np.float64, copy=True)
        if ac.ndim != 1 or ac.size < 1:
            raise ValueError(f"alphas_cumprod must be a non-empty 1-D table, got shape {ac.shape}")
        if not np.all(np.isfinite(ac)):
            raise ValueError(f"alphas_cumprod must be finite; entry {int(np.argmin(np.isfinite(ac)))} is not")
        if ac[0] >= 1 or ac[-1] < 0:
            raise ValueError(
                f"alphas_cumprod must lie in [0, 1) (alphabar_0 < 1, only the last entry may be 0); "
                f"got first={float(ac[0])!r}, last={float(ac[-1])!r}"
            )
        steps = np.diff(ac)
        if np.any(steps >= 0):
            k = int(np.argmax(steps >= 0))
            raise ValueError(
                f"alphas_cumprod must be strictly decreasing; alphas_cumprod[{k}]={float(ac[k])!r} <= "
                f"alphas_cumprod[{k + 1}]={float(ac[k + 1])!r}"
            )
        if prediction_type is not None:
            check_choice("prediction_type", prediction_type, DIFFUSERS_PREDICTION_TYPES)
        ac.flags.writeable = False
        alpha, sigma = np.sqrt(ac), np.sqrt(1 - ac)
        tau = alpha / (alpha + sigma)
        # Virtual end points: k = -1 is clean data, k = T pure noise (only if the table stops short of it).
        ends = [1.0], ([0.0] if tau[-1] > 0 else [])
        tau_ext = np.concatenate([ends[0], tau, ends[1]])
        tau_ext.flags.writeable = False
        setattr_ = object.__setattr__
        setattr_(self, "_alphas_cumprod", ac)
        setattr_(self, "_prediction_type", prediction_type)
        setattr_(self, "_tau_ext", tau_ext)
        setattr_(self, "_k_max", tau_ext.size - 2)
        setattr_(self, "_tables", {})

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Schedule is immutable")

    # ----------------------------------------------------------------------------------- constructors
    @classmethod
    def from_alphas_cumprod(cls, alphas_cumprod: Any, prediction_type: str | None = None) -> Schedule:
        return cls(alphas_cumprod, prediction_type)

    @classmethod
    def from_betas(cls, betas: Any, prediction_type: str | None = None) -> Schedule:
        """``alphas_cumprod = cumprod(1 - betas)``; each beta in (0, 1) (the last may be 1: zero terminal SNR)."""
        return cls._finish(betas, False, prediction_type)

    @classmethod
    def linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
        prediction_type: str | None = None,
    ) -> Schedule:
        """DDPM's linear betas (diffusers ``linear``)."""
        T = check_positive_int("num_train_timesteps", num_train_timesteps)
        beta_start, beta_end = _beta_end_points(beta_start, beta_end)
        return cls._finish(np.linspace(beta_start, beta_end, T), zero_terminal_snr, prediction_type)

    @classmethod
    def scaled_linear(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        zero_terminal_snr: bool = False,
        prediction_type: str | None = None,
    ) -> Schedule:
        """Stable Diffusion's schedule: ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T)**2``.

        LDM calls this ``linear``; diffusers calls it ``scaled_linear``.
        """
        T = check_positive_int("num_train_timesteps", num_train_timesteps)
        beta_start, beta_end = _beta_end_points(beta_start, beta_end)
        betas = np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T) ** 2
        return cls._finish(betas, zero_terminal_snr, prediction_type)

    @classmethod
    def cosine(
        cls,
        num_train_timesteps: int = 1000,
        max_beta: float = 0.999,
        zero_terminal_snr: bool = False,
        prediction_type: str | None = None,
    ) -> Schedule:
        """The cosine schedule (diffusers ``squaredcos_cap_v2``)."""
        T = check_positive_int("num_train_timesteps", num_train_timesteps)
        # min(beta, nan) is beta in Python, so an unchecked NaN cap would be dropped without a word
        max_beta = check_real("max_beta", max_beta, "be a number in (0, 1]", lambda b: 0 < b <= 1)
        return cls._finish(_cosine_betas(T, max_beta), zero_terminal_snr, prediction_type)

    @classmethod
    def _finish(cls, betas: Any, zero_terminal_snr: bool, prediction_type: str | None, name: str = "betas") -> Schedule:
        """The schedule of ``betas`` (``name`` in errors), rescaled to zero terminal SNR when asked."""
        ac = np.cumprod(1 - _checked_betas(betas, name))
        if check_bool("zero_terminal_snr", zero_terminal_snr):
            if ac.size < 2:
                raise ValueError("zero_terminal_snr needs num_train_timesteps >= 2")
            ac = _rescale_zero_terminal_snr(ac)
        return cls(ac, prediction_type)

    def with_zero_terminal_snr(self) -> Schedule:
        """This schedule rescaled to zero terminal SNR (Lin et al. 2024), as diffusers' ``rescale_betas_zero_snr``:
        ``sqrt(alphabar)`` is shifted and stretched so its last entry is 0 and its first is kept."""
        if self.zero_terminal_snr:
            return self
        if self.num_train_timesteps < 2:
            raise ValueError("zero_terminal_snr needs num_train_timesteps >= 2")
        return Schedule(_rescale_zero_terminal_snr(self.alphas_cumprod), self.prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler_or_config: Any) -> Schedule:
        """Rebuild the table in float64 from a DDPM/DDIM-family diffusers scheduler or its config.

        Reads ``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``, ``num_train_timesteps``,
        ``rescale_betas_zero_snr`` and ``prediction_type`` (diffusers' defaults where a key is absent);
        other keys are ignored. Schedulers that do not describe a VP ``alphas_cumprod`` table are refused, and
        so are a ``rescale_betas_zero_snr`` that is not a bool, a ``trained_betas`` that is not a 1-D table of
        betas and a ``num_train_timesteps`` that is not its length (diffusers would take the length silently).
        """
        config = getattr(scheduler_or_config, "config", scheduler_or_config)
        if not isinstance(config, Mapping):
            raise ValueError(
                "scheduler_or_config must be a diffusers scheduler or its config mapping, "
                f"got {type(scheduler_or_config).__name__}"
            )
        name = config.get("_class_name") or type(scheduler_or_config).__name__
        if "beta_schedule" not in config and "trained_betas" not in config:
            if "sigma_max" in config or "shift" in config or "FlowMatch" in str(name):
                raise ValueError(
                    f"scheduler {name!r} has no VP alphas_cumprod table (variance-exploding or already flow "
                    "matching); Schedule.from_diffusers supports DDPM/DDIM-family configs only"
                )
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if config.get(flag):
                raise ValueError(
                    f"scheduler {name!r} sets {flag}=True: its sampling grid is a sigma spacing, not a VP "
                    "timestep rule, so it is not supported; build a grid with d2f.ddim_grid/uniform_grid instead"
                )
        prediction_type = config.get("prediction_type")
        if prediction_type is not None:
            check_choice("prediction_type", prediction_type, DIFFUSERS_PREDICTION_TYPES)
        zero_snr = check_bool("rescale_betas_zero_snr", config.get("rescale_betas_zero_snr", False))
        trained = config.get("trained_betas")
        if trained is not None:
            schedule = cls._finish(trained, zero_snr, prediction_type, "trained_betas")
            n = schedule.num_train_timesteps
            # diffusers' schedulers take the table's length and drop a disagreeing num_train_timesteps silently
            T = check_positive_int("num_train_timesteps", config.get("num_train_timesteps", n))
            if T != n:
                raise ValueError(
                    f"num_train_timesteps={T} disagrees with trained_betas, which has {n} entries; "
                    f"pass num_train_timesteps={n}"
                )
            return schedule
        schedule = config.get("beta_schedule", "linear")
        check_choice("beta_schedule", schedule, _BETA_SCHEDULES)
        T = config.get("num_train_timesteps", 1000)
        if schedule == "squaredcos_cap_v2":
            return cls.cosine(T, zero_terminal_snr=zero_snr, prediction_type=prediction_type)
        make = cls.linear if schedule == "linear" else cls.scaled_linear
        return make(
            T,
            config.get("beta_start", 0.0001),
            config.get("beta_end", 0.02),
            zero_terminal_snr=zero_snr,
            prediction_type=prediction_type,
        )

    def diffusers_config(self) -> dict[str, Any]:
        """The inverse of :meth:`from_diffusers`: ``num_train_timesteps``, ``trained_betas`` (from the float64
        table) and ``prediction_type`` when known, as diffusers scheduler config keys."""
        ac = self._alphas_cumprod
        config: dict[str, Any] = {
            "num_train_timesteps": self.num_train_timesteps,
            "trained_betas": (1 - ac / [1.0, *ac[:-1]]).tolist(),
        }
        if self._prediction_type is not None:
            config["prediction_type"] = self._prediction_type
        return config

    # ------------------------------------------------------------------------------------- properties
    @property
    def alphas_cumprod(self) -> np.ndarray:
        """The float64 table (read-only)."""
        return self._alphas_cumprod

    @property
    def prediction_type(self) -> str | None:
        """The network's diffusers prediction type, when the source named one."""
        return self._prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self._alphas_cumprod.size)

    @property
    def taus(self) -> np.ndarray:
        """``tau_k`` for ``k = 0 .. T-1`` (read-only)."""
        return self._tau_ext[1 : self.num_train_timesteps + 1]

    @property
    def t_min(self) -> float:
        """The smallest FM time the network was trained on, ``tau_{T-1}`` (0 under zero terminal SNR).

        Below it, ``timestep`` extrapolates to ``k`` in ``(T-1, T]``.
        """
        return float(self._tau_ext[self.num_train_timesteps])

    @property
    def zero_terminal_snr(self) -> bool:
        return bool(self._alphas_cumprod[-1] == 0)

    # ------------------------------------------------------------------------------------- time map
    def _device_tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """``(tau ascending, matching k)`` as float64 tensors on ``device``, cached per device."""
        tables = self._tables.get(device)
        if tables is None:
            tau_inc = torch.from_numpy(self._tau_ext[::-1].copy()).to(device)
            k_inc = torch.arange(self._k_max, -2, -1, dtype=torch.float64, device=device)
            tables = self._tables[device] = (tau_inc, k_inc)
        return tables

    def timestep(self, t: TimeLike) -> Tensor:
        """FM time ``t`` in [0, 1] -> network timestep ``k`` in ``[-1, T]`` (piecewise linear in ``tau``).

        Exact at grid points: ``timestep(tau_k) == k``. ``t = 1`` gives ``-1`` and ``t = 0`` gives ``T``
        (``T - 1`` under zero terminal SNR). Python floats and float64 tensors give float64, others float32.
        """
        tt = as_time(t)
        tau, k = self._device_tables(tt.device)
        i = (torch.searchsorted(tau, tt.contiguous(), right=True) - 1).clamp(0, tau.numel() - 2)
        frac = (tt - tau[i]) / (tau[i + 1] - tau[i])
        return (k[i] + frac * (k[i + 1] - k[i])).to(time_dtype(t))

    def fm_time(self, k: TimeLike) -> Tensor:
        """Network timestep ``k`` (float, in ``[-1, T]``) -> FM time; the exact inverse of ``timestep``."""
        kk = as_scalars(k, name="k")
        verify(
            (~((kk >= -1) & (kk <= self._k_max))).any(),
            lambda bad: (
                ValueError(f"k must lie in [-1, {self._k_max}] for this schedule; got {describe(k)}")
                if bad[0]
                else None
            ),
        )
        tau_inc, _ = self._device_tables(kk.device)
        tau = tau_inc.flip(0)  # indexed by k + 1
        # The fraction is taken from k itself: k - floor(k) is exact, while shifting k by one first rounds it
        # (by up to 3.6e-15 near k = 32, enough to turn t = 2e-15 into 0).
        base = kk.floor().clamp(-1, self._k_max - 1)
        frac = kk - base
        i = (base + 1).long()
        return (tau[i] + frac * (tau[i + 1] - tau[i])).to(time_dtype(k))

    # ---------------------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; floats survive JSON exactly (Python writes the shortest round-trip repr)."""
        return _DOCUMENT.new(alphas_cumprod=self._alphas_cumprod.tolist(), prediction_type=self._prediction_type)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Schedule:
        data = _DOCUMENT.check(data, "schedule")
        return cls(data["alphas_cumprod"], data.get("prediction_type"))

    # ------------------------------------------------------------------------------------- dunder
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Schedule):
            return NotImplemented
        return self._prediction_type == other._prediction_type and np.array_equal(
            self._alphas_cumprod, other._alphas_cumprod
        )

    def __hash__(self) -> int:
        return hash((self._alphas_cumprod.tobytes(), self._prediction_type))

    def __repr__(self) -> str:
        return (
            f"Schedule(num_train_timesteps={self.num_train_timesteps}, t_min={self.t_min:.6g}, "
            f"zero_terminal_snr={self.zero_terminal_snr}, prediction_type={self._prediction_type!r})"
        )


def check_schedule(schedule: object) -> Schedule:
    """``schedule``, refused by its type unless it is a :class:`Schedule` (a scheduler or a schedule's name is not)."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"schedule must be a d2f.Schedule, got {type(schedule).__name__}")
    return schedule
