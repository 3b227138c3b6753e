import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from d2f import PREDICTION_TYPES, alpha_sigma, fm_loss
from strategies import inner_times, tensor


def reference_loss(o, data, noise, t, prediction_type, weight, reduction):
    """Math notes §4 written out literally in float64: x, A, B, u_hat, then the weighted square."""
    o, data, noise, t = o.double(), data.double(), noise.double(), t.double()
    tb = t.reshape(-1, *[1] * (o.ndim - 1))
    x = tb * data + (1 - tb) * noise
    n = torch.sqrt(tb**2 + (1 - tb) ** 2)
    A, B = {
        "epsilon": (1 / tb, -1 / tb),
        "sample": (-1 / (1 - tb), 1 / (1 - tb)),
        "v_prediction": ((2 * tb - 1) / n**2, -1 / n),
        "velocity": (0 * tb, 1 + 0 * tb),
    }[prediction_type]
    sq = (A * x + B * o - (data - noise)) ** 2
    if weight is not None:
        sq = weight.double().reshape(tb.shape) * sq
    if reduction == "mean":
        return sq.mean()
    if reduction == "sum":
        return sq.sum()
    return sq.reshape(sq.shape[0], -1).mean(1)


SHAPES = [(1, 5), (3, 7), (2, 3, 5), (4, 2, 3, 3), (2, 1, 2, 3, 2)]


@given(
    st.sampled_from(PREDICTION_TYPES),
    st.sampled_from(["mean", "sum", "none"]),
    st.sampled_from(SHAPES),
    st.booleans(),
    st.sampled_from([torch.float32, torch.float16, torch.float64]),
    st.integers(0, 2**16),
)
def test_value_and_gradient_match_the_float64_reference(prediction_type, reduction, shape, weighted, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    B = shape[0]
    data, noise, o = (torch.randn(shape, generator=g).to(dtype) for _ in range(3))
    t = torch.rand(B, generator=g) * 0.98 + 0.01
    w = torch.rand(B, generator=g) * 2 if weighted else None
    o.requires_grad_(True)
    loss = fm_loss(o, data, noise, t, prediction_type, weight=w, reduction=reduction)
    o_ref = o.detach().double().requires_grad_(True)
    ref = reference_loss(o_ref, data, noise, t, prediction_type, w, reduction)
    # Coefficients reach 1/t = 100 here, so float32 residuals carry ~1e-5 relative error.
    tol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-4}[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    upstream = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (loss * upstream.to(loss.dtype)).sum().backward()
    (ref * upstream).sum().backward()
    assert o.grad.dtype == dtype
    gtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(o.grad.double(), o_ref.grad, rtol=gtol, atol=gtol * float(o_ref.grad.abs().max()))


@given(st.sampled_from(["epsilon", "sample", "v_prediction"]), inner_times)
def test_equivalent_diffusion_weighting(prediction_type, t):
    """FM loss == diffusion loss weighted by 1/t^2 (eps), 1/(1-t)^2 (sample), 1/n^2 (v)."""
    data, noise, o = tensor((2, 8), seed=1), tensor((2, 8), seed=2), tensor((2, 8), seed=3)
    a, s = alpha_sigma(t)
    n2 = t * t + (1 - t) ** 2
    target, w = {
        "epsilon": (noise, 1 / t**2),
        "sample": (data, 1 / (1 - t) ** 2),
        "v_prediction": (a * noise - s * data, 1 / n2),
    }[prediction_type]
    fm = fm_loss(o, data, noise, t, prediction_type)
    torch.testing.assert_close(fm, w * ((o - target) ** 2).mean(), rtol=1e-10, atol=0)
    if prediction_type == "v_prediction":
        assert 1 - 1e-12 <= w <= 2 + 1e-12


def test_weighted_mean_is_not_divided_by_the_weight_sum():
    data, noise, o = tensor((2, 4), seed=1), tensor((2, 4), seed=2), tensor((2, 4), seed=3)
    w = torch.tensor([0.5, 0.25], dtype=torch.float64)
    per = fm_loss(o, data, noise, 0.5, "velocity", reduction="none")
    torch.testing.assert_close(fm_loss(o, data, noise, 0.5, "velocity", weight=w), (w * per).mean())
    torch.testing.assert_close(fm_loss(o, data, noise, 0.5, "velocity", reduction="sum"), per.sum() * 4)


def test_perfect_prediction_has_zero_loss_and_gradient():
    data, noise = tensor((3, 5), seed=1), tensor((3, 5), seed=2)
    o = noise.clone().requires_grad_(True)
    loss = fm_loss(o, data, noise, torch.tensor([0.2, 0.5, 0.9]), "epsilon")
    loss.backward()
    assert float(loss.detach()) == pytest.approx(0, abs=1e-24)
    assert float(o.grad.abs().max()) < 1e-12


def test_non_contiguous_inputs():
    data, noise, o = (tensor((4, 6, 3), seed=i).transpose(1, 2) for i in (1, 2, 3))
    t = torch.tensor([0.1, 0.4, 0.6, 0.9], dtype=torch.float64)
    torch.testing.assert_close(
        fm_loss(o, data, noise, t, "v_prediction"), reference_loss(o, data, noise, t, "v_prediction", None, "mean")
    )


@pytest.mark.parametrize("name", ["model_output", "data", "noise"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_input_is_named(name, bad):
    args = {"model_output": tensor((2, 3), seed=1), "data": tensor((2, 3), seed=2), "noise": tensor((2, 3), seed=3)}
    args[name][1, 2] = bad
    with pytest.raises(ValueError, match=f"fm_loss: {name} contains NaN or inf"):
        fm_loss(args["model_output"], args["data"], args["noise"], 0.5, "v_prediction")


def test_bad_arguments_are_refused():
    x = tensor((2, 3))
    with pytest.raises(ValueError, match="reduction='avg' is not supported"):
        fm_loss(x, x, x, 0.5, "epsilon", reduction="avg")
    with pytest.raises(ValueError, match="backend='cuda' is not supported"):
        fm_loss(x, x, x, 0.5, "epsilon", backend="cuda")
    with pytest.raises(ValueError, match="gives no velocity at t=0.0"):
        fm_loss(x, x, x, torch.tensor([0.0, 0.5]), "epsilon")
    with pytest.raises(ValueError, match="data requires grad"):
        fm_loss(x, x.clone().requires_grad_(True), x, 0.5, "epsilon")
    with pytest.raises(ValueError, match="^weight requires grad, but fm_loss only differentiates model_output"):
        fm_loss(x, x, x, 0.5, "epsilon", weight=torch.ones(2, requires_grad=True))
    with pytest.raises(ValueError, match="weight must be finite and >= 0, got tensor\\(\\[1.0, -1.0\\]"):
        fm_loss(x, x, x, 0.5, "epsilon", weight=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weight has shape \\(3,\\)"):
        fm_loss(x, x, x, 0.5, "epsilon", weight=torch.ones(3))
    with pytest.raises(ValueError, match="^t has shape \\(3,\\) but the batch has shape \\(2, 3\\)"):
        fm_loss(x, x, x, torch.full((3,), 0.5), "epsilon")
    with pytest.raises(ValueError, match="noise has shape \\(2, 4\\) but model_output has shape \\(2, 3\\)"):
        fm_loss(x, x, tensor((2, 4)), 0.5, "epsilon")


def test_overflow_is_reported_not_hidden():
    big = torch.full((2, 3), 1e30)
    cause = (
        "inputs are finite \\(the squared residual is not representable\\); check t, the magnitudes of model_output, "
        "data and noise, and the loss weight; prediction_type='velocity' scales by up to 1, at t=0.5"
    )
    with pytest.raises(ValueError, match=cause):
        fm_loss(big, -big, big, 0.5, "velocity")


@pytest.mark.parametrize("wide", ["model_output", "data", "noise"])
def test_one_float64_input_makes_the_loss_float64_and_refuses_the_kernel(wide):
    """Whichever of the three is float64, the residual is formed in float64 (to 1e-12 of the reference, where a
    float32 pass is off by ~1e-7) and the Triton path, which has no float64, is refused."""
    args = {name: tensor((2, 5), torch.float32, seed) for seed, name in enumerate(["model_output", "data", "noise"])}
    args[wide] = args[wide].double()
    t = torch.tensor([0.3, 0.7], dtype=torch.float64)
    loss = fm_loss(args["model_output"], args["data"], args["noise"], t, "v_prediction")
    assert loss.dtype == torch.float64
    ref = reference_loss(args["model_output"], args["data"], args["noise"], t, "v_prediction", None, "mean")
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="backend='triton' does not run float64 inputs"):
        fm_loss(args["model_output"], args["data"], args["noise"], t, "v_prediction", backend="triton")


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("weighted", [False, True])
def test_second_derivatives_match_the_float64_reference(prediction_type, reduction, weighted):
    """create_graph=True gave a gradient that was a constant: its own derivative was silently zero (or
    torch refused it as not requiring grad). Checked against the Hessian of the plain formula, and by
    gradgradcheck, which also differentiates through the upstream gradient."""
    g = torch.Generator().manual_seed(len(prediction_type) + len(reduction))
    data, noise, o = (torch.randn(3, 2, 4, generator=g, dtype=torch.float64) for _ in range(3))
    t = torch.tensor([0.2, 0.5, 0.9], dtype=torch.float64)
    w = torch.rand(3, generator=g, dtype=torch.float64) * 2 if weighted else None
    upstream = torch.rand(3 if reduction == "none" else (), generator=g, dtype=torch.float64) + 0.5

    def loss(o):
        return fm_loss(o, data, noise, t, prediction_type, weight=w, reduction=reduction)

    def reference(o):
        return (reference_loss(o, data, noise, t, prediction_type, w, reduction) * upstream).sum()

    hessian = torch.autograd.functional.hessian(lambda o: (loss(o) * upstream).sum(), o)
    torch.testing.assert_close(hessian, torch.autograd.functional.hessian(reference, o), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradgradcheck(loss, (o.clone().requires_grad_(True),))
