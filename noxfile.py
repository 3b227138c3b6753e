"""Developer sessions: ``nox -s tests``, ``nox -s bench``, ``nox -s lint``.

Exact versions live here and in CI only; ``pyproject.toml`` gives ranges. torch is pinned in the same
pip command as everything that depends on it, so pip takes the CPU wheel instead of a CUDA build.
"""

import nox

nox.options.default_venv_backend = "venv"  # uv ignores the local torch wheel
nox.options.sessions = ["tests"]

PINS = [
    "torch==2.13.0",
    "triton==3.7.1",
    "numpy==2.4.6",
    "tqdm==4.70.1",
    "diffusers==0.42.1",
    "pytest==9.2.0",
    "hypothesis==6.170.17",
    "pytest-benchmark==5.3.1",
    "peft==0.21.2",
    "accelerate==1.15.0",
    "safetensors==0.8.0",
    "transformers==5.24.0",  # peft needs it; the pipeline tests build a tiny CLIP text encoder
    "tensorboard==2.21.0",  # d2f train --report-to tensorboard
]


def _install(session: nox.Session) -> None:
    session.install(*PINS, ".[test,triton,tensorboard]")


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The test suite, with Triton kernels run by the interpreter on the CPU."""
    _install(session)
    session.env["TRITON_INTERPRET"] = "1"
    session.env.setdefault("HYPOTHESIS_PROFILE", "ci")
    session.run("pytest", "tests", *session.posargs)


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
