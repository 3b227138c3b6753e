"""d2f.deferred: every check raises the same error read later as read at once; the sampling loop and the
training step read nothing back from the device; capture's refusals."""

import math

import pytest
import torch

import d2f
from d2f import D2FVelocity, NonFiniteError, Schedule, fm_loss, uniform_grid
from d2f.deferred import DeferredChecks, deferred_checks, verify
from d2f.solvers import EULER, MULTISTEP, SOLVERS, ode_step
from d2f.training.objectives import OBJECTIVES, objective_loss
from nets import TinyNet

NAN = math.nan


def _loss(backend, data=None, t=0.5, weight=None):
    o = torch.randn(3, 2, 4, 4)
    data = torch.randn(3, 2, 4, 4) if data is None else data
    return fm_loss(o, data, torch.randn(3, 2, 4, 4), t, "v_prediction", weight=weight, backend=backend)


def _step(backend, o_u=None, h=0.1, mode=EULER):
    x = torch.randn(2, 3, 8)
    o_u = torch.randn(2, 3, 8) if o_u is None else o_u
    u1 = torch.randn(2, 3, 8) if mode == MULTISTEP else None
    return ode_step(
        mode, x, o_u, None, u1, 0.5, -1.0, h, 1.0, 1.0, torch.float16, backend, k=0.25 if u1 is not None else 0
    )


CASES = {
    "t out of [0, 1]": lambda: d2f.align(torch.randn(2, 3), 1.5),
    "NaN t": lambda: d2f.interpolate(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0.5, NAN])),
    "NaN input": lambda: d2f.align(torch.full((2, 3), NAN), 0.5),
    "singular t": lambda: d2f.velocity_coefficients(0.0, "epsilon"),
    "k out of range": lambda: Schedule.scaled_linear().fm_time(5000.0),
    "NaN guidance scale": lambda: d2f.guidance(torch.randn(2, 3), torch.randn(2, 3), NAN),
    "fm_loss NaN data (torch)": lambda: _loss("torch", data=torch.full((3, 2, 4, 4), NAN)),
    "fm_loss NaN data (triton)": lambda: _loss("triton", data=torch.full((3, 2, 4, 4), NAN)),
    "fm_loss t out of range (triton)": lambda: _loss("triton", t=torch.tensor([0.5, 1.5, 0.5])),
    "fm_loss negative weight (triton)": lambda: _loss("triton", weight=-1.0),
    "fm_loss negative weight (torch)": lambda: _loss("torch", weight=-1.0),
    "ode_step NaN output (torch)": lambda: _step("torch", o_u=torch.full((2, 3, 8), NAN)),
    "ode_step NaN output (triton)": lambda: _step("triton", o_u=torch.full((2, 3, 8), NAN)),
    "ode_step overflow (torch)": lambda: _step("torch", h=1e30),
    "ode_step overflow (triton)": lambda: _step("triton", h=1e30),
    "ode_step multistep NaN output (triton)": lambda: _step("triton", o_u=torch.full((2, 3, 8), NAN), mode=MULTISTEP),
}


@pytest.mark.parametrize("case", CASES)
def test_each_check_raises_the_same_error_later_inside_a_scope(case):
    with pytest.raises(ValueError) as at_once:
        CASES[case]()
    with deferred_checks() as checks:
        CASES[case]()  # no error yet
        assert len(checks) > 0
        with pytest.raises(ValueError) as later:
            checks.read()
    assert type(later.value) is type(at_once.value)
    assert str(later.value) == str(at_once.value)


def test_a_deferred_step_check_names_its_input_as_it_was_when_the_step_ran():
    """Inside a scope the step's inputs may be overwritten before the read (a captured graph reuses its buffers),
    so ode_step takes each input's flag when it runs: a NaN output, since overwritten, is still the one named."""
    with pytest.raises(NonFiniteError) as at_once:
        _step("torch", o_u=torch.full((2, 3, 8), NAN))
    o_u = torch.full((2, 3, 8), NAN)
    with deferred_checks() as checks:
        _step("torch", o_u=o_u)
        o_u.zero_()
        with pytest.raises(NonFiniteError) as later:
            checks.read()
    assert str(later.value) == str(at_once.value)


def test_the_first_failed_check_in_call_order_is_raised_and_the_queue_empties():
    with deferred_checks() as checks:
        d2f.align(torch.randn(2, 3), 0.5)  # passes
        d2f.align(torch.full((2, 3), NAN), 0.5)  # fails first
        d2f.align(torch.randn(2, 3), 1.5)  # fails too
        with pytest.raises(NonFiniteError, match="^align: x contains NaN or inf$"):
            checks.read()
        assert len(checks) == 0
        assert checks.read() == []


def test_read_returns_the_values_read_with_the_flags():
    with deferred_checks() as checks:
        d2f.align(torch.randn(2, 3), 0.5)
        assert checks.read(torch.tensor(2.5), torch.tensor([-1.0])) == [2.5, -1.0]


def test_leaving_a_scope_reads_it_and_an_exception_in_it_drops_the_queue():
    with pytest.raises(ValueError, match="must lie in"):
        with deferred_checks():
            d2f.align(torch.randn(2, 3), 1.5)
    with pytest.raises(KeyError):  # the block's own error, not the queued one
        with deferred_checks():
            d2f.align(torch.randn(2, 3), 1.5)
            raise KeyError("the block's")
    d2f.align(torch.randn(2, 3), 0.5)  # and outside a scope, checks are read at once again
    with pytest.raises(ValueError, match="must lie in"):
        d2f.align(torch.randn(2, 3), 1.5)


def test_an_inner_scope_joins_the_outer_one_and_contexts_compose():
    with deferred_checks() as outer:
        with deferred_checks() as inner:
            assert inner is outer
            with outer.within(lambda e: ValueError(f"outer: {e}")), outer.within(lambda e: ValueError(f"inner: {e}")):
                d2f.align(torch.randn(2, 3), 1.5)
        assert len(outer) == 2  # the range check and the finiteness check of the result; nothing read yet
        with pytest.raises(ValueError, match=r"^outer: inner: t must lie in \[0, 1\]; got 1.5"):
            outer.read()


def test_verify_hands_the_error_the_flags_values():
    seen = []
    with deferred_checks():
        verify(torch.tensor([0.0, 3.0]), lambda values: seen.append(values))
    assert seen == [[0.0, 3.0]]


def test_the_sampler_reports_the_step_a_nan_appeared_in_after_its_loop():
    """Noise holding NaN: the first step's state is named, after all steps ran (the net saw every call)."""
    calls = []
    net = TinyNet(1, 1).requires_grad_(False)
    field = D2FVelocity(lambda z, k: calls.append(1) or net(z, k), Schedule.scaled_linear(), "epsilon")
    noise = torch.randn(2, 1, 8, 8)
    noise[1, 0, 3, 3] = NAN
    with pytest.raises(NonFiniteError, match=r"^sample: step 1 of 4 \(euler, t .*\): the state contains NaN"):
        field.sample(noise, uniform_grid(4, field.schedule.t_min, 1.0))
    assert len(calls) == 4


# --------------------------------------------------------------------- no host read on the hot paths
# A tensor on the "meta" device has a shape and a dtype but no values, so any host read of it (``.item()``,
# ``bool()``, ``.tolist()``) raises: code that runs through on meta tensors makes no device-to-host transfer,
# which is what a CUDA graph needs and what keeps the host running ahead of the device.
def _meta_unet():
    from diffusers import UNet2DModel

    from d2f.networks.teachers import ARCHITECTURE

    return UNet2DModel(**ARCHITECTURE).to("meta")


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("guided", [False, True])
def test_the_sampling_loop_reads_nothing_from_the_device(solver, guided):
    unet = _meta_unet().eval()
    labels = torch.zeros(4, dtype=torch.long, device="meta")
    uncond = {"class_labels": torch.full((4,), 10, device="meta")} if guided else None
    field = D2FVelocity(
        unet, Schedule.scaled_linear(prediction_type="v_prediction"), "v_prediction", 2.0 if guided else 1.0, uncond
    )
    with deferred_checks() as checks:
        out = field.sample(
            torch.randn(4, 1, 16, 16, device="meta"),
            uniform_grid(6, 0.0, 1.0),
            solver,
            backend="torch",
            class_labels=labels,
        )
        assert out.device.type == "meta" and out.shape == (4, 1, 16, 16)
        queued = checks.take()  # reading them would be the one transfer, after the loop
    assert any(flags.device.type == "meta" for flags, _, _ in queued)
    with pytest.raises(Exception, match="meta"):  # the guard itself: a read of a meta tensor fails
        DeferredChecks(queued).read()


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_the_training_step_reads_nothing_from_the_device(objective):
    """Draws to loss and backward, as ``d2f.training.loop`` runs them; the trainer's one read is the step's loss
    with its flags (``guards.read_step``)."""
    from d2f import TrainConfig
    from d2f.training.draws import draws

    unet = _meta_unet().train()
    schedule = Schedule.scaled_linear(prediction_type="v_prediction")
    config = TrainConfig.teacher_task(objective=objective, cond_dropout=0.1)
    with deferred_checks() as checks:
        noise, times, drop = draws(config, torch.arange(4), (1, 16, 16), "v_prediction", schedule, "meta")
        labels = torch.where(drop, 10, torch.zeros(4, dtype=torch.long, device="meta"))
        data = torch.randn(4, 1, 16, 16, device="meta")
        network = lambda x, k: unet(x, k, class_labels=labels).sample  # noqa: E731
        loss = objective_loss(objective, network, schedule, "v_prediction", data, noise, times, torch.float32)
        loss.backward()
        checks.take()
    assert all(p.grad is not None for p in unet.parameters())


# ------------------------------------------------------------------------------------------------ capture
def test_capture_needs_cuda_noise_and_refuses_host_work_by_name():
    field = D2FVelocity(TinyNet(1, 1), Schedule.scaled_linear(), "epsilon")
    noise, ts = torch.randn(2, 1, 8, 8), uniform_grid(3, 0.05, 1.0)
    with pytest.raises(ValueError, match="capture=True .* CUDA device; it is on cpu"):
        field.sample(noise, ts, capture=True)
    with pytest.raises(ValueError, match="capture=True .* callback="):
        field.sample(noise, ts, capture=True, callback=lambda *a: None)
    with pytest.raises(ValueError, match="capture=True .* progress=True"):
        field.sample(noise, ts, capture=True, progress=True)
    with pytest.raises(ValueError, match="capture='yes' must be True or False"):
        field.sample(noise, ts, capture="yes")


@pytest.mark.gpu
@pytest.mark.parametrize("solver", SOLVERS)
def test_a_captured_sampler_equals_the_eager_one_and_reports_nan_after_the_replay(solver):
    from diffusers import UNet2DModel

    from d2f.networks.teachers import ARCHITECTURE

    torch.manual_seed(0)
    unet = UNet2DModel(**ARCHITECTURE).cuda().eval()
    field = D2FVelocity(unet, Schedule.scaled_linear(prediction_type="v_prediction"), "v_prediction")
    ts = uniform_grid(8, 0.0, 1.0)
    labels = torch.arange(16, device="cuda") % 10
    for seed in (1, 2):  # the second call replays the first call's recording with new noise and labels
        noise = torch.randn(16, 1, 16, 16, generator=torch.Generator().manual_seed(seed)).cuda()
        eager = field.sample(noise, ts, solver, class_labels=labels)
        captured = field.sample(noise, ts, solver, capture=True, class_labels=labels)
        torch.testing.assert_close(captured, eager, rtol=1e-5, atol=1e-5)
        labels = labels.flip(0)
    recording = field._recording
    noise[3, 0, 2, 2] = NAN
    with pytest.raises(NonFiniteError, match=r"^sample: step 1 of 8 .*: the state contains NaN"):
        field.sample(noise, ts, solver, capture=True, class_labels=labels)
    assert field._recording is recording  # replayed, not recorded again
