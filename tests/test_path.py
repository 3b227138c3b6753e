import math

import pytest
import torch
from hypothesis import given

from d2f import align, alpha_sigma, interpolate, network_input, scale, target_velocity
from strategies import float_dtypes, shapes, tensor, unit_times


@given(unit_times)
def test_closed_forms_of_alpha_sigma_and_scale(t):
    a, s = alpha_sigma(t)
    n = math.sqrt(t * t + (1 - t) ** 2)
    assert float(a) == pytest.approx(t / n, abs=1e-15)
    assert float(s) == pytest.approx((1 - t) / n, abs=1e-15)
    assert float(a) ** 2 + float(s) ** 2 == pytest.approx(1.0, abs=1e-14)
    assert float(scale(t)) == pytest.approx(float(a + s), abs=1e-14)
    assert 1 - 1e-15 <= float(scale(t)) <= math.sqrt(2) + 1e-15


@given(shapes, unit_times, float_dtypes)
def test_interpolant_alignment(shape, t, dtype):
    """(alpha*data + sigma*noise) / (alpha + sigma) == t*data + (1-t)*noise, and align() undoes it."""
    data, noise = tensor(shape, dtype, 1), tensor(shape, dtype, 2)
    a, s = alpha_sigma(t)
    z = a * data.double() + s * noise.double()
    x = interpolate(data, noise, t)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(x.double(), z / (a + s), rtol=tol, atol=tol)
    torch.testing.assert_close(align(x, t).double(), z, rtol=tol, atol=tol)
    assert x.dtype == dtype


def test_per_sample_times_broadcast_over_any_rank():
    for shape in [(3,), (3, 4), (3, 2, 5), (3, 2, 4, 4), (3, 1, 2, 2, 2)]:
        data, noise = tensor(shape, seed=1), tensor(shape, seed=2)
        t = torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
        x = interpolate(data, noise, t)
        for b in range(3):
            torch.testing.assert_close(x[b], interpolate(data[b : b + 1], noise[b : b + 1], float(t[b]))[0])


def test_half_inputs_compute_in_float32():
    data = tensor((2, 3), torch.float16, 1)
    noise = tensor((2, 3), torch.bfloat16, 2)
    assert interpolate(data, noise, 0.5).dtype == torch.float32
    assert align(data, 0.5).dtype == torch.float32
    assert target_velocity(data, noise).dtype == torch.float32
    torch.testing.assert_close(target_velocity(data, noise), data.float() - noise.float())


def test_bad_inputs_name_the_argument():
    x = tensor((2, 3))
    with pytest.raises(ValueError, match="t must lie in \\[0, 1\\]; got -0.1"):
        align(x, -0.1)
    with pytest.raises(ValueError, match="t has shape \\(3,\\) but the batch has shape \\(2, 3\\)"):
        align(x, torch.rand(3))
    with pytest.raises(ValueError, match="noise has shape \\(2, 4\\) but data has shape \\(2, 3\\)"):
        interpolate(x, tensor((2, 4)), 0.5)
    with pytest.raises(ValueError, match="t must be a scalar or a 1-D"):
        align(x, torch.rand(2, 1))
    with pytest.raises(ValueError, match="t must be a float or a tensor"):
        align(x, "0.5")


def test_mixed_dtypes_compute_in_the_wider_one_and_t_must_match_the_batch():
    """A float64 input makes the result float64 with coefficients exact to float64 (not rounded to float32 first),
    and the float64 input also refuses the Triton path, whichever argument it is."""
    assert target_velocity(tensor((2, 3), torch.float16), tensor((2, 3), torch.float16, 1)).dtype == torch.float32
    narrow, wide = tensor((2, 3), torch.float32, 1), tensor((2, 3), torch.float64, 2)
    alpha, sigma = alpha_sigma(0.3)
    for data, noise in ((narrow, wide), (wide, narrow)):
        z = network_input(data, noise, 0.3)
        assert z.dtype == torch.float64
        torch.testing.assert_close(z, alpha * data.double() + sigma * noise.double(), rtol=1e-14, atol=1e-14)
        with pytest.raises(ValueError, match="backend='triton' does not run float64 inputs"):
            network_input(data, noise, 0.3, backend="triton")
    for f in (align, lambda x, t: interpolate(x, x, t), lambda x, t: network_input(x, x, t)):
        with pytest.raises(ValueError, match="t has shape \\(3,\\) but the batch has shape \\(2, 3\\)"):
            f(narrow, torch.rand(3))


def test_overflow_names_the_function_and_its_result():
    big = torch.full((2, 3), 3e38)
    with pytest.raises(ValueError, match="^align: the result overflowed torch.float32"):
        align(big, 0.5)
    with pytest.raises(ValueError, match="^target_velocity: the result overflowed torch.float32"):
        target_velocity(big, -big)
