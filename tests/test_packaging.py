import subprocess
import sys

import d2f

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
