import math
import re
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from d2f import Schedule, ddim_grid, sampling_grid, shift_grid, uniform_grid
from d2f.grids import grid_steps
from strategies import NAMED_SCHEDULES


def test_uniform_grid():
    ts = uniform_grid(4)
    assert ts.dtype == torch.float64
    assert ts.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert uniform_grid(2, 1.0, 0.5).tolist() == [1.0, 0.75, 0.5]


@given(st.integers(1, 50), st.floats(0.1, 10.0))
def test_shift_grid_is_sd3_shift_of_the_noise_level(n, shift):
    ts = shift_grid(n, shift)
    s = 1 - uniform_grid(n)
    torch.testing.assert_close(ts, 1 - shift * s / (1 + (shift - 1) * s))
    assert ts[0] == 0 and ts[-1] == 1 and bool((ts.diff() > 0).all())


@pytest.mark.parametrize("shift", [1e-17, 1e17, 1e-4, 1e4, 0.0, -1.0, math.inf, math.nan, True])
def test_shift_outside_its_range_is_refused_naming_the_range(shift):
    """shift_grid(4, 1e-17) returned [nan, 1, 1, 1, 1]: 1 + (shift-1)*(1-t) is 0 at t = 0 once shift - 1
    rounds to -1; 1e17 crowded every interior time below 1e-16."""
    with pytest.raises(ValueError, match=rf"shift={re.escape(repr(shift))} must be a number in \[0.001, 1000\]"):
        shift_grid(4, shift)


@pytest.mark.parametrize("shift", [1e-3, 0.5, 2.0, 1e3])
@pytest.mark.parametrize("n, t_start, t_end", [(1, 0.0, 1.0), (4, 0.0, 1.0), (1000, 0.0, 1.0), (7, 1e-3, 1 - 1e-3)])
def test_shift_grid_at_the_ends_of_its_range_is_exact_and_strictly_increasing(shift, n, t_start, t_end):
    """The shift of the unit grid, laid onto [t_start, t_end]: the ends are exactly t_start and t_end."""
    ts = shift_grid(n, shift, t_start, t_end)
    # The map in exact rational arithmetic, from the float64 uniform grid it shifts.
    a, b = Fraction(t_start), Fraction(t_end)
    unit = [(Fraction(t) - a) / (b - a) for t in uniform_grid(n, t_start, t_end).tolist()]
    exact = [float(a + (b - a) * u / (u + Fraction(shift) * (1 - u))) for u in unit]
    assert ts.tolist() == pytest.approx(exact, rel=4 * np.finfo(np.float64).eps, abs=1e-300)
    assert bool((ts.diff() > 0).all()) and bool(ts.isfinite().all())
    assert ts[0] == t_start and ts[-1] == t_end


def test_an_inverting_shift_grid_is_the_generating_one_reversed():
    torch.testing.assert_close(shift_grid(6, 3.0, 1.0, 0.2), shift_grid(6, 3.0, 0.2, 1.0).flip(0), rtol=0, atol=1e-15)


def test_shift_one_is_uniform_and_large_shift_spends_steps_at_high_noise():
    torch.testing.assert_close(shift_grid(10, 1.0), uniform_grid(10))
    assert float(shift_grid(10, 3.0)[5]) < 0.5


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("n", [1, 3, 7, 10, 50, 1000])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_grid_follows_diffusers_timesteps(spacing, n, steps_offset, set_alpha_to_one):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(
        beta_schedule="scaled_linear", timestep_spacing=spacing, steps_offset=steps_offset, set_alpha_to_one=False
    )
    sched.set_timesteps(n)
    s = Schedule.from_diffusers(sched)
    ks = sched.timesteps.numpy()
    if ks[0] == 1000:  # every timestep, offset by one: diffusers lists one past its table, d2f refuses it
        with pytest.raises(ValueError, match=r"^spacing='leading' with steps_offset=1 lists timesteps \[1000, 999, "):
            ddim_grid(s, n, spacing, steps_offset, set_alpha_to_one)
        return
    if ks.tolist() == [0] and not set_alpha_to_one:
        pytest.skip("a single identity step; its refusal is tested in test_ddim_grid_errors")
    ts = ddim_grid(s, n, spacing, steps_offset, set_alpha_to_one)
    if not set_alpha_to_one and ks[-1] == 0:
        ks = ks[:-1]  # DDIM's identity step from timestep 0 to alphabar_0 is dropped
    starts = ts[:-1] if ts.ndim == 1 else ts[:, 0]
    np.testing.assert_allclose(s.timestep(starts).numpy(), ks, atol=1e-9)
    ends = ts[1:] if ts.ndim == 1 else ts[:, 1]
    prev = ks - 1000 // n
    final = 1.0 if set_alpha_to_one else s.taus[0]
    np.testing.assert_allclose(ends.numpy(), np.where(prev >= 0, s.taus[np.clip(prev, 0, None)], final), atol=0)


def test_ddim_grid_shape_says_whether_steps_chain():
    s = NAMED_SCHEDULES["sd"]
    assert ddim_grid(s, 50, "leading", 1).shape == (51,)
    assert ddim_grid(s, 10, "trailing").shape == (11,)
    assert ddim_grid(s, 3, "trailing").shape == (3, 2)  # 1000/3 is no integer: prev(k) skips the listed k
    assert ddim_grid(s, 10, "linspace").shape == (10, 2)


def test_ddim_grid_errors():
    s = NAMED_SCHEDULES["sd"]
    with pytest.raises(ValueError, match="n=1001 cannot exceed"):
        ddim_grid(s, 1001)
    with pytest.raises(ValueError, match="^n=0 must be a positive integer$"):
        ddim_grid(s, 0)
    with pytest.raises(ValueError, match="spacing='middle' is not supported"):
        ddim_grid(s, 10, "middle")
    with pytest.raises(ValueError, match="steps_offset=-1"):
        ddim_grid(s, 10, steps_offset=-1)
    with pytest.raises(ValueError, match="takes no step that moves"):
        ddim_grid(s, 1, set_alpha_to_one=False)
    with pytest.raises(ValueError, match="outside \\[0, 999\\]"):
        ddim_grid(s, 1, steps_offset=1000)
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        uniform_grid(0)
    with pytest.raises(ValueError, match="t_start and t_end must differ"):
        uniform_grid(3, 0.5, 0.5)
    with pytest.raises(ValueError, match="t_end must lie in \\[0, 1\\]"):
        uniform_grid(3, 0.0, 2.0)
    with pytest.raises(ValueError, match=r"shift=0 must be a number in \[0.001, 1000\]"):
        shift_grid(3, 0)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "velocity"])
def test_fm_grids_start_where_a_converted_network_was_trained(prediction_type):
    """Unset, t_start is timestep T-1's FM time (SD's: 0.064): below it the network never saw the noise level,
    and an epsilon network's velocity magnifies its error 1/t times. Under zero terminal SNR that time is 0,
    where epsilon has no velocity: the grid starts at timestep T-2."""
    s = NAMED_SCHEDULES["sd"]
    assert s.t_min == pytest.approx(0.0640, abs=1e-4)
    assert torch.equal(sampling_grid("uniform", 4, s, prediction_type), uniform_grid(4, s.t_min, 1.0))
    assert torch.equal(sampling_grid("shift", 4, s, prediction_type, shift=2.0), shift_grid(4, 2.0, s.t_min))
    zero_snr = s.with_zero_terminal_snr()
    start = zero_snr.taus[-2] if prediction_type == "epsilon" else 0.0
    assert float(sampling_grid("uniform", 4, zero_snr, prediction_type)[0]) == start


def test_sampling_grid_names_the_grids():
    s = NAMED_SCHEDULES["sd"]
    assert torch.equal(sampling_grid("uniform", 4, s, "v_prediction", t_start=0.0), uniform_grid(4))
    assert torch.equal(sampling_grid("shift", 4, s, "sample", shift=2.0, t_start=0.3), shift_grid(4, 2.0, 0.3))
    assert torch.equal(sampling_grid("ddim", 5, s, "epsilon"), ddim_grid(s, 5, "leading", 1, True))
    rule = dict(spacing="trailing", steps_offset=0, set_alpha_to_one=False)
    assert torch.equal(sampling_grid("ddim", 3, s, "epsilon", **rule), ddim_grid(s, 3, "trailing", 0, False))
    with pytest.raises(
        ValueError, match="^grid='ddim' needs a converted model; a naive-FM model samples on grid='uniform'$"
    ):
        sampling_grid("ddim", 5, s, "velocity")
    assert torch.equal(sampling_grid("shift", 4, s, "v_prediction", t_start=0.3), shift_grid(4, 3.0, 0.3))  # SD3's
    with pytest.raises(ValueError, match="grid='karras' is not supported"):
        sampling_grid("karras", 5, s, "epsilon")


def test_grid_steps_takes_a_table_of_one_step_and_names_what_it_refuses():
    assert grid_steps(torch.tensor([[0.2, 0.5]], dtype=torch.float64)) == [(0.2, 0.5)]
    cases = [
        (torch.empty(0, 2), "ts must be a 1-D grid of >= 2 times or an (n, 2) table of steps, got shape (0, 2)"),
        ([0.5, 1.5], "ts must lie in [0, 1], got tensor([0.5, 1.5], dtype=torch.float64)"),
        (
            [0.5, 0.5],
            "ts must be strictly monotone (all steps the same direction, none empty), got "
            "tensor([0.5, 0.5], dtype=torch.float64)",
        ),
        (
            torch.tensor([0.0, 1.0], dtype=torch.complex64),
            "ts must be real, got tensor([0j, (1+0j)], dtype=torch.complex64)",
        ),
    ]
    for ts, message in cases:
        with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
            grid_steps(ts)
