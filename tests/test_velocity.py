from types import SimpleNamespace

import pytest
import torch
from diffusers import DDIMScheduler

from d2f import D2FVelocity, Schedule, ddim_grid, diffusion_to_velocity, guidance, scale, shift_grid, uniform_grid
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
    with pytest.raises(ValueError, match="^schedule must be a d2f.Schedule, got str$"):
        D2FVelocity(net, "sd", "epsilon")
    with pytest.raises(ValueError, match="prediction_type='x0' is not supported"):
        D2FVelocity(net, schedule, "x0")
    v = D2FVelocity(net, schedule, "epsilon", guidance_scale=2.0, uncond={"label": torch.zeros(1)})
    with pytest.raises(ValueError, match="same conditioning keys"):
        v(tensor((2, 3, 4, 4)), 0.5)
    with pytest.raises(ValueError, match="^t must be a float or a tensor, got bool$"):  # the solvers' field protocol
        v.outputs(tensor((2, 3, 4, 4)), True, {"label": torch.ones(2)})
    eps = D2FVelocity(net, NAMED_SCHEDULES["sd_zero_snr"], "epsilon")
    with pytest.raises(ValueError, match="step 0 starts at t=0.0, where velocity_fn is singular"):
        eps.sample(tensor((1, 3, 4, 4)), ddim_grid(NAMED_SCHEDULES["sd_zero_snr"], 10, "trailing"))
    with pytest.raises(ValueError, match="the network returned shape \\(2, 1, 4, 4\\), expected \\(2, 3, 4, 4\\)"):
        D2FVelocity(TinyNet(out_channels=1).double(), schedule, "epsilon")(tensor((2, 3, 4, 4)), 0.5)


class Returns(torch.nn.Module):
    """TinyNet whose output is handed back through ``wrap``, as networks other than a plain module return it."""

    def __init__(self, wrap):
        super().__init__()
        self.net, self.wrap = TinyNet().double(), wrap

    def forward(self, z, k):
        return self.wrap(self.net(z, k))


def test_a_network_may_return_a_tensor_an_object_with_sample_or_a_tuple_led_by_a_tensor():
    """diffusers' models return an object with ``.sample``, or a tuple with ``return_dict=False``; anything else
    is refused, naming its type."""
    schedule, z = NAMED_SCHEDULES["sd"], tensor((2, 3, 4, 4))
    want = D2FVelocity(Returns(lambda out: out), schedule, "epsilon")(z, 0.5)
    for wrap in (lambda out: SimpleNamespace(sample=out), lambda out: (out,), lambda out: [out, "extra"]):
        torch.testing.assert_close(D2FVelocity(Returns(wrap), schedule, "epsilon")(z, 0.5), want)
    for wrap, name in ((lambda out: (), "tuple"), (lambda out: ("text", out), "tuple"), (lambda out: {0: out}, "dict")):
        with pytest.raises(
            ValueError, match=f"^the network returned {name}; expected a tensor or an object with .sample$"
        ):
            D2FVelocity(Returns(wrap), schedule, "epsilon")(z, 0.5)


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


class Recorder:
    """A network that is no nn.Module: it states its dtype (as diffusers models do), returns a tuple (diffusers'
    ``return_dict=False``) and records its inputs. Its output is tanh of the input's first ``channels`` channels,
    in ``out_dtype`` (default: the input's)."""

    def __init__(self, dtype, channels=3, out_dtype=None):
        self.dtype, self.channels, self.out_dtype, self.calls = dtype, channels, out_dtype, []

    def __call__(self, z, k, **cond):
        self.calls.append((z, k, cond))
        return (torch.tanh(z[:, : self.channels]).to(self.out_dtype or z.dtype),)


def test_the_network_gets_inputs_in_its_own_dtype_and_outputs_come_back_in_float32_at_least():
    schedule = NAMED_SCHEDULES["sd"]
    net = Recorder(torch.float64)
    D2FVelocity(net, schedule, "epsilon")(tensor((2, 3, 4), torch.float32), 0.5)
    assert net.calls[-1][0].dtype == torch.float64  # its .dtype, not the state's float32
    half = D2FVelocity(Recorder(torch.float16), schedule, "epsilon")
    assert half.model_output(tensor((2, 3, 4), torch.float32), 0.5).dtype == torch.float32
    dtypes = []

    def plain(z, k):  # no dtype: a float64 state gives float64 inputs at every step, not only the first
        dtypes.append(z.dtype)
        return torch.tanh(z)

    D2FVelocity(plain, schedule, "v_prediction").sample(tensor((2, 3)), uniform_grid(3, schedule.t_min, 1.0))
    assert dtypes == [torch.float64] * 3


def test_guided_conditioning_and_concat_reach_the_network_broadcast_and_cast():
    """An unconditional batch of 1 is broadcast to the call's batch and cast to the call's dtype; concat
    channels (fewer than the batch) are cast to the network input's dtype; both halves of the batched call see
    the same concat."""
    schedule = NAMED_SCHEDULES["sd"]
    net = Recorder(torch.float32, channels=2)
    null, text = tensor((1, 2, 5), seed=1), tensor((3, 2, 5), torch.float32, seed=2)
    concat = tensor((3, 1, 4), seed=3)
    field = D2FVelocity(net, schedule, "v_prediction", guidance_scale=2.0, uncond={"text": null}, concat=concat)
    field(tensor((3, 2, 4), torch.float32), 0.4, text=text)
    z, _, cond = net.calls[-1]
    assert z.dtype == cond["text"].dtype == torch.float32 and z.shape == (6, 3, 4)
    torch.testing.assert_close(z[:3, 2:], concat.float())
    torch.testing.assert_close(z[3:, 2:], concat.float())
    torch.testing.assert_close(cond["text"], torch.cat([null.float().expand(3, 2, 5), text]))
    batch_of_2 = D2FVelocity(net, schedule, "v_prediction", 2.0, {"text": null.expand(2, 2, 5)})
    with pytest.raises(
        ValueError, match="uncond\\['text'\\] has shape \\(2, 2, 5\\), the call's text has \\(3, 2, 5\\)"
    ):
        batch_of_2(tensor((3, 2, 4)), 0.4, text=text)
    with pytest.raises(ValueError, match="conditioning 'text' differs between uncond \\(\\{"):
        D2FVelocity(net, schedule, "v_prediction", 2.0, {"text": {"a": 1}})(tensor((3, 2, 4)), 0.4, text=text)
    with pytest.raises(ValueError, match="concat has shape \\(2, 1, 4\\), incompatible with x of shape \\(3, 2, 4\\)"):
        D2FVelocity(net, schedule, "v_prediction", concat=concat[:2])(tensor((3, 2, 4)), 0.4)
    flat = D2FVelocity(net, schedule, "v_prediction", concat=tensor((3, 1)))  # (B, C) states take (B, C') concat
    assert flat(tensor((3, 2)), 0.4).shape == (3, 2)


def test_a_naive_fm_field_feeds_the_raw_state_at_the_raw_time():
    net = Recorder(torch.float64)
    x, t = tensor((2, 3, 4)), torch.tensor([0.25, 0.75])
    D2FVelocity(net, NAMED_SCHEDULES["sd"], "velocity", align_input=False)(x, t)
    z, k, _ = net.calls[-1]
    torch.testing.assert_close(z, x)
    torch.testing.assert_close(k, t)


def test_t_min_and_the_fields_grids():
    """Epsilon under zero terminal SNR was never trained at tau_{T-1} = 0, so its lowest time is tau_{T-2}; a
    field's grids start at its t_min with the shift it is given (default 3)."""
    zero_snr, net = NAMED_SCHEDULES["sd_zero_snr"], Recorder(torch.float64)
    assert D2FVelocity(net, zero_snr, "epsilon").t_min == zero_snr.taus[-2] > 0
    assert D2FVelocity(net, zero_snr, "v_prediction").t_min == 0.0
    field = D2FVelocity(net, NAMED_SCHEDULES["sd"], "v_prediction", t_min=0.2)
    torch.testing.assert_close(field.grid("shift", 4), shift_grid(4, 3.0, 0.2, 1.0))
    torch.testing.assert_close(field.grid("shift", 4, 2.0), shift_grid(4, 2.0, 0.2, 1.0))
    with pytest.raises(ValueError, match="^t_min must lie in \\[0, 1\\]; got 1.5"):
        D2FVelocity(net, NAMED_SCHEDULES["sd"], "v_prediction", t_min=1.5)


def test_errors_of_a_call_name_the_argument_at_fault():
    schedule = NAMED_SCHEDULES["sd"]
    field = D2FVelocity(Recorder(torch.float32), schedule, "epsilon")
    x = tensor((2, 3, 4), torch.float32)
    for call in (field, field.model_output):
        with pytest.raises(ValueError, match="t has shape \\(3,\\) but the batch has shape \\(2, 3, 4\\)"):
            call(x, torch.full((3,), 0.5))
    bad = x.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="^D2FVelocity: x contains NaN or inf$"):
        field(bad, 0.5)

    def huge(z, k):  # u = (x - o)/t overflows float32 at t = 0.5 from finite x and o
        return torch.full_like(z, -3e38)

    with pytest.raises(ValueError, match="^D2FVelocity: the velocity overflowed torch.float32"):
        D2FVelocity(huge, schedule, "epsilon")(x, 0.5)

    def complex_net(z, k):
        return torch.complex(z, z)

    with pytest.raises(ValueError, match="complex tensor .* at t=tensor\\(\\[0.25, 0.75\\], dtype=torch.float64\\)"):
        D2FVelocity(complex_net, schedule, "epsilon")(x, torch.tensor([0.25, 0.75], dtype=torch.float64))


def test_the_prediction_type_warning_points_at_the_callers_line():
    with pytest.warns(UserWarning, match="but the schedule records 'epsilon'") as record:
        D2FVelocity(Recorder(torch.float64), Schedule.scaled_linear(prediction_type="epsilon"), "v_prediction")
    assert record[0].filename == __file__
