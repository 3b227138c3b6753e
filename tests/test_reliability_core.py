"""Odd inputs to the core API (RELIABILITY.md §3): the schedule's grids, the conversion helpers, D2FVelocity, the
solvers and D2FScheduler. A bad input raises a ``ValueError`` naming the argument, its value and what is allowed
(never a bare ``TypeError`` from deep inside, a silent coercion or a NaN); an odd but valid one (a numpy scalar, a
per-sample timestep of equal entries) gives exactly what its plain number gives."""

import math
import re
import warnings

import numpy as np
import pytest
import torch

from d2f import (
    D2FVelocity,
    Schedule,
    align,
    alpha_sigma,
    ddim_grid,
    diffusion_to_velocity,
    fm_loss,
    guidance,
    interpolate,
    network_input,
    sample,
    sampling_grid,
    scale,
    uniform_grid,
    velocity_coefficients,
    velocity_to_diffusion,
)
from d2f._backend import device_or_default
from d2f.scheduler import D2FScheduler
from d2f.solvers import SOLVERS
from nets import TinyNet
from strategies import tensor

SD = Schedule.scaled_linear(prediction_type="epsilon")
SD_V = Schedule.scaled_linear(prediction_type="v_prediction")
X = tensor((2, 3, 4, 4), seed=1).float()
O = tensor((2, 3, 4, 4), seed=2).float()


def tiny_field(net=None, schedule=SD, prediction_type="epsilon", **kwargs):
    return D2FVelocity(net or TinyNet().requires_grad_(False), schedule, prediction_type, **kwargs)


def ready(steps=5, **config):
    scheduler = D2FScheduler(**config)
    scheduler.set_timesteps(steps)
    return scheduler


def refused(match, call, error=ValueError):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------ 11e: D2FScheduler's numeric config keys
NUMERIC_KEYS = [
    *(("clip_sample_range", v, "be a finite number > 0") for v in (math.nan, math.inf, "1", True, 0, -1.0)),
    *(("sample_max_value", v, "be a finite number >= 1") for v in (math.nan, math.inf, "1", True, 0.5)),
    *(("dynamic_thresholding_ratio", v, "lie in (0, 1)") for v in (math.nan, "0.9", True, 1.0, 0)),
    *(("shift", v, "be a number in [0.001, 1000]") for v in (math.nan, math.inf, "3", True, 0)),
    *(("steps_offset", v, "be an integer >= 0") for v in (-1, 1.5, "1", True)),
    *(("beta_start", v, "be a finite number") for v in (math.nan, "0.0001", None)),
    *(("beta_end", v, "be a finite number") for v in (math.inf, "0.012")),
    ("t_min", np.nan, "be None (a converted network's) or an FM time in [0, 1)"),
]


@pytest.mark.parametrize("route", ["constructor", "from_config"])
@pytest.mark.parametrize("key, value, rule", NUMERIC_KEYS)
def test_numeric_config_keys_are_refused_by_name(key, value, rule, route):
    """clip_sample_range=nan and sample_max_value=nan were taken (NaN clipping bounds), a string raised a bare
    TypeError from a comparison, shift and steps_offset were read only by set_timesteps (or never)."""
    with pytest.raises(ValueError, match="^" + re.escape(f"{key}={value!r} must {rule}")):
        if route == "constructor":
            D2FScheduler(**{key: value})
        else:
            D2FScheduler.from_config({"_class_name": "DDIMScheduler", key: value})  # a scheduler_config.json


def test_numpy_scalars_in_the_config_are_their_numbers():
    """t_min=np.float32(0.1) was refused (not a Python float) while clip_sample_range=np.float32(2) was taken."""
    t_min = np.float32(0.1)
    plain = ready(4, grid="uniform", t_min=float(t_min))
    numpy = ready(4, grid="uniform", t_min=t_min, clip_sample_range=np.float32(2.0), shift=np.float64(2.0))
    assert torch.equal(numpy.timesteps, plain.timesteps)


# --------------------------------------------------------------------- 12a: t that requires grad, everywhere
T_FUNCTIONS = {
    "diffusion_to_velocity": lambda t: diffusion_to_velocity(O, X, t, "epsilon"),
    "velocity_to_diffusion": lambda t: velocity_to_diffusion(O, X, t, "epsilon"),
    "velocity_coefficients": lambda t: velocity_coefficients(t, "v_prediction"),
    "align": lambda t: align(X, t),
    "interpolate": lambda t: interpolate(X, O, t),
    "network_input": lambda t: network_input(X, O, t),
    "alpha_sigma": lambda t: alpha_sigma(t),
    "scale": lambda t: scale(t),
    "Schedule.timestep": lambda t: SD.timestep(t),
    "D2FVelocity": lambda t: tiny_field()(X, t),
    "D2FVelocity.model_output": lambda t: tiny_field().model_output(X, t),
    "fm_loss": lambda t: fm_loss(O, X, X, t, "epsilon"),
}


@pytest.mark.parametrize("function", list(T_FUNCTIONS))
def test_a_t_that_requires_grad_is_refused_as_fm_loss_refuses_it(function):
    """diffusion_to_velocity (and every helper) detached such a t without a word, while fm_loss refused it: no
    d2f function differentiates with respect to t (its coefficients come from a float64 copy)."""
    t = torch.full((2,), 0.5, requires_grad=True)
    refused(r"^t requires grad, but .*; detach it", lambda: T_FUNCTIONS[function](t))
    T_FUNCTIONS[function](t.detach())  # the same t without grad is fine


def test_other_per_sample_numbers_that_require_grad_are_refused_by_name():
    refused(r"^scale requires grad, but .*; detach it", lambda: guidance(O, X, torch.tensor(2.0, requires_grad=True)))
    refused(r"^k requires grad, but .*; detach it", lambda: SD.fm_time(torch.tensor(5.0, requires_grad=True)))


# ----------------------------------------------------------------------------- 12b: booleans of the grids
@pytest.mark.parametrize("value", ["no", "False", 0, 1, None, np.bool_(True)])
@pytest.mark.parametrize("route", ["ddim_grid", "sampling_grid", "D2FVelocity.grid"])
def test_set_alpha_to_one_must_be_a_bool(value, route):
    """ddim_grid(..., set_alpha_to_one="no") ended at t = 1 (a truthy string), where D2FScheduler refuses it."""
    calls = {
        "ddim_grid": lambda: ddim_grid(SD, 10, set_alpha_to_one=value),
        "sampling_grid": lambda: sampling_grid("ddim", 10, SD, "epsilon", set_alpha_to_one=value),
        "D2FVelocity.grid": lambda: tiny_field().grid("ddim", 10, set_alpha_to_one=value),
    }
    refused("^" + re.escape(f"set_alpha_to_one={value!r} must be True or False") + "$", calls[route])


# ------------------------------------------------------------------------------- 12c: a complex velocity
def complex_at(evaluation):
    """dx/dt = -x, whose ``evaluation``-th evaluation (from 1) returns it as a complex tensor."""
    times = []

    def field(x, t):
        times.append(t)
        return torch.complex(-x, -x) if len(times) == evaluation else -x

    field.singular_times = ()
    return field, times


@pytest.mark.parametrize("callback", [None, lambda i, t, x, u: None], ids=["no-callback", "callback"])
@pytest.mark.parametrize("evaluation", [1, 2, 3])
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_complex_velocity_is_refused_naming_its_step_and_time(solver, evaluation, callback):
    """The solvers cast a complex velocity to the state's dtype, dropping its imaginary part without a word."""
    field, times = complex_at(evaluation)
    ts = [0.2, 0.5, 0.8, 0.9]
    per_step = 2 if solver in ("heun", "midpoint") else 1
    step = (evaluation - 1) // per_step  # from 0
    where = f"sample: step {step + 1} of 3 ({solver}, t {ts[step]:.6g} -> {ts[step + 1]:.6g})"
    with pytest.raises(ValueError) as caught:
        sample(field, X, ts, solver=solver, callback=callback)
    assert str(caught.value) == (
        f"{where}: velocity_fn returned a complex tensor (torch.complex64) at t={times[-1]!r}; a velocity must be real"
    )


@pytest.mark.parametrize("path", ["D2FVelocity.sample", "d2f.sample with a callback", "D2FVelocity()"])
def test_a_network_returning_a_complex_tensor_is_refused(path):
    """D2FVelocity cast it to real (a warning from torch at most) or failed inside the update's accumulation."""
    field = tiny_field(lambda z, k: torch.complex(z, z))
    calls = {
        "D2FVelocity.sample": lambda: field.sample(X, [0.2, 1.0]),
        "d2f.sample with a callback": lambda: sample(field, X, [0.2, 1.0], callback=lambda *_: None),
        "D2FVelocity()": lambda: field(X, 0.2),
    }
    step = r"^sample: step 1 of 1 \(euler, t 0.2 -> 1\): " if path != "D2FVelocity()" else "^"
    message = re.escape("the network returned a complex tensor (torch.complex64) at t=0.2; its output must be real")
    refused(step + message + "$", calls[path])


# -------------------------------------------------------------- 12d: the schedule's own prediction type
def test_a_prediction_type_other_than_the_schedules_is_warned_of():
    """A v-prediction pipeline's schedule read as epsilon gave garbage samples without a word."""
    with pytest.warns(UserWarning, match=r"prediction_type='epsilon', but the schedule records 'v_prediction'"):
        tiny_field(schedule=SD_V, prediction_type="epsilon")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_field(schedule=SD_V, prediction_type="v_prediction")
        tiny_field(schedule=Schedule.scaled_linear(), prediction_type="sample")  # the schedule names none
        tiny_field(schedule=SD_V, prediction_type="velocity", align_input=False)  # an FM head on its teacher's


# ---------------------------------------------------------------------------------- the adversarial pass
REFUSED = {
    "t a bool tensor": (
        r"^t must be a number or a tensor of numbers, got dtype torch.bool$",
        lambda: diffusion_to_velocity(O, X, torch.tensor([True, True]), "v_prediction"),
    ),
    "fm_loss weight a bool tensor": (
        r"^weight must be a number or a tensor of numbers, got dtype torch.bool$",
        lambda: fm_loss(O, X, X, 0.5, "epsilon", weight=torch.tensor([True, False])),
    ),
    "t_start a (2,) tensor": (
        r"^t_start must be one FM time, got shape \(2,\)$",
        lambda: uniform_grid(4, torch.tensor([0.1, 0.2])),
    ),
    "sampling_grid of an unknown prediction_type": (
        r"^prediction_type='x0' is not supported",
        lambda: sampling_grid("uniform", 4, SD, "x0", t_start=0.1),
    ),
    "sampling_grid('ddim') of an unknown prediction_type": (
        r"^prediction_type='x0' is not supported",
        lambda: sampling_grid("ddim", 4, SD, "x0"),
    ),
    "sampling_grid of a schedule's name": (
        r"^schedule must be a d2f.Schedule, got str$",
        lambda: sampling_grid("uniform", 4, "sd", "epsilon", t_start=0.1),
    ),
    "model_output on another device": (
        r"^x is on cpu but model_output is on meta; they must be on one device$",
        lambda: diffusion_to_velocity(O.to("meta"), X, 0.5, "epsilon"),
    ),
    "t of 8 samples, one out of range (listed)": (
        r"^t must lie in \[0, 1\]; got 2.0 \(in tensor\(\[0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 2.0\], "
        r"dtype=torch.float64\)\)$",
        lambda: align(torch.zeros(8, 2), torch.tensor([0.5] * 7 + [2.0], dtype=torch.float64)),
    ),
    "t of 9 samples, one out of range (its shape)": (
        r"^t must lie in \[0, 1\]; got 2.0 \(in tensor\(shape=\(9,\), dtype=torch.float64\)\)$",
        lambda: align(torch.zeros(9, 2), torch.tensor([0.5] * 8 + [2.0], dtype=torch.float64)),
    ),
    "concat an array of 8 (listed)": (
        r"^concat must be a \(B, C, ...\) tensor, got array\(\[0., 0., 0., 0., 0., 0., 0., 0.\]\)$",
        lambda: tiny_field(concat=np.zeros(8)),
    ),
    "concat an array of 9 (its shape)": (
        r"^concat must be a \(B, C, ...\) tensor, got ndarray\(shape=\(9,\), dtype=float64\)$",
        lambda: tiny_field(concat=np.zeros(9)),
    ),
    "guidance_scale=True": (
        r"^guidance_scale=True must be a finite number$",
        lambda: tiny_field(guidance_scale=True, uncond={}),
    ),
    "align_input='no'": (r"^align_input='no' must be True or False$", lambda: tiny_field(align_input="no")),
    "t_min=1": (
        r"^t_min=1.0 must be an FM time in \[0, 1\): the lowest time the network was trained at$",
        lambda: tiny_field(t_min=1.0),
    ),
    "uncond a string": (
        r"^uncond must be a mapping of conditioning kwargs \(or None\), got str$",
        lambda: tiny_field(guidance_scale=2.0, uncond="x"),
    ),
    "concat an array": (
        r"^concat must be a \(B, C, ...\) tensor, got ndarray\(shape=\(2, 3, 4, 4\), dtype=float64\)$",
        lambda: tiny_field(concat=np.zeros((2, 3, 4, 4))),
    ),
    "network output on another device": (
        r"^sample: step 1 of 1 .*: the network returned a tensor on meta for an input on cpu$",
        lambda: tiny_field(lambda z, k: z.to("meta")).sample(X, [0.2, 1.0]),
    ),
    "ts=None": (r"^ts must be a grid of FM times \(a tensor, array or list\), got None$", lambda: sample(abs, X, None)),
    "ts a string": (
        r"^ts must be a grid of FM times \(a tensor, array or list\), got '0.2,1'$",
        lambda: tiny_field().sample(X, "0.2,1"),
    ),
    "callback=5": (r"^callback=5 must be callable or None$", lambda: tiny_field().sample(X, [0.2, 1.0], callback=5)),
    "progress='no'": (
        r"^progress='no' must be True or False$",
        lambda: tiny_field().sample(X, [0.2, 1.0], progress="no"),
    ),
    "velocity on another device": (
        r"^sample: step 1 of 1 .*: velocity_fn returned a tensor on meta for a state on cpu$",
        lambda: sample(lambda x, t: x.to("meta"), X, [0.2, 0.5]),
    ),
    "step's sample of batch 1": (
        r"^sample has shape \(1, 3, 4, 4\) but model_output has shape \(2, 3, 4, 4\); they must be equal$",
        lambda: (lambda s: s.step(O, s.timesteps[0], X[:1]))(ready()),
    ),
    "add_noise's noise of batch 1": (
        r"^noise has shape \(1, 3, 4, 4\) but original_samples has shape \(2, 3, 4, 4\); they must be equal$",
        lambda: D2FScheduler().add_noise(X, O[:1], torch.tensor([1, 2])),
    ),
    "sample's backend='gpu'": (
        r"^backend='gpu' is not supported; allowed: 'auto', 'torch', 'triton'$",
        lambda: tiny_field().sample(X, [0.2, 1.0], backend="gpu"),
    ),
    "step's timestep=None": (
        r"^timestep None is not one of this scheduler's timesteps",
        lambda: ready().step(O, None, X),
    ),
    "step's timestep a string": (
        r"^timestep '801' is not one of this scheduler's timesteps",
        lambda: ready().step(O, "801", X),
    ),
    "step's timestep an empty tensor": (
        r"^timestep tensor\(\[\], dtype=torch.float32\) is not one of this scheduler's timesteps",
        lambda: ready().step(O, torch.tensor([]), X),
    ),
    "step's timestep two different ones": (
        r"^timestep tensor\(\[\S+, \S+\], dtype=torch.float32\) is not one of this scheduler's timesteps",
        lambda: (lambda s: s.step(O, s.timesteps[:2], X))(ready()),
    ),
    "step's variance_noise of another shape": (
        r"^variance_noise has shape \(1, 3, 4, 4\) but model_output has shape \(2, 3, 4, 4\); they must be equal$",
        lambda: (lambda s: s.step(O, s.timesteps[0], X, eta=0.5, variance_noise=O[:1]))(ready()),
    ),
    "step's use_clipped_model_output='no'": (
        r"^use_clipped_model_output='no' must be None, True or False$",
        lambda: (lambda s: s.step(O, s.timesteps[0], X, use_clipped_model_output="no"))(ready()),
    ),
    "step's return_dict='no'": (
        r"^return_dict='no' must be True or False$",
        lambda: (lambda s: s.step(O, s.timesteps[0], X, return_dict="no"))(ready()),
    ),
    "set_begin_index(1.0)": (
        r"^begin_index=1.0 must be an integer in \[0, 5\)$",
        lambda: ready().set_begin_index(1.0),
    ),
    "add_noise's timesteps=None": (
        r"^timesteps must be network timesteps \(a number, list, array or tensor\), got None$",
        lambda: D2FScheduler().add_noise(X, O, None),
    ),
    "add_noise's timesteps='late'": (
        r"^timesteps must be network timesteps \(a number, list, array or tensor\), got 'late'$",
        lambda: D2FScheduler().add_noise(X, O, "late"),
    ),
    "add_noise's timesteps a bool tensor": (
        r"^timesteps must be a number or a tensor of numbers, got dtype torch.bool$",
        lambda: D2FScheduler().add_noise(X, O, torch.tensor([True, False])),
    ),
    "add_noise's timesteps requiring grad": (
        r"^timesteps requires grad, but .*; detach it$",
        lambda: D2FScheduler().add_noise(X, O, torch.tensor([1.0, 2.0], requires_grad=True)),
    ),
    "add_noise's timesteps for 3 samples": (
        r"^timesteps has 3 entries but the batch has 2 samples; give one timestep, or one per sample$",
        lambda: D2FScheduler().add_noise(X, O, torch.tensor([1, 2, 3])),
    ),
    "get_velocity's timesteps for 3 samples": (
        r"^timesteps has 3 entries but the batch has 2 samples; give one timestep, or one per sample$",
        lambda: D2FScheduler().get_velocity(X, O, torch.tensor([1, 2, 3])),
    ),
    "get_velocity's noise of batch 1": (
        r"^noise has shape \(1, 3, 4, 4\) but sample has shape \(2, 3, 4, 4\); they must be equal$",
        lambda: D2FScheduler().get_velocity(X, O[:1], torch.tensor([1, 2])),
    ),
    "get_velocity's complex noise": (
        r"^noise must be a real tensor, got dtype torch.complex64$",
        lambda: D2FScheduler().get_velocity(X, torch.complex(O, O), torch.tensor([1, 2])),
    ),
    "get_velocity's sample on another device": (
        r"^noise is on cpu but sample is on meta; they must be on one device$",
        lambda: D2FScheduler().get_velocity(X.to("meta"), O, torch.tensor([1, 2])),
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_odd_inputs_are_refused_by_name(case):
    match, call = REFUSED[case]
    refused(match, call)


def test_odd_but_valid_inputs_give_what_their_plain_numbers_give():
    """A pipeline may hand step() its timestep expanded to the batch, and eta as a numpy scalar."""
    outputs = []
    for timestep, eta in ((None, 0.0), ("batch", np.float32(0.0))):
        scheduler = ready()
        k = scheduler.timesteps[0]
        outputs.append(scheduler.step(O, k if timestep is None else k.expand(2), X, eta=eta).prev_sample)
    assert torch.equal(outputs[0], outputs[1])
    field = tiny_field(t_min=np.float32(0.1))
    assert field.t_min == float(np.float32(0.1))
    assert device_or_default("cpu:0") == torch.device("cpu", 0)  # an index on a device that has no count
