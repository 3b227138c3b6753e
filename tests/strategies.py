"""Hypothesis strategies shared by the tests: schedules, FM times, shapes and dtypes."""

import numpy as np
import torch
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from d2f import Schedule

NAMED_SCHEDULES = {
    "sd": Schedule.scaled_linear(),
    "sd_zero_snr": Schedule.scaled_linear(zero_terminal_snr=True),
    "cosine": Schedule.cosine(),
    "linear": Schedule.linear(),
    "linear_zero_snr": Schedule.linear(zero_terminal_snr=True),
}


@st.composite
def random_schedules(draw):
    T = draw(st.integers(2, 64))
    betas = draw(arrays(np.float64, T, elements=st.floats(1e-4, 0.3)))
    zero_snr = draw(st.booleans())
    return Schedule.from_diffusers({"trained_betas": betas.tolist(), "rescale_betas_zero_snr": zero_snr})


schedules = st.one_of(st.sampled_from(list(NAMED_SCHEDULES.values())), random_schedules())

# Times strictly inside (0, 1), away from the ends where epsilon/sample are singular.
inner_times = st.floats(1e-3, 1 - 1e-3)
unit_times = st.floats(0.0, 1.0)
shapes = st.lists(st.integers(1, 5), min_size=1, max_size=4).map(tuple)
float_dtypes = st.sampled_from([torch.float32, torch.float64])


def tensor(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
