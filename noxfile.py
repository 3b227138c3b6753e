"""Developer sessions: ``nox -s tests``, ``nox -s tests_newest``, ``nox -s tests_lowest``, ``nox -s bench``,
``nox -s lint``.

Exact versions live here and in CI only; ``pyproject.toml`` gives ranges. ``tests_newest`` and ``tests_lowest`` run
the tests on both ends of them (torch and triton stay pinned: the CPU wheel). torch is pinned in the same pip command
as everything that depends on it, so pip takes the CPU wheel instead of a CUDA build.
"""

import nox

nox.options.default_venv_backend = "venv"  # uv ignores the local torch wheel
nox.options.sessions = ["tests"]

# The CPU wheel and the triton it matches: pinned in every session.
TORCH = ["torch==2.13.0", "triton==3.7.1"]
TEST_TOOLS = ["pytest==9.2.0", "hypothesis==6.170.17", "pytest-benchmark==5.3.1"]
PINS = [
    *TORCH,
    *TEST_TOOLS,
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "diffusers==0.42.1",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "safetensors==0.8.0",
    "transformers==5.24.0",  # peft needs it; the pipeline tests build a tiny CLIP text encoder
    "tensorboard==2.21.0",  # d2f train --report-to tensorboard
]


# pyproject.toml's lower bounds, each the oldest release its range allows (safetensors' bound is the oldest that
# accelerate 1.0 takes).
LOWEST = [
    *TORCH,
    *TEST_TOOLS,
    "numpy==1.24.0",
    "tqdm==4.60.0",
    "diffusers==0.30.0",
    "transformers==4.40.0",
    "peft==0.13.0",
    "accelerate==1.0.0",
    "safetensors==0.4.3",
    "tensorboard==2.10.0",
]


def _install(session: nox.Session) -> None:
    session.install(*PINS, ".[test,triton,tensorboard]")


def _test(session: nox.Session, *pytest_args: str) -> None:
    """pytest over tests/, with Triton kernels run by the interpreter on the CPU, after the versions it runs
    against."""
    session.run("python", "-m", "pip", "freeze")
    session.env["TRITON_INTERPRET"] = "1"
    session.env.setdefault("HYPOTHESIS_PROFILE", "ci")
    session.run("pytest", "tests", *pytest_args, *session.posargs)


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite on the pinned versions, then every benchmark run once untimed: their own checks that the
    baselines compute what d2f computes, and that each timed row still runs."""
    _install(session)
    _test(session)
    session.run("pytest", "benchmarks", "--benchmark-disable", "-p", "no:cacheprovider")


@nox.session(python="3.11")
def tests_newest(session: nox.Session) -> None:
    """The test suite on the newest versions pyproject.toml's extras allow, as a user's fresh install gets them."""
    session.install(*TORCH, ".[test,triton,tensorboard,train]")
    _test(session)


@nox.session(python="3.11")
def tests_lowest(session: nox.Session) -> None:
    """The suite on the lowest versions pyproject.toml allows, less test_evaluation.py (CI's time): its experiments
    in miniature take most of the suite's minutes and reach diffusers, peft and accelerate through the training
    and sampling code that the other tests cover."""
    session.install(*LOWEST, ".[test,triton,tensorboard,train]")
    _test(session, "--ignore=tests/test_evaluation.py")


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """pytest-benchmark over benchmarks/ (CPU rows here; GPU rows need CUDA)."""
    _install(session)
    session.run("pytest", "benchmarks", "--benchmark-only", *session.posargs)


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff==0.17.6")
    session.run("ruff", "check", "src", "kernels", "tests", "benchmarks", "examples", "noxfile.py")
    session.run("ruff", "format", "--check", "src", "kernels", "tests", "benchmarks", "examples", "noxfile.py")


@nox.session(python="3.11")
def mutation(session: nox.Session) -> None:
    """mutmut over the core modules, evaluation/metrics.py and the kernels' torch mirrors, with the tests that
    exercise them (``[tool.mutmut]`` in pyproject.toml), then the score per module (docs/testing.md). Not in CI:
    on 2 cores the 4996 mutants took 144 minutes, in three sittings. Results persist in ``mutants/``,
    so a rerun tests only the functions that changed; ``nox -s mutation -- "d2f.path.*"`` reruns the mutants named."""
    _install(session)
    session.install(*TORCH, "mutmut==3.8.1")
    # One torch thread per mutmut worker (one worker per core): more oversubscribe the cores, and torch's spinning
    # threads then run some tests 50 times slower.
    session.env.update(TRITON_INTERPRET="1", HYPOTHESIS_PROFILE="ci", OMP_NUM_THREADS="1")
    session.run("mutmut", "run", *session.posargs)
    session.run("python", "tools/mutation_report.py")
