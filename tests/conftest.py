import json
import os
from pathlib import Path

# The Triton interpreter must be chosen before any kernel module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402

# CI draws the same examples every run, so a red run is reproducible and not a roll of the dice; the dev
# profile keeps drawing new ones (that is how the sweeps found their bugs; each found bug is pinned as a test).
settings.register_profile(
    "ci", max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


def pytest_collection_modifyitems(config, items):
    """``@pytest.mark.gpu`` is the one way a test says it needs CUDA: it skips here without it, and
    ``benchmarks/gpu.sh`` selects every such test with ``-m gpu``."""
    if "MUTANT_UNDER_TEST" in os.environ:
        _fastest_first(items)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _fastest_first(items):
    """In a mutation run (``nox -s mutation``, run from ``mutants/``), order the tests by the durations mutmut
    measured: it stops a mutant's run at the first failure, and hands its tests over in no particular order, so
    a mutant that a quick test kills would otherwise often wait for slow ones first."""
    stats = Path("mutmut-stats.json")
    if stats.is_file():
        duration = json.loads(stats.read_text())["duration_by_test"]
        items.sort(key=lambda item: duration.get(item.nodeid, float("inf")))
