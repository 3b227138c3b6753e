import pytest
import torch
from diffusers import DDIMScheduler

from d2f import D2FVelocity, Schedule, ddim_grid, diffusion_to_velocity, guidance, scale
from nets import TinyNet, tiny_unet
from strategies import NAMED_SCHEDULES, tensor


def run_ddim(sched, net, noise, n):
    """diffusers' own DDIM loop; returns the latent before each step and the final one."""
    sched.set_timesteps(n)
    z, latents = noise, []
    for k in sched.timesteps:
        latents.append(z)
        z = sched.step(net(z, k.expand(z.shape[0])), k, z).prev_sample
    return latents, z


CASES = [
    # (prediction_type, spacing, steps_offset, set_alpha_to_one, n, zero_snr)
    ("epsilon", "leading", 1, False, 10, False),  # Stable Diffusion's own config
    ("epsilon", "leading", 0, True, 7, False),
    ("v_prediction", "leading", 1, False, 10, False),
    ("epsilon", "trailing", 0, True, 10, False),
    ("v_prediction", "trailing", 0, False, 4, False),
    ("v_prediction", "trailing", 0, True, 3, False),  # steps do not chain: an (n, 2) step table
    ("epsilon", "linspace", 0, False, 6, False),  # likewise
    ("v_prediction", "trailing", 0, True, 10, True),  # zero terminal SNR: starts at t = 0
    ("sample", "leading", 1, True, 5, False),
]


@pytest.mark.parametrize("prediction_type, spacing, steps_offset, set_alpha_to_one, n, zero_snr", CASES)
def test_euler_on_the_ddim_grid_equals_diffusers_ddim_step_for_step(
    prediction_type, spacing, steps_offset, set_alpha_to_one, n, zero_snr
):
    sched = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        prediction_type=prediction_type,
        timestep_spacing=spacing,
        steps_offset=steps_offset,
        set_alpha_to_one=set_alpha_to_one,
        rescale_betas_zero_snr=zero_snr,
    )
    schedule = Schedule.from_diffusers(sched)
    # diffusers builds its table in float32; give it d2f's float64 table so the comparison is at float64
    # precision and any difference is the method's, not rounding (a float32 run is below).
    sched.alphas_cumprod = torch.from_numpy(schedule.alphas_cumprod.copy())
    sched.final_alpha_cumprod = torch.tensor(1.0 if set_alpha_to_one else schedule.alphas_cumprod[0])
    net = TinyNet().double()
    noise = tensor((2, 3, 8, 8), seed=5)
    latents, final = run_ddim(sched, net, noise, n)
    ddim_calls = [k for _, k, _ in net.calls]
    net.calls.clear()

    ts = ddim_grid(schedule, n, spacing, steps_offset, set_alpha_to_one)
    states = []
    x = D2FVelocity(net, schedule, prediction_type).sample(noise, ts, callback=lambda i, t, x, u: states.append((t, x)))
    # DDIM's identity step (timestep 0 to alphabar_0) is dropped from the grid.
    assert len(states) == n - int(not set_alpha_to_one and int(ddim_calls[-1][0]) == 0)
    for (t, state), z in zip(states, latents):
        torch.testing.assert_close(scale(t) * state, z, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(scale(float(ts.reshape(-1)[-1])) * x, final, rtol=1e-10, atol=1e-10)
    for (_, k, _), k_ddim in zip(net.calls, ddim_calls):
        assert k.dtype == torch.float32 and torch.equal(k, k_ddim.float())


def test_float32_unet2d_matches_stock_ddim():
    """A diffusers UNet2DModel in float32 against the stock scheduler (its float32 table)."""
    torch.manual_seed(0)
    unet = tiny_unet().eval()
    sched = DDIMScheduler(beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        _, final = run_ddim(sched, lambda z, k: unet(z, k).sample, noise, 10)
    schedule = Schedule.from_diffusers(sched)
    ts = ddim_grid(schedule, 10, "leading", 1, set_alpha_to_one=False)
    x = D2FVelocity(unet, schedule, "epsilon").sample(noise, ts)
    torch.testing.assert_close(scale(float(ts[-1])) * x, final, rtol=1e-4, atol=1e-4)


def test_network_inputs_dtype_and_output_object():
    class Out:
        def __init__(self, sample):
            self.sample = sample

    class Wrapped(TinyNet):
        def forward(self, z, k, label=None):
            return Out(super().forward(z, k, label))

    schedule = NAMED_SCHEDULES["sd"]
    net = Wrapped().double()
    x = tensor((2, 3, 4, 4), torch.float32)
    t = torch.tensor([0.3, 0.8])
    u = D2FVelocity(net, schedule, "v_prediction")(x, t)
    z, k, _ = net.calls[0]
    assert z.dtype == torch.float64 and k.dtype == torch.float32 and k.shape == (2,)
    torch.testing.assert_close(k, schedule.timestep(t.double()).float())
    torch.testing.assert_close(z, x.double() * scale(t.double())[:, None, None, None])
    assert u.dtype == torch.float64  # the float64 network output is not rounded down to x's float32
    o = net(z, k).sample
    torch.testing.assert_close(u, diffusion_to_velocity(o, x, t, "v_prediction"), rtol=1e-12, atol=1e-12)


def test_guidance_runs_both_branches_in_one_batched_call():
    schedule = NAMED_SCHEDULES["sd"]
    net = TinyNet().double()
    x = tensor((3, 3, 4, 4))
    label = torch.tensor([1.0, 2.0, 3.0])
    v = D2FVelocity(net, schedule, "epsilon", guidance_scale=4.0, uncond={"label": torch.zeros(1)})
    u = v(x, 0.6, label=label)
    assert len(net.calls) == 1
    z, k, lab = net.calls[0]
    assert z.shape[0] == 6 and k.shape == (6,) and lab.tolist() == [0, 0, 0, 1, 2, 3]
    net.calls.clear()
    plain = D2FVelocity(net, schedule, "epsilon")
    u_u, u_c = plain(x, 0.6, label=torch.zeros(3)), plain(x, 0.6, label=label)
    torch.testing.assert_close(u, guidance(u_u, u_c, 4.0), rtol=1e-10, atol=1e-10)


def test_concat_channels_are_appended_unscaled():
    schedule = NAMED_SCHEDULES["sd"]
    net = TinyNet(in_channels=5).double()
    x, cond_image = tensor((2, 3, 4, 4), seed=1), tensor((2, 2, 4, 4), seed=2)
    D2FVelocity(net, schedule, "v_prediction", concat=cond_image)(x, 0.3)
    z, _, _ = net.calls[0]
    torch.testing.assert_close(z[:, 3:], cond_image)
    torch.testing.assert_close(z[:, :3], scale(0.3) * x)


def test_bad_arguments_are_refused():
    schedule = NAMED_SCHEDULES["sd"]
    net = TinyNet().double()
    with pytest.raises(ValueError, match="guidance_scale=3.0 needs uncond"):
        D2FVelocity(net, schedule, "epsilon", guidance_scale=3.0)
    with pytest.raises(ValueError, match="schedule must be a d2f.Schedule"):
        D2FVelocity(net, "sd", "epsilon")
    with pytest.raises(ValueError, match="prediction_type='x0' is not supported"):
        D2FVelocity(net, schedule, "x0")
    v = D2FVelocity(net, schedule, "epsilon", guidance_scale=2.0, uncond={"label": torch.zeros(1)})
    with pytest.raises(ValueError, match="same conditioning keys"):
        v(tensor((2, 3, 4, 4)), 0.5)
    eps = D2FVelocity(net, NAMED_SCHEDULES["sd_zero_snr"], "epsilon")
    with pytest.raises(ValueError, match="step 0 starts at t=0.0, where velocity_fn is singular"):
        eps.sample(tensor((1, 3, 4, 4)), ddim_grid(NAMED_SCHEDULES["sd_zero_snr"], 10, "trailing"))
    with pytest.raises(ValueError, match="the network returned shape \\(2, 1, 4, 4\\), expected \\(2, 3, 4, 4\\)"):
        D2FVelocity(TinyNet(out_channels=1).double(), schedule, "epsilon")(tensor((2, 3, 4, 4)), 0.5)


def test_quickstart_example_runs_and_matches_ddim(capsys):
    """examples/quickstart.py as a user runs it: the embedded teacher, converted, gives DDIM's samples."""
    import re
    import runpy
    from pathlib import Path

    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"), run_name="__main__")
    printed = capsys.readouterr().out
    assert float(re.search(r"over 10 steps: (\S+)", printed).group(1)) < 1e-4, printed
    assert "4 Heun steps: sample mean" in printed


@pytest.mark.parametrize("solver", ["euler", "heun", "midpoint"])
def test_an_unaligned_field_relabels_its_state_across_step_table_gaps_as_every_field_does(solver):
    """A naive-FM field (align_input=False) on a DDIM step table with gaps: its fused path keeps scale(t)*x
    fixed across each gap, exactly as the plain-velocity path (taken with a callback) does."""
    schedule = NAMED_SCHEDULES["sd"]
    table = ddim_grid(schedule, 7, "linspace")
    assert table.ndim == 2
    net = TinyNet().double()
    field = D2FVelocity(net, schedule, "velocity", align_input=False)
    noise = tensor((2, 3, 4, 4), seed=4)
    fused = field.sample(noise, table, solver=solver)
    plain = field.sample(noise, table, solver=solver, callback=lambda *a: None)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
