"""Times, weights and conditions given on the host follow the state to its device.

On a GPU a time given as a CPU tensor has to move to the batch's device; on a CPU-only machine every tensor is on
one device, and a missing move goes unseen. The ``meta`` device is the second device here: its tensors have shapes
and dtypes but no values, an op mixing one with a CPU tensor of one or more dimensions raises, and a result left
behind on the CPU shows in its ``device``. The finiteness checks, which would read values, are deferred
(:func:`d2f.deferred_checks`) and never read.
"""

import pytest
import torch

import d2f
from d2f import D2FScheduler, D2FVelocity, Schedule, diffusion_to_velocity, fm_loss, velocity_to_diffusion
from d2f.deferred import deferred_checks
from d2f.time_samplers import diffusion_matched_t
from nets import TinyNet

META = torch.device("meta")
SCHEDULE = Schedule.scaled_linear(prediction_type="epsilon")


def on_meta(*shape):
    return torch.empty(*shape, device=META)


def computed_on_meta(compute):
    with deferred_checks() as checks:
        out = compute()
        checks.take()
    assert out.device == META


@pytest.mark.parametrize("convert", [diffusion_to_velocity, velocity_to_diffusion])
def test_a_host_time_follows_the_state(convert):
    computed_on_meta(lambda: convert(on_meta(2, 3, 4, 4), on_meta(2, 3, 4, 4), torch.tensor([0.3, 0.6]), "epsilon"))


def test_the_loss_takes_host_times_and_weights():
    x = on_meta(2, 3, 4, 4)
    host = torch.tensor([0.3, 0.6])
    computed_on_meta(lambda: fm_loss(x, x, x, host, "epsilon", weight=host, reduction="none", backend="torch"))


def test_the_schedule_maps_times_on_their_own_device():
    computed_on_meta(lambda: SCHEDULE.fm_time(on_meta(2)))
    computed_on_meta(lambda: SCHEDULE.timestep(on_meta(2).fill_(0.5)))
    computed_on_meta(lambda: diffusion_matched_t(on_meta(4), "epsilon", SCHEDULE))


def test_host_conditions_follow_the_state_into_the_network():
    net = TinyNet(4, 3).to(META)
    field = D2FVelocity(
        net, SCHEDULE, "epsilon", guidance_scale=2.0, uncond={"label": torch.zeros(1)}, concat=torch.zeros(2, 1, 4, 4)
    )
    label = torch.ones(2, device=META)
    computed_on_meta(lambda: field(on_meta(2, 3, 4, 4), torch.tensor([0.3, 0.6]), label=label))
    noise = on_meta(2, 3, 4, 4)
    computed_on_meta(lambda: field.sample(noise, d2f.uniform_grid(3, 0.1, 1.0), label=label, backend="torch"))


def test_the_schedulers_timesteps_are_on_the_device_asked_for():
    scheduler = D2FScheduler()
    scheduler.set_timesteps(4, device=META)
    assert scheduler.timesteps.device == META


@pytest.mark.parametrize("method", ["add_noise", "get_velocity"])
def test_the_schedulers_training_targets_take_host_timesteps(method):
    x = on_meta(2, 3, 4, 4)
    computed_on_meta(lambda: getattr(D2FScheduler(), method)(x, x, torch.tensor([10, 500])))
