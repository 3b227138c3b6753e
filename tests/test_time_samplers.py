import math

import numpy as np
import pytest
import torch

from d2f import PREDICTION_TYPES, Schedule
from d2f.parametrization import T_MARGIN, valid_range
from d2f.time_samplers import (
    T_SAMPLERS,
    diffusion_matched_t,
    logit_normal_t,
    lowest_t,
    sample_t,
    uniform_t,
    uniform_timestep,
)
from d2f.training.draws import normals, uniforms

N = 20000
# Kolmogorov-Smirnov: with N = 20000 draws the 0.1 % critical value is 1.95 / sqrt(N) = 0.0138.
KS_CRITICAL = 1.95 / math.sqrt(N)


def ks_statistic(samples: torch.Tensor, cdf) -> float:
    x = np.sort(samples.numpy())
    theory = cdf(x)
    ranks = np.arange(1, x.size + 1) / x.size
    return float(max(np.max(ranks - theory), np.max(theory - (ranks - 1 / x.size))))


def u(seed=0, n=N):
    """The trainer's own uniform draws (Philox, d2f.training.draws): the samplers are tested on what they get."""
    return uniforms(seed, torch.arange(n), 1, 1)[:, 0]


def z(seed=0, n=N):
    return normals(seed, torch.arange(n), 2, 1)[:, 0]


def test_valid_ranges_keep_away_from_singular_ends():
    assert valid_range("epsilon") == (T_MARGIN, 1.0)
    assert valid_range("sample") == (0.0, 1 - T_MARGIN)
    assert valid_range("v_prediction") == (0.0, 1.0) == valid_range("velocity")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_uniform_matches_its_density(prediction_type):
    lo, hi = valid_range(prediction_type)
    t = uniform_t(u(), prediction_type)
    assert t.dtype == torch.float64 and float(t.min()) >= lo and float(t.max()) <= hi
    assert ks_statistic(t, lambda x: (x - lo) / (hi - lo)) < KS_CRITICAL


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_logit_normal_matches_its_density(prediction_type):
    lo, hi = valid_range(prediction_type)
    t = logit_normal_t(z(1), prediction_type)
    assert float(t.min()) >= lo and float(t.max()) <= hi
    normal_cdf = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))
    assert ks_statistic(t, lambda x: normal_cdf(np.log(x / (1 - x)))) < KS_CRITICAL


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_diffusion_matched_draws_the_teachers_noise_levels_uniformly(zero_snr, prediction_type):
    schedule = Schedule.linear(10, 0.01, 0.3, zero_terminal_snr=zero_snr)
    t = diffusion_matched_t(u(2), prediction_type, schedule)
    support = schedule.taus if not (zero_snr and prediction_type == "epsilon") else schedule.taus[:-1]
    values, counts = np.unique(t.numpy(), return_counts=True)
    np.testing.assert_array_equal(np.sort(values), np.sort(support))
    expected = N / support.size
    # Each count is Binomial(N, 1/K): 5 standard deviations is far beyond chance.
    assert np.all(np.abs(counts - expected) < 5 * math.sqrt(expected))
    if prediction_type == "epsilon":
        assert float(t.min()) > 0


def test_sample_t_dispatch_and_errors():
    assert sample_t("uniform", u(n=3), z(n=3), "epsilon").shape == (3,)
    torch.testing.assert_close(sample_t("logit-normal", u(n=3), z(n=3), "v_prediction"), torch.sigmoid(z(n=3).double()))
    with pytest.raises(ValueError, match="t_sampler='beta' is not supported"):
        sample_t("beta", u(n=3), z(n=3), "epsilon")
    with pytest.raises(ValueError, match="^t_sampler='diffusion-matched' needs the teacher's schedule$"):
        sample_t("diffusion-matched", u(n=3), z(n=3), "epsilon")


def test_uniform_timestep_covers_every_k_and_no_other():
    k = uniform_timestep(torch.tensor([0.0, 0.5, 1 - 2.0**-25, 0.999]), 1000)
    assert k.tolist() == [0, 500, 999, 999] and k.dtype == torch.int64


@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("name", T_SAMPLERS)
def test_lowest_t_is_the_low_end_of_what_each_sampler_draws(name, prediction_type, zero_snr):
    """No draw falls below lowest_t; uniform comes within 1e-3 of it and diffusion-matched reaches it (its ten
    levels all drawn); logit-normal reaches it only through its clamp."""
    schedule = Schedule.linear(10, 0.01, 0.3, zero_terminal_snr=zero_snr)
    low = lowest_t(name, prediction_type, schedule)
    t = sample_t(name, u(4), z(4), prediction_type, schedule)
    assert float(t.min()) >= low
    if name == "uniform":
        assert float(t.min()) - low < 1e-3
    if name == "diffusion-matched":
        assert float(t.min()) == low
        assert low > 0 if prediction_type == "epsilon" else low == schedule.t_min


def test_logit_normal_clamps_to_the_valid_range_at_both_ends():
    """sigmoid(-800) and sigmoid(800) are 0 and 1 in float64: each end lands on the range's bound."""
    for prediction_type in PREDICTION_TYPES:
        lo, hi = valid_range(prediction_type)
        assert logit_normal_t(torch.tensor([-800.0, 0.0, 800.0]), prediction_type).tolist() == [lo, 0.5, hi]
    with pytest.raises(ValueError, match="^t_sampler='beta' is not supported"):
        lowest_t("beta", "epsilon", Schedule.linear(10, 0.01, 0.3))
