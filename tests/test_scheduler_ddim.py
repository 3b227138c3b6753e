"""D2FScheduler against DDIMScheduler side by side, under every DDIM setting, in the loop a pipeline runs:
``randn * init_noise_sigma``, then ``scale_model_input`` and ``step`` per timestep (and img2img's ``add_noise``
and ``set_begin_index``). Both hold DDIM's latent ``scale(t) * x`` of the FM state ``x``, so they are compared
latent for latent after every step.

The reference is DDIMScheduler itself run in float64 on d2f's float64 table, so that a difference is the
method's and not rounding: d2f in float64 matches it to 1e-10 and d2f in float32 to 1e-5 at every step
(4e-5 for sample prediction, see FP32_TOL). The last check holds d2f's float32 error to within 2e-5 of
stock DDIMScheduler's own float32 error (which is NaN at zero SNR with eta > 0 on some CPUs).
"""

import itertools
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler  # noqa: E402

from d2f import D2FScheduler, Schedule, scale  # noqa: E402

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
CLIPPING = {"off": dict(clip_sample=False), "clip": dict(clip_sample=True), "threshold": dict(thresholding=True)}
STEPS = 10
# float32 tolerance against the float64 reference. Sample prediction's noise estimate divides by 1 - t (DDIM:
# by sigma), about 35 at the last step, which scales float32 rounding by the same; DDIMScheduler in float32
# is off by up to 6.4e-5 there.
FP32_TOL = {"epsilon": 1e-5, "v_prediction": 1e-5, "sample": 4e-5}


def model(z, k):
    """A fixed smooth 'network' of (input, timestep) whose outputs push the clean prediction out of [-1, 1]."""
    return torch.tanh(z.double() * 1.3 + k.double().reshape(-1, 1, 1, 1) / 500) * 3


def ddim64(config):
    s = DDIMScheduler(**config)
    table = torch.from_numpy(Schedule.from_diffusers(s).alphas_cumprod.copy())
    s.alphas_cumprod = table
    s.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64) if s.config.set_alpha_to_one else table[0]
    return s


def latents(s, dtype, eta, start=None, begin=0, drawn=False):
    """Run the pipeline loop from ``begin``; the latents after every step, in float64.

    The step noise (eta > 0) is float32 ``randn`` from a generator seeded 0, one draw per step: drawn by the
    scheduler itself with ``drawn`` (as a pipeline passes ``generator``), else drawn here and given as
    ``variance_noise`` in the run's dtype, so float64 and float32 runs see the same noise."""
    g = torch.Generator().manual_seed(0)
    if start is None:
        start = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        x = (start * s.init_noise_sigma).to(dtype)
    else:
        x = start.to(dtype)
    if begin and isinstance(s, D2FScheduler):  # DDIM finds its place by the timestep's value
        s.set_begin_index(begin)
    out = []
    for k in s.timesteps[begin:]:
        o = model(s.scale_model_input(x, k), k.expand(2)).to(dtype)
        if drawn:
            assert dtype == torch.float32
            x = s.step(o, k, x, eta=eta, generator=g).prev_sample
        else:
            noise = torch.randn(x.shape, generator=g, dtype=torch.float32).to(dtype) if eta else None
            x = s.step(o, k, x, eta=eta, variance_noise=noise).prev_sample
        assert x.dtype == dtype
        out.append(x.double())
    return out


def error(got, want):
    assert len(got) == len(want)
    return max(float((a - b).abs().max()) for a, b in zip(got, want))


def assert_steps_close(got, want, tol):
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=lambda m, i=i: f"step {i}: {m}")


CASES = list(
    itertools.product(
        ["epsilon", "v_prediction", "sample"],
        ["leading", "trailing", "linspace"],
        [0, 1],
        [True, False],
        list(CLIPPING),
        [False, True],
        [0.0, 0.5, 1.0],
    )
)


@pytest.mark.parametrize("prediction_type, spacing, offset, to_one, clipping, zero_snr, eta", CASES)
def test_every_ddim_setting_step_for_step(prediction_type, spacing, offset, to_one, clipping, zero_snr, eta):
    config = dict(
        **SD,
        **CLIPPING[clipping],
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=offset,
        set_alpha_to_one=to_one,
        rescale_betas_zero_snr=zero_snr,
    )
    d2f = D2FScheduler(**config)
    reference = ddim64(config)
    reference.set_timesteps(STEPS)
    if prediction_type == "epsilon" and zero_snr and int(reference.timesteps[0]) == 999:
        with pytest.raises(ValueError, match="no velocity"):  # DDIM itself divides by alpha = 0 there
            d2f.set_timesteps(STEPS)
        return
    d2f.set_timesteps(STEPS)
    assert d2f.timesteps.tolist() == [float(k) for k in reference.timesteps]  # the same count and values
    want = latents(reference, torch.float64, eta)
    d2f.set_timesteps(STEPS)
    assert_steps_close(latents(d2f, torch.float64, eta), want, 1e-10)
    d2f.set_timesteps(STEPS)
    assert_steps_close(latents(d2f, torch.float32, eta, drawn=True), want, FP32_TOL[prediction_type])
    stock = DDIMScheduler(**config)
    stock.set_timesteps(STEPS)
    d2f.set_timesteps(STEPS)
    mine, ddim = error(latents(d2f, torch.float32, eta), want), error(latents(stock, torch.float32, eta), want)
    if math.isnan(ddim):
        # DDIMScheduler's own float32 step is NaN here: at zero terminal SNR with eta > 0 its noise variance
        # 1 - alpha_prev - std^2 rounds below 0 before the square root (on some CPUs, not others).
        assert mine <= FP32_TOL[prediction_type]
    else:
        # Never much further from the exact result than DDIMScheduler's own float32 arithmetic. The margin is
        # measured, and CPU-dependent (vectorised float32 sums round differently): 1e-5 sufficed on one
        # machine, the worst case on another (sample, leading, zero SNR, eta 0.5) needed 1.5e-5.
        assert mine <= ddim + 2e-5


@pytest.mark.parametrize(
    "clipping",
    [dict(clip_sample=True, clip_sample_range=0.5), dict(thresholding=True, sample_max_value=2.0)],
    ids=["clip-range-0.5", "threshold-max-2"],
)
def test_clipping_beside_ddims_defaults_step_for_step(clipping):
    """With DDIM's defaults (clip_sample_range = sample_max_value = 1) clipping and thresholding both bound the
    clean sample to [-1, 1]; beside them each keeps its own rule, per sample."""
    config = dict(**SD, **clipping, prediction_type="epsilon", steps_offset=1)
    reference, d2f = ddim64(config), D2FScheduler(**config)
    reference.set_timesteps(STEPS)
    d2f.set_timesteps(STEPS)
    assert_steps_close(latents(d2f, torch.float64, 0.0), latents(reference, torch.float64, 0.0), 1e-10)


@pytest.mark.parametrize("step_args", [dict(use_clipped_model_output=True), dict(eta=1.0)], ids=["clipped", "eta"])
def test_float64_steps_with_ddims_step_arguments(step_args):
    """use_clipped_model_output=True re-derives the noise from the clipped sample; a generator draws the step noise
    in the output's dtype, float64 here, as DDIM draws it."""
    config = dict(**SD, prediction_type="epsilon", steps_offset=1)
    reference, d2f = ddim64(config), D2FScheduler(**config)
    reference.set_timesteps(STEPS)
    d2f.set_timesteps(STEPS)
    start = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    runs = []
    for s in (reference, d2f):
        g, x, out = torch.Generator().manual_seed(0), start, []
        for k in s.timesteps:
            x = s.step(model(x, k.expand(2)), k, x, generator=g, **step_args).prev_sample
            out.append(x)
        runs.append(out)
    assert_steps_close(runs[1], runs[0], 1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("clipping", ["off", "clip"])
def test_bfloat16_loops_stay_bfloat16_and_match_ddim(prediction_type, eta, clipping):
    config = dict(**SD, **CLIPPING[clipping], prediction_type=prediction_type, steps_offset=1, set_alpha_to_one=False)
    reference, d2f = ddim64(config), D2FScheduler(**config)
    reference.set_timesteps(STEPS)
    d2f.set_timesteps(STEPS)
    # bf16 keeps 8 bits: both end within its rounding of the float64 reference (DDIM rounds every op in bf16).
    want = latents(reference, torch.float64, eta)
    stock = DDIMScheduler(**config)
    stock.set_timesteps(STEPS)
    d2f_error = max(float((a - b).abs().max()) for a, b in zip(latents(d2f, torch.bfloat16, eta), want))
    ddim_error = max(float((a - b).abs().max()) for a, b in zip(latents(stock, torch.bfloat16, eta), want))
    assert d2f_error <= max(0.05, 1.5 * ddim_error), (d2f_error, ddim_error)


@pytest.mark.parametrize(
    "config",
    [
        dict(steps_offset=1, set_alpha_to_one=False, clip_sample=False),
        dict(steps_offset=0, set_alpha_to_one=False, clip_sample=True),  # DDIM's identity last step, clipped
        dict(timestep_spacing="linspace", set_alpha_to_one=False, clip_sample=True),  # a step table with gaps
        dict(timestep_spacing="trailing", thresholding=True),
    ],
    ids=["sd", "offset0-identity-step", "linspace-gaps", "trailing-threshold"],
)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_img2img_from_every_begin_index(config, eta):
    config = dict(**SD, prediction_type="v_prediction", **config)
    reference, d2f = ddim64(config), D2FScheduler(**config)
    reference.set_timesteps(STEPS)
    d2f.set_timesteps(STEPS)
    assert len(d2f.timesteps) == len(reference.timesteps)
    data = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    for begin in range(len(reference.timesteps)):
        k = reference.timesteps[begin : begin + 1].repeat(2)
        z = reference.add_noise(data, noise, k)
        x = d2f.add_noise(data, noise, k)
        torch.testing.assert_close(x, z, rtol=1e-10, atol=1e-10)
        reference.set_timesteps(STEPS)
        d2f.set_timesteps(STEPS)
        want = latents(reference, torch.float64, eta, start=z, begin=begin)
        assert_steps_close(latents(d2f, torch.float32, eta, start=x, begin=begin), want, FP32_TOL["v_prediction"])
        assert d2f.add_noise(data.bfloat16(), noise.bfloat16(), k).dtype == torch.bfloat16


def test_heun_started_mid_grid_without_begin_index_takes_the_step_start():
    """Heun's step ends where the next starts, so those timesteps repeat; a pipeline that starts there starts
    the step (the second match), as diffusers' Heun scheduler does, and runs on."""
    config = dict(**SD, clip_sample=False, steps_offset=1, solver="heun")
    plain, started = D2FScheduler(**config), D2FScheduler(**config)
    plain.set_timesteps(5)
    started.set_timesteps(5)
    k = plain.timesteps[1]
    assert int((plain.timesteps == k).sum()) == 2 and torch.equal(plain.timesteps[2], k)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    plain.set_begin_index(2)
    a, b = x, x
    for t in plain.timesteps[2:]:
        a = plain.step(model(plain.scale_model_input(a, t), t.expand(2)).float(), t, a).prev_sample
        b = started.step(model(started.scale_model_input(b, t), t.expand(2)).float(), t, b).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_step_takes_ddims_arguments_positionally_and_refuses_what_it_cannot_honour():
    config = dict(**SD, clip_sample=False)
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(6))
    outputs = []
    for call in ("positional", "keyword"):
        s = D2FScheduler(**config)
        s.set_timesteps(4)
        k = s.timesteps[0]
        o = model(s.scale_model_input(x, k), k.expand(2)).float()
        g = torch.Generator().manual_seed(7)
        if call == "positional":
            outputs.append(s.step(o, k, x, 0.5, False, g).prev_sample)
        else:
            outputs.append(s.step(o, k, x, eta=0.5, generator=g).prev_sample)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)
    s = D2FScheduler(**config)
    s.set_timesteps(4)
    k = s.timesteps[0]
    with pytest.raises(ValueError, match=r"^eta=-0.5 must be a finite number >= 0 \(DDIM's eta; 0 is deterministic\)$"):
        s.step(x, k, x, eta=-0.5)
    with pytest.raises(ValueError, match=r"^pass either generator or variance_noise to step\(\), not both$"):
        s.step(x, k, x, eta=1.0, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="too large for the step"):
        s.step(x, k, x, eta=50.0, variance_noise=x)
    heun = D2FScheduler(**config, solver="heun")
    heun.set_timesteps(4)
    with pytest.raises(ValueError, match="eta=1.0 makes DDIM's stochastic step.*solver='euler' only"):
        heun.step(x, heun.timesteps[0], x, eta=1.0)
    clipped = D2FScheduler(**SD, solver="heun")  # clip_sample=True, DDIM's default
    clipped.set_timesteps(4)
    with pytest.raises(ValueError, match="use_clipped_model_output=False keeps .*solver='heun' cannot take"):
        clipped.step(x, clipped.timesteps[0], x, use_clipped_model_output=False)
    with pytest.raises(ValueError, match="dynamic_thresholding_ratio=1.5 must lie in"):
        D2FScheduler(**SD, dynamic_thresholding_ratio=1.5)


def test_eta_and_clipping_on_an_fm_grid_are_ddims_transition_between_its_noise_levels():
    """On a uniform grid, Euler with eta and clip_sample takes DDIM's formula between FM times t and t':
    z' = alpha' * clip(D) + sqrt(sigma'^2 - std^2) * E + std * noise, with DDIM's std."""
    from d2f import alpha_sigma, diffusion_to_velocity

    s = D2FScheduler(**SD, prediction_type="epsilon", clip_sample=True, grid="uniform")
    s.set_timesteps(4)
    latent = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    noise = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    k = s.timesteps[1]
    s.set_begin_index(1)
    (t, t_next), eta = s._steps[1], 0.7
    o = model(s.scale_model_input(latent, k), k.expand(2))
    got = s.step(o, k, latent, eta=eta, variance_noise=noise)
    x = latent / float(scale(t))
    u = diffusion_to_velocity(o, x, t, "epsilon")
    data, eps = (x + (1 - t) * u).clamp(-1, 1), x - t * u
    (a, sg), (a1, s1) = (map(float, alpha_sigma(v)) for v in (t, t_next))
    std = eta * (s1 / sg) * (1 - (a / a1) ** 2) ** 0.5
    z = a1 * data + (s1**2 - std**2) ** 0.5 * eps + std * noise
    torch.testing.assert_close(got.prev_sample, z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.pred_original_sample, data, rtol=1e-12, atol=1e-12)


def test_ddims_schedule_attributes():
    config = dict(**SD, set_alpha_to_one=False)
    ddim, d2f = DDIMScheduler(**config), D2FScheduler(**config)
    for name in ("betas", "alphas", "alphas_cumprod", "final_alpha_cumprod"):
        ours, theirs = getattr(d2f, name), getattr(ddim, name)
        assert ours.dtype == theirs.dtype == torch.float32, name
        torch.testing.assert_close(ours, theirs, rtol=2e-6, atol=1e-7, msg=name)
    d2f.set_timesteps(10)
    assert d2f.num_inference_steps == 10 and d2f.order == 1 and len(d2f) == 1000
    assert D2FScheduler(**SD, set_alpha_to_one=True).final_alpha_cumprod == 1.0


@pytest.mark.parametrize(
    "other",
    [
        DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1, thresholding=True),
        DDPMScheduler(beta_schedule="scaled_linear", variance_type="fixed_large", clip_sample=True),
        PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1),
        EulerDiscreteScheduler(**SD, timestep_type="continuous"),
    ],
    ids=lambda s: type(s).__name__,
)
def test_config_round_trips_keep_every_key(other, tmp_path):
    d2f = D2FScheduler.from_config(other.config)
    back = type(other).from_config(d2f.config)
    public = {k: v for k, v in other.config.items() if not k.startswith("_")}
    assert {k: back.config[k] for k in public} == public
    for key in ("clip_sample", "thresholding", "set_alpha_to_one", "steps_offset"):
        if key in other.config:
            assert d2f.config[key] == other.config[key], key  # honoured, not only kept
    d2f.save_config(tmp_path)
    again = D2FScheduler.from_pretrained(tmp_path)
    assert {k: v for k, v in again.config.items() if not k.startswith("_")} == {
        k: v for k, v in d2f.config.items() if not k.startswith("_")
    }
