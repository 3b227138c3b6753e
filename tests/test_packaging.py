import os
import subprocess
import sys
from pathlib import Path

import pytest

import d2f

# Python puts the current directory first on sys.path for `python -c` and `python -m`: a subprocess run here
# imports what a user gets from a shell in a clone's root.
REPO = Path(__file__).resolve().parent.parent

API = [
    "Schedule",
    "alpha_sigma",
    "scale",
    "align",
    "interpolate",
    "target_velocity",
    "diffusion_to_velocity",
    "velocity_to_diffusion",
    "fm_loss",
    "guidance",
    "uniform_grid",
    "shift_grid",
    "ddim_grid",
    "sample",
    "D2FVelocity",
]


def test_public_api_is_importable_from_the_top_level():
    for name in API:
        assert hasattr(d2f, name), name
        assert name in d2f.__all__


def test_import_needs_only_the_core_dependencies():
    """`import d2f` must work when no extra (diffusers, triton, peft, accelerate, ...) is importable."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {'diffusers', 'triton', 'peft', 'accelerate', 'safetensors'}:
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
import d2f, torch
from d2f import diffusion_to_velocity
x = torch.zeros(2, 3)
assert diffusion_to_velocity(x, x, 0.5, 'epsilon').shape == (2, 3)
print('ok')
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def run_in_repo(code: str, **env: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_an_installed_kernels_package_wins_over_the_repositorys_kernels_folder(tmp_path):
    """transformers (>= 5.25) needs PyPI's ``kernels``; from a clone's root the top-level kernels/ folder must not
    shadow it, so it has no __init__.py (a folder without one gives way to a regular package later on sys.path)."""
    assert not (REPO / "kernels" / "__init__.py").exists(), "kernels/__init__.py shadows PyPI's kernels package"
    fake = tmp_path / "site-packages" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'the installed kernels package'\n")
    got = run_in_repo("import kernels; print(kernels.WHO)", PYTHONPATH=str(fake.parent))
    assert got == "the installed kernels package"


def test_every_kernel_runs_from_the_repositorys_root():
    """Without an installed ``kernels``, d2f's kernels still load from d2f.kernels, and d2f never imports the
    top-level folder as ``kernels``: each of the five, run by the interpreter, matches the torch path."""
    pytest.importorskip("triton")
    code = """
import sys
import torch
import d2f
from d2f.training.draws import normals, uniforms

g = torch.Generator().manual_seed(0)
o, data, noise = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(3))
t = torch.tensor([0.3, 0.7])
where = torch.tensor([0, 5])
x = torch.randn(2, 3, 4, 4, generator=g)
for run in (
    lambda backend: d2f.fm_loss(o, data, noise, t, "v_prediction", backend=backend),
    lambda backend: d2f.network_input(data, noise, t, backend=backend),
    lambda backend: d2f.sample(lambda x, t: -x, x, d2f.uniform_grid(3, 0.1, 1.0), backend=backend),
    lambda backend: uniforms(7, where, 1, 5, backend=backend),
    lambda backend: normals(7, where, 2, 5, backend=backend),
):
    torch.testing.assert_close(run("triton"), run("torch"))
assert "kernels" not in sys.modules
print("ok")
"""
    assert run_in_repo(code, TRITON_INTERPRET="1") == "ok"


def test_d2f_run_from_its_source_folder_finds_the_kernels():
    """An editable install maps d2f to src/d2f and leaves d2f.kernels to Python's path finder, which reaches the
    top-level kernels/ through the link src/d2f/kernels (setuptools' own finder misses a namespace package inside a
    regular one). PYTHONPATH=src imports d2f the same way, ahead of the installed copy the suite runs against."""
    pytest.importorskip("triton")
    got = run_in_repo(
        "import d2f.kernels.loss as m; print(m.__file__)", PYTHONPATH=str(REPO / "src"), TRITON_INTERPRET="1"
    )
    assert Path(got).resolve() == (REPO / "kernels" / "loss.py").resolve()


def test_diffusers_imports_from_the_repositorys_root():
    """The issue as a user met it: transformers, which diffusers' AutoencoderKL imports, saw the repository's
    kernels/ as PyPI's ``kernels`` (installed beside transformers >= 5.25, absent before; both cases pass here)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    assert run_in_repo("from diffusers import AutoencoderKL; print(AutoencoderKL.__name__)") == "AutoencoderKL"


def test_every_subpackage_is_in_the_wheel():
    """pyproject.toml lists its packages by name (the kernels folder is mapped in): a subpackage missing there
    works in an editable install and is absent from the wheel nox and users install."""
    import tomllib

    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    source = REPO / "src"
    found = {
        ".".join(p.parent.relative_to(source).parts)
        for p in (source / "d2f").rglob("__init__.py")
        if "kernels" not in p.relative_to(source).parts
    }
    listed = set(setuptools["packages"]) - {"d2f.kernels"}
    assert listed == found, {"missing": found - listed, "gone": listed - found}
    for name in found:
        assert setuptools["package-dir"].get(name, "src/" + name.replace(".", "/")) == "src/" + name.replace(".", "/")
