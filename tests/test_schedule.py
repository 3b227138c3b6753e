import json
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from d2f import Schedule, alpha_sigma
from strategies import NAMED_SCHEDULES, schedules, unit_times


def test_sd_reference_values():
    """Math notes §2: SD's scaled_linear gives tau_0 = 0.97165946 and tau_999 = 0.06404246."""
    s = Schedule.scaled_linear()
    assert s.taus[0] == pytest.approx(0.97165946, abs=5e-9)
    assert s.taus[-1] == pytest.approx(0.06404246, abs=5e-9)
    assert s.t_min == s.taus[-1]


@given(schedules)
def test_tau_is_sigmoid_of_half_logsnr_and_strictly_decreasing(s):
    ac = s.alphas_cumprod
    positive = ac > 0
    logsnr = np.log(ac[positive] / (1 - ac[positive]))
    np.testing.assert_allclose(s.taus[positive], 1 / (1 + np.exp(-logsnr / 2)), rtol=1e-12, atol=1e-15)
    assert np.all(np.diff(s.taus) < 0)


@given(schedules)
def test_timestep_is_exact_on_the_extended_grid(s):
    T = s.num_train_timesteps
    k = s.timestep(torch.from_numpy(s.taus.copy()))
    np.testing.assert_allclose(k.numpy(), np.arange(T), atol=1e-9 * T)
    assert float(s.timestep(1.0)) == -1.0
    assert float(s.timestep(0.0)) == (T - 1 if s.zero_terminal_snr else T)
    assert s.zero_terminal_snr == (s.t_min == 0.0)


@given(schedules, st.lists(unit_times, min_size=1, max_size=16))
def test_fm_time_inverts_timestep(s, ts):
    t = torch.tensor(ts, dtype=torch.float64)
    np.testing.assert_allclose(s.fm_time(s.timestep(t)).numpy(), ts, atol=1e-12)


@given(schedules, st.floats(0.0, 1.0))
def test_timestep_inverts_fm_time(s, frac):
    k_max = s.num_train_timesteps - (1 if s.zero_terminal_snr else 0)
    k = -1 + frac * (k_max + 1)
    assert float(s.timestep(s.fm_time(k))) == pytest.approx(k, abs=1e-8 * (k_max + 2))


@given(schedules)
def test_timestep_is_continuous_and_strictly_monotone(s):
    t = torch.linspace(0, 1, 4001, dtype=torch.float64)
    k = s.timestep(t)
    assert bool((k.diff() < 0).all())
    # Continuity: no jump larger than the steepest segment's slope allows.
    tau_ext = np.concatenate([[1.0], s.taus, [0.0] if s.t_min > 0 else []])
    max_slope = float(np.max(1 / -np.diff(tau_ext)))
    assert float(k.diff().abs().max()) <= max_slope * float(t[1] - t[0]) * (1 + 1e-9)


def test_extrapolated_ends_map_outside_the_trained_range():
    """t below t_min maps to k in (T-1, T]; t above tau_0 maps to k in [-1, 0): not clamped."""
    s = Schedule.scaled_linear()
    assert 999 < float(s.timestep(s.t_min / 2)) < 1000
    assert -1 < float(s.timestep((1 + s.taus[0]) / 2)) < 0


@given(schedules)
def test_alpha_sigma_equal_the_table_at_grid_points(s):
    a, sg = alpha_sigma(torch.from_numpy(s.taus.copy()))
    np.testing.assert_allclose(a.numpy(), np.sqrt(s.alphas_cumprod), atol=1e-12)
    np.testing.assert_allclose(sg.numpy(), np.sqrt(1 - s.alphas_cumprod), atol=1e-12)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("zero_snr", [False, True])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_from_diffusers_matches_diffusers_table(beta_schedule, zero_snr, prediction_type):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_schedule=beta_schedule, rescale_betas_zero_snr=zero_snr, prediction_type=prediction_type)
    for source in (sched, sched.config, dict(sched.config)):
        s = Schedule.from_diffusers(source)
        # diffusers builds its table in float32; d2f rebuilds it in float64.
        np.testing.assert_allclose(s.alphas_cumprod, sched.alphas_cumprod.numpy(), atol=2e-6)
        assert s.prediction_type == prediction_type
        assert s.zero_terminal_snr == zero_snr


def test_from_diffusers_trained_betas_and_constructors_agree():
    betas = np.linspace(1e-4, 0.02, 1000)
    assert Schedule.from_diffusers({"trained_betas": betas.tolist()}) == Schedule.linear()
    assert Schedule.from_betas(betas) == Schedule.linear()
    sd = Schedule.from_diffusers({"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012})
    assert sd == Schedule.scaled_linear()
    # a VP table with sigma keys beside it (Euler's config, written by hand without trained_betas) is still a VP table
    euler = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "sigma_max": None}
    assert Schedule.from_diffusers(euler) == Schedule.scaled_linear()
    assert (
        Schedule.from_diffusers({"trained_betas": betas.tolist(), "shift": 1.0}) == Schedule.linear()
    )  # so is a table
    assert Schedule.from_diffusers({}) == Schedule.linear()  # diffusers' defaults: linear, 1000 steps, 1e-4 to 0.02
    assert Schedule.from_diffusers({"num_train_timesteps": 500}) == Schedule.linear(500)
    assert Schedule.from_diffusers(
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 500}
    ) == Schedule.cosine(500)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"_class_name": "KarrasVeScheduler", "sigma_min": 0.02, "sigma_max": 100}, "KarrasVeScheduler"),
        ({"_class_name": "ScoreSdeVeScheduler", "sigma_max": 1348.0}, "ScoreSdeVeScheduler"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0}, "already flow matching"),
        ({"_class_name": "FlowMatchEulerDiscreteScheduler"}, "already flow matching"),  # by its name alone
        ({"beta_schedule": "scaled_linear", "use_karras_sigmas": True}, "use_karras_sigmas"),
        (
            {"beta_schedule": "linear", "use_exponential_sigmas": True},
            "^scheduler 'dict' sets use_exponential_sigmas=True",
        ),
        ({"beta_schedule": "linear", "use_beta_sigmas": True}, "^scheduler 'dict' sets use_beta_sigmas=True"),
        ({"shift": 3.0}, "^scheduler 'dict' has no VP alphas_cumprod table"),  # a config's shift: flow matching
        ({"trained_betas": [0.1, 0.2], "num_train_timesteps": 0}, "^num_train_timesteps=0 must be a positive integer"),
        ({"beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
        ({"beta_schedule": "linear", "prediction_type": "flow"}, "prediction_type='flow'"),
    ],
)
def test_from_diffusers_refuses_unsupported(config, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_diffusers(config)


@given(schedules)
def test_dict_round_trip_through_json_is_exact(s):
    again = Schedule.from_dict(json.loads(json.dumps(s.to_dict())))
    assert again == s and hash(again) == hash(s)
    assert np.array_equal(again.alphas_cumprod, s.alphas_cumprod)


def test_a_schedule_names_an_unknown_prediction_type():
    with pytest.raises(ValueError, match="^prediction_type='x0' is not supported; allowed: "):
        Schedule([0.9, 0.5], "x0")


def test_the_table_is_a_float64_copy_of_what_was_given():
    narrow = np.array([0.9, 0.5, 0.1], dtype=np.float32)
    assert Schedule(narrow).alphas_cumprod.dtype == np.float64
    given = np.array([0.9, 0.5, 0.1])
    s = Schedule(given)
    given[0] = 0.95  # the caller's array stays theirs: writable, and not the schedule's table
    assert s.alphas_cumprod[0] == 0.9


def test_a_schedules_tables_are_read_only():
    s = Schedule.scaled_linear()
    for table in (s.alphas_cumprod, s.taus):
        with pytest.raises(ValueError, match="read-only"):
            table[0] = 0.5


@pytest.mark.parametrize("as_given", [lambda b: b.astype(np.float32), lambda b: torch.from_numpy(b).float()])
def test_betas_of_a_narrower_dtype_are_multiplied_out_in_float64(as_given):
    narrow = as_given(np.linspace(1e-4, 0.02, 1000))
    wide = np.asarray(narrow, dtype=np.float64)
    # float32 products drift from float64 ones by about 1e-5 relative over 1000 factors
    np.testing.assert_array_equal(Schedule.from_betas(narrow).alphas_cumprod, np.cumprod(1 - wide))


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: d.update(extra=1), "^schedule: unknown key 'extra'$"),
        (lambda d: d.update(alphas_cumprd=[0.5]), "key 'alphas_cumprd' \\(did you mean 'alphas_cumprod'\\?\\)$"),
        (lambda d: d.pop("alphas_cumprod"), "missing keys \\[.alphas_cumprod.\\]"),
        (lambda d: d.update(version=99), "version 99"),
        (lambda d: d.update(format="other"), "'other'"),
    ],
)
def test_from_dict_refuses_foreign_dicts(mutate, message):
    d = Schedule.scaled_linear().to_dict()
    mutate(d)
    with pytest.raises(ValueError, match=message):
        Schedule.from_dict(d)


@pytest.mark.parametrize(
    "table, message",
    [
        ([0.9, 0.95, 0.5], "strictly decreasing; alphas_cumprod\\[0\\]=0.9 <= alphas_cumprod\\[1\\]=0.95$"),
        ([0.9, 0.5, 0.5, 0.1], "strictly decreasing; alphas_cumprod\\[1\\]=0.5 <= alphas_cumprod\\[2\\]=0.5$"),
        ([1.0, 0.5, 0.2], "lie in \\[0, 1\\) .*; got first=1.0, last=0.2$"),
        ([0.9, 0.5, -0.1], "lie in \\[0, 1\\) .*; got first=0.9, last=-0.1$"),
        ([0.9, math.nan], "finite; entry 1"),
        ([[0.9, 0.5]], "1-D"),
        ([], "non-empty"),
    ],
)
def test_bad_tables_are_refused(table, message):
    with pytest.raises(ValueError, match=message):
        Schedule.from_alphas_cumprod(table)


@pytest.mark.parametrize("make", [Schedule.linear, Schedule.scaled_linear, Schedule.cosine])
@pytest.mark.parametrize("value", ["no", "false", 1, None])
def test_zero_terminal_snr_must_be_a_bool(make, value):
    """A string such as 'no' is truthy: taken as given it would rescale the schedule."""
    with pytest.raises(ValueError, match=re.escape(f"zero_terminal_snr={value!r} must be True or False")):
        make(zero_terminal_snr=value)


@pytest.mark.parametrize("value", ["false", "no", 0, None])
def test_from_diffusers_rescale_betas_zero_snr_must_be_a_bool(value):
    with pytest.raises(ValueError, match=re.escape(f"rescale_betas_zero_snr={value!r} must be True or False")):
        Schedule.from_diffusers({"beta_schedule": "linear", "rescale_betas_zero_snr": value})


@pytest.mark.parametrize(
    "betas, bad",
    [
        ([0.1, math.nan], "[1]=nan"),
        ([0.1, math.inf], "[1]=inf"),
        ([0.1, 0.0], "[1]=0.0"),
        ([-0.1, 0.1], "[0]=-0.1"),
        ([1.0, 0.1], "[0]=1.0"),  # only the last beta may be 1
        ([0.1, 1.5], "[1]=1.5"),
    ],
)
@pytest.mark.parametrize("source", ["from_betas", "from_diffusers"])
def test_bad_betas_are_refused_by_name_and_entry(betas, bad, source):
    name = "betas" if source == "from_betas" else "trained_betas"
    message = f"{name} must be in (0, 1), the last one may be 1 (zero terminal SNR); {name}{bad}"
    with pytest.raises(ValueError, match=re.escape(message)):
        if source == "from_betas":
            Schedule.from_betas(betas)
        else:
            Schedule.from_diffusers({"trained_betas": betas, "num_train_timesteps": 2})


def test_trained_betas_must_be_one_table_as_long_as_num_train_timesteps():
    betas = np.linspace(1e-4, 0.02, 12)
    want = Schedule.from_betas(betas)
    for table in (betas, betas.tolist(), torch.from_numpy(betas)):
        assert Schedule.from_diffusers({"trained_betas": table, "num_train_timesteps": 12}) == want
    assert Schedule.from_betas([0.1, 1.0]).zero_terminal_snr  # a last beta of 1 is zero terminal SNR
    for table, shape in ((betas.reshape(3, 4), (3, 4)), (0.1, ()), ([], (0,))):
        message = f"trained_betas must be a non-empty 1-D table of betas, got shape {shape}"
        with pytest.raises(ValueError, match=re.escape(message)):
            Schedule.from_diffusers({"trained_betas": table})
    with pytest.raises(ValueError, match=re.escape("trained_betas must be a 1-D table of numbers, got [[0.1], [0.2")):
        Schedule.from_diffusers({"trained_betas": [[0.1], [0.2, 0.3]]})
    with pytest.raises(ValueError, match=re.escape("trained_betas must be real, got array([0.1+0.5j, 0.2+0.j ])")):
        Schedule.from_diffusers({"trained_betas": np.array([0.1 + 0.5j, 0.2])})
    # diffusers' DDIMScheduler would take the table's 12 entries and drop num_train_timesteps silently
    message = "num_train_timesteps=1000 disagrees with trained_betas, which has 12 entries; pass num_train_timesteps=12"
    with pytest.raises(ValueError, match=message):
        Schedule.from_diffusers({"trained_betas": betas.tolist(), "num_train_timesteps": 1000})


def test_bad_betas_and_times_are_refused():
    with pytest.raises(ValueError, match="betas must be"):
        Schedule.from_betas([0.1, 0.0])
    s = Schedule.scaled_linear()
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]; got 1.5"):
        s.timestep(1.5)
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]; got nan"):
        s.timestep(torch.tensor([0.5, math.nan]))
    with pytest.raises(ValueError, match="k must lie in \\[-1, 1000\\] for this schedule; got 1000.5$"):
        s.fm_time(1000.5)
    for make in (Schedule.linear, Schedule.scaled_linear, Schedule.cosine):
        with pytest.raises(ValueError, match="^num_train_timesteps=0 must be a positive integer$"):
            make(0)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: Schedule.linear(beta_start="0.1"), "beta_start='0.1' must be a number in (0, 1)"),
        (lambda: Schedule.linear(beta_end=math.nan), "beta_end=nan must be a number in (0, 1)"),
        (lambda: Schedule.scaled_linear(beta_end=1.0), "beta_end=1.0 must be a number in (0, 1)"),
        (lambda: Schedule.scaled_linear(beta_start=0), "beta_start=0 must be a number in (0, 1)"),
        # min(beta, nan) is beta: a NaN cap would otherwise vanish
        (lambda: Schedule.cosine(max_beta=math.nan), "max_beta=nan must be a number in (0, 1]"),
        (lambda: Schedule.cosine(max_beta=2.0), "max_beta=2.0 must be a number in (0, 1]"),
        (lambda: Schedule.cosine(max_beta=0.0), "max_beta=0.0 must be a number in (0, 1]"),
        (lambda: Schedule.from_diffusers({"beta_schedule": "linear", "beta_start": "1e-4"}), "beta_start='1e-4'"),
    ],
)
def test_constructor_numbers_are_refused_by_name(make, message):
    with pytest.raises(ValueError, match="^" + re.escape(message)):
        make()


def test_constructors_defaults_and_what_a_schedule_keeps():
    """The constructors' defaults are diffusers' (1000 steps, no zero terminal SNR); the prediction type survives
    every way a schedule is rebuilt, and it is part of equality, as the table is."""
    assert Schedule.cosine() == Schedule.from_diffusers({"beta_schedule": "squaredcos_cap_v2"})
    assert Schedule.cosine().num_train_timesteps == 1000 and not Schedule.cosine().zero_terminal_snr
    assert Schedule.cosine(max_beta=1.0).alphas_cumprod[-1] == 0  # the cap's closed end: a last beta of 1 is kept
    v = Schedule.linear(prediction_type="v_prediction")
    assert Schedule.from_alphas_cumprod(v.alphas_cumprod, "v_prediction") == v
    assert Schedule.from_dict(json.loads(json.dumps(v.to_dict()))) == v
    assert v.with_zero_terminal_snr() == Schedule.linear(zero_terminal_snr=True, prediction_type="v_prediction")
    assert v != Schedule.linear(prediction_type="epsilon") and Schedule.linear() != Schedule.scaled_linear()
    two = Schedule.from_betas([0.1, 0.2])
    assert two.with_zero_terminal_snr().zero_terminal_snr  # two steps suffice: the first is kept, the last is 0
    with pytest.raises(ValueError, match="^zero_terminal_snr needs num_train_timesteps >= 2$"):
        Schedule.from_betas([0.1]).with_zero_terminal_snr()


def test_schedule_is_immutable():
    s = NAMED_SCHEDULES["sd"]
    with pytest.raises(AttributeError):
        s.foo = 1
    with pytest.raises(ValueError):
        s.alphas_cumprod[0] = 0.5
    assert "t_min=0.0640425" in repr(s)


def test_dtypes_of_the_time_map():
    s = NAMED_SCHEDULES["sd"]
    assert s.timestep(0.5).dtype == torch.float64
    assert s.timestep(torch.tensor([0.5], dtype=torch.float32)).dtype == torch.float32
    assert s.timestep(torch.tensor([0.5], dtype=torch.float16)).dtype == torch.float32
    assert s.fm_time(torch.tensor([3])).dtype == torch.float32
    assert s.fm_time(3).dtype == torch.float64


def test_diffusers_builds_the_same_schedule_from_diffusers_config():
    """Of 500 steps, not diffusers' default 1000: its set_timesteps spaces the grid by num_train_timesteps."""
    from diffusers import DDIMScheduler

    s = Schedule.linear(500, 1e-4, 0.02, prediction_type="v_prediction")
    scheduler = DDIMScheduler.from_config(s.diffusers_config())
    assert scheduler.config.num_train_timesteps == 500 and scheduler.config.prediction_type == "v_prediction"
    np.testing.assert_allclose(scheduler.alphas_cumprod.double().numpy(), s.alphas_cumprod, rtol=1e-6)


@given(schedules, st.sampled_from([None, "epsilon", "v_prediction", "sample"]))
def test_diffusers_config_is_the_inverse_of_from_diffusers(s, prediction_type):
    """Through ``trained_betas``: each ``1 - beta_k = ab_k / ab_{k-1}`` comes back with an absolute error of a
    few float64 epsilons, so a relative error of about ``eps / ratio`` per step, accumulated along the table."""
    s = Schedule(s.alphas_cumprod, prediction_type)
    again = Schedule.from_diffusers(s.diffusers_config())
    assert again.prediction_type == prediction_type
    ac = s.alphas_cumprod
    ratios = ac / np.concatenate([[1.0], ac[:-1]])
    bound = 4 * np.finfo(np.float64).eps * np.cumsum(1 / np.maximum(ratios, 1e-300))
    assert np.all(np.abs(again.alphas_cumprod - ac) <= bound * ac), (again.alphas_cumprod, ac)
