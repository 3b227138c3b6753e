"""d2f: pretrained diffusion models as flow-matching models (Diff2Flow, Schusterbauer et al., CVPR 2025).

Conventions (``docs/conventions.md``): FM time ``t = 0`` is noise and ``t = 1`` is data; integer
timestep ``k`` means ``alphas_cumprod[k]``.
"""

from ._checks import NonFiniteError
from .auto_sampler import auto_sampler
from .deferred import deferred_checks
from .grids import ddim_grid, sampling_grid, shift_grid, uniform_grid
from .guidance import guidance
from .loss import fm_loss
from .parametrization import PREDICTION_TYPES, diffusion_to_velocity, velocity_coefficients, velocity_to_diffusion
from .path import align, alpha_sigma, interpolate, network_input, scale, target_velocity
from .schedule import Schedule
from .solvers import SOLVERS, sample
from .velocity import D2FVelocity

__version__ = "0.1.0"

# Loaded on first use: they need the "train" extra, and `import d2f` must work without it.
_LAZY = {
    "D2FScheduler": "d2f.scheduler",
    "train": "d2f.training.loop",
    "TrainConfig": "d2f.training.config",
    "load": "d2f.networks.export",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        try:
            module = importlib.import_module(_LAZY[name])
        except ImportError as e:
            raise ImportError(
                f"d2f.{name} needs the 'train' extra ({e.name or e}): pip install 'd2f[train]' "
                "(pin torch in the same command on a CPU machine, see the README)"
            ) from e
        return getattr(module, name)
    raise AttributeError(f"module 'd2f' has no attribute {name!r}")


__all__ = [
    "auto_sampler",
    "PREDICTION_TYPES",
    "D2FScheduler",
    "TrainConfig",
    "load",
    "train",
    "SOLVERS",
    "D2FVelocity",
    "NonFiniteError",
    "Schedule",
    "align",
    "alpha_sigma",
    "ddim_grid",
    "deferred_checks",
    "diffusion_to_velocity",
    "fm_loss",
    "guidance",
    "interpolate",
    "network_input",
    "sample",
    "sampling_grid",
    "scale",
    "shift_grid",
    "target_velocity",
    "uniform_grid",
    "velocity_coefficients",
    "velocity_to_diffusion",
]
