import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from d2f import (
    PREDICTION_TYPES,
    align,
    alpha_sigma,
    diffusion_to_velocity,
    guidance,
    interpolate,
    velocity_coefficients,
    velocity_to_diffusion,
)
from d2f.parametrization import diffusion_target
from strategies import float_dtypes, inner_times, shapes, tensor

prediction_types = st.sampled_from(PREDICTION_TYPES)


def true_output(prediction_type, data, noise, t):
    """What a perfect network of each type outputs for the pair (data, noise) at FM time t."""
    a, s = alpha_sigma(t)
    return {
        "epsilon": noise,
        "sample": data,
        "v_prediction": a * noise - s * data,  # diffusers' v = alpha*noise - sigma*data
        "velocity": data - noise,
    }[prediction_type]


@given(prediction_types, shapes, inner_times)
def test_every_prediction_type_recovers_the_target_velocity(prediction_type, shape, t):
    data, noise = tensor(shape, seed=1), tensor(shape, seed=2)
    x = interpolate(data, noise, t)
    u = diffusion_to_velocity(true_output(prediction_type, data, noise, t), x, t, prediction_type)
    torch.testing.assert_close(u, data - noise, rtol=1e-9, atol=1e-9)


@given(prediction_types, shapes, inner_times, float_dtypes)
def test_velocity_to_diffusion_inverts_diffusion_to_velocity(prediction_type, shape, t, dtype):
    x, o = tensor(shape, dtype, 1), tensor(shape, dtype, 2)
    u = diffusion_to_velocity(o, x, t, prediction_type)
    back = velocity_to_diffusion(u, x, t, prediction_type)
    # The round trip divides by B(t) (at most 1/t or 1/(1-t) = 1e3 here), so float32 loses ~3 digits.
    tol = 1e-9 if dtype == torch.float64 else 5e-3
    torch.testing.assert_close(back, o.to(back.dtype), rtol=tol, atol=tol)
    torch.testing.assert_close(diffusion_to_velocity(back, x, t, prediction_type), u, rtol=tol, atol=tol)


@given(inner_times)
def test_coefficient_table(t):
    n = math.sqrt(t * t + (1 - t) ** 2)
    expected = {
        "epsilon": (1 / t, -1 / t),
        "sample": (-1 / (1 - t), 1 / (1 - t)),
        "v_prediction": ((2 * t - 1) / n**2, -1 / n),
        "velocity": (0.0, 1.0),
    }
    for prediction_type, (a, b) in expected.items():
        got = velocity_coefficients(t, prediction_type)
        assert float(got[0]) == pytest.approx(a, rel=1e-12, abs=1e-15)
        assert float(got[1]) == pytest.approx(b, rel=1e-12)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("t", [0.0, 1.0])
def test_inverse_is_finite_at_both_ends(prediction_type, t):
    x, u = tensor((2, 3), seed=1), tensor((2, 3), seed=2)
    assert bool(velocity_to_diffusion(u, x, t, prediction_type).isfinite().all())


@pytest.mark.parametrize("prediction_type, t", [("epsilon", 0.0), ("sample", 1.0)])
def test_singular_ends_raise_instead_of_returning_inf(prediction_type, t):
    x = tensor((2, 3))
    with pytest.raises(ValueError, match=f"prediction_type='{prediction_type}' gives no velocity at t={t}"):
        diffusion_to_velocity(x, x, t, prediction_type)
    with pytest.raises(ValueError, match="gives no velocity"):
        diffusion_to_velocity(x, x, torch.tensor([0.5, t]), prediction_type)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "velocity"])
def test_v_and_velocity_are_finite_everywhere(prediction_type):
    x, o = tensor((2, 3), seed=1), tensor((2, 3), seed=2)
    for t in (0.0, 1.0):
        assert bool(diffusion_to_velocity(o, x, t, prediction_type).isfinite().all())


def gaussian_oracle(prediction_type, x, t, mu, S):
    """Optimal network output for data ~ N(mu, S^2 I) at FM state x, time t (math notes §5)."""
    a, s = alpha_sigma(t)
    z = align(x, t)
    D = a**2 * S**2 + s**2
    eps = s * (z - a * mu) / D
    x1 = mu + a * S**2 * (z - a * mu) / D
    return {"epsilon": eps, "sample": x1, "v_prediction": a * eps - s * x1}[prediction_type]


@given(st.sampled_from(["epsilon", "sample", "v_prediction"]), inner_times, st.floats(0.2, 3.0), st.floats(-2, 2))
def test_gaussian_oracle_converts_to_the_optimal_velocity(prediction_type, t, S, mu):
    x = tensor((4, 3), seed=3)
    u = diffusion_to_velocity(gaussian_oracle(prediction_type, x, t, mu, S), x, t, prediction_type)
    # u*(x, t) = mu + (t S^2 - (1-t)) / (t^2 S^2 + (1-t)^2) * (x - t mu)
    expected = mu + (t * S**2 - (1 - t)) / (t**2 * S**2 + (1 - t) ** 2) * (x - t * mu)
    torch.testing.assert_close(u, expected, rtol=1e-9, atol=1e-9)


@given(prediction_types, inner_times, st.floats(-3, 8))
def test_guidance_commutes_with_the_conversion(prediction_type, t, g):
    x, o_u, o_c = tensor((3, 2, 4), seed=1), tensor((3, 2, 4), seed=2), tensor((3, 2, 4), seed=3)
    guided_outputs = diffusion_to_velocity(guidance(o_u, o_c, g), x, t, prediction_type)
    u_u = diffusion_to_velocity(o_u, x, t, prediction_type)
    u_c = diffusion_to_velocity(o_c, x, t, prediction_type)
    torch.testing.assert_close(guided_outputs, guidance(u_u, u_c, g), rtol=1e-9, atol=1e-9)


def test_guidance_per_sample_scale_and_dtype():
    u, c = tensor((2, 3), torch.float16, 1), tensor((2, 3), torch.float16, 2)
    g = torch.tensor([1.0, 3.0])
    out = guidance(u, c, g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[1], u[1].float() + 3 * (c[1].float() - u[1].float()))
    with pytest.raises(ValueError, match="scale must be finite"):
        guidance(u, c, math.inf)


def test_unknown_prediction_type_lists_the_allowed_ones():
    x = tensor((2, 3))
    with pytest.raises(ValueError, match="prediction_type='eps' is not supported; allowed: 'epsilon', 'v_prediction'"):
        diffusion_to_velocity(x, x, 0.5, "eps")
    with pytest.raises(ValueError, match="x has shape \\(2, 3\\) but velocity has shape \\(2, 4\\)"):
        velocity_to_diffusion(tensor((2, 4)), x, 0.5, "epsilon")


def test_guidance_keeps_the_wider_dtype_checks_the_scales_batch_and_names_an_overflow():
    wide, narrow = tensor((2, 3)), tensor((2, 3), torch.float32, 1)
    for uncond, cond in ((wide, narrow), (narrow, wide)):
        guided = guidance(uncond, cond, 3.0)
        assert guided.dtype == torch.float64
        torch.testing.assert_close(guided, 3.0 * cond.double() - 2.0 * uncond.double(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="scale has shape \\(3,\\) but the batch has shape \\(2, 3\\)"):
        guidance(wide, wide, torch.ones(3))
    big = torch.full((2, 3), 3e38)
    with pytest.raises(ValueError, match="^guidance: the result overflowed torch.float32"):
        guidance(-big, big, 2.0)


def test_singular_times_are_refused_with_the_side_to_keep_to():
    keep_above = "; keep t > 0: samplers should start at schedule.t_min or later$"
    got = "at t=0.0 \\(got t=tensor\\(\\[0.5, 0.0\\], dtype=torch.float64\\)\\)"
    with pytest.raises(ValueError, match=got + keep_above):
        velocity_coefficients(torch.tensor([0.5, 0.0], dtype=torch.float64), "epsilon")
    got = "at t=1.0 \\(got t=tensor\\(1.0, dtype=torch.float64\\)\\); keep t < 1: samplers"
    with pytest.raises(ValueError, match=got):
        velocity_coefficients(1.0, "sample")
    # 1/t overflows float64 for a subnormal t: named although t itself is allowed.
    tiny = torch.tensor([0.5, 1e-320], dtype=torch.float64)
    overflow = "no finite velocity at t=1e-320: so close to the singular end t=0.0 its coefficient overflows float64"
    got = " \\(got t=tensor\\(\\[0.5, 1e-320\\], dtype=torch.float64\\)\\)"
    with pytest.raises(ValueError, match=overflow + got + keep_above):
        velocity_coefficients(tiny, "epsilon")


def test_velocity_to_diffusion_checks_t_against_the_batch_and_names_an_overflow():
    x = tensor((2, 3), torch.float32)
    with pytest.raises(ValueError, match="t has shape \\(3,\\) but the batch has shape \\(2, 3\\)"):
        velocity_to_diffusion(x, x, torch.rand(3), "epsilon")
    big = torch.full((2, 3), 3e38)
    with pytest.raises(ValueError, match="^velocity_to_diffusion: the network output overflowed torch.float32"):
        velocity_to_diffusion(-big, big, 0.5, "epsilon")  # x - t*u = 4.5e38


def test_diffusion_to_velocity_names_an_overflow_and_works_in_the_wider_dtype():
    big = torch.full((2, 3), 1e30)
    message = (
        r"^diffusion_to_velocity: the velocity overflowed torch.float32 \(largest finite value 3.4028e\+38\) although "
        r"the inputs are finite; prediction_type='epsilon' scales by up to 1e\+12, at t=1e-12"
    )
    with pytest.raises(ValueError, match=message):
        diffusion_to_velocity(big, big, 1e-12, "epsilon")
    narrow, wide = tensor((2, 3), torch.float32), tensor((2, 3), torch.float64)
    for output, x in ((narrow, wide), (wide, narrow)):  # float64 either side: float64 work and result
        u = diffusion_to_velocity(output, x, 0.3, "epsilon")
        assert u.dtype == torch.float64
        # epsilon: data = (x - (1-t)*eps)/t, so u = data - eps = (x - eps)/t
        want = (x.double() - output.double()) / 0.3
        torch.testing.assert_close(u, want, rtol=1e-12, atol=1e-12)


def test_diffusion_targets_are_what_each_type_predicts():
    data, noise = tensor((2, 3), seed=1), tensor((2, 3), seed=2)
    alpha, sigma = torch.tensor([0.6, 0.8], dtype=torch.float64), torch.tensor([0.8, 0.6], dtype=torch.float64)
    assert diffusion_target(data, noise, alpha, sigma, "epsilon") is noise
    assert diffusion_target(data, noise, alpha, sigma, "sample") is data
    v = diffusion_target(data, noise, alpha, sigma, "v_prediction")
    torch.testing.assert_close(v, alpha[:, None] * noise - sigma[:, None] * data)
    with pytest.raises(ValueError, match="^prediction_type='velocity' is not supported; allowed: 'epsilon', 'v_pre"):
        diffusion_target(data, noise, alpha, sigma, "velocity")
