"""Optional dependencies: a clear error naming the extra that provides them."""

from __future__ import annotations

import importlib.util


def require(*modules: str, extra: str, feature: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(
            f"{feature} needs {', '.join(missing)} from the '{extra}' extra: pip install 'd2f[{extra}]' "
            "(pin torch in the same command on a CPU machine, see the README)"
        )
