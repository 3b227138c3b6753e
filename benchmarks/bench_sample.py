"""Sampling the embedded teacher for 25 network calls: d2f's sampler (the FM Euler loop of ``D2FVelocity.sample``,
on the DDIM grid, so it computes DDIM's images) against diffusers' own DDIM loop (``DDIMScheduler`` with
``set_timesteps``, ``scale_model_input``, the UNet and ``step``, as its pipelines run it) on the same UNet and
noise. Wall time per batch of 64 class-conditional 16x16 images; the network dominates both, so the gap is
what each loop adds around it (d2f: the conversion, the fused update and its checks, read once after the loop).
On CUDA a third row replays d2f's loop recorded as a CUDA graph (``capture=True``)."""

import pytest
import torch

pytest.importorskip("diffusers")

from common import DEVICE, needs_cuda, sync  # noqa: E402
from d2f.grids import sampling_grid  # noqa: E402
from d2f.networks.export import ddim_config, load  # noqa: E402
from d2f.networks.sampling import scheduler_loop  # noqa: E402

STEPS, BATCH = 25, 64


LOOPS = [
    "d2f euler, ddim grid",
    pytest.param("d2f euler, ddim grid, captured", marks=needs_cuda),
    "diffusers ddim",
]


@pytest.mark.parametrize("loop", LOOPS)
def test_sample_teacher(benchmark, loop):
    from diffusers import DDIMScheduler

    field = load("teacher", device=DEVICE)
    noise = torch.randn(BATCH, 1, 16, 16, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    labels = (torch.arange(BATCH) % 10).to(DEVICE)
    config = {**ddim_config(field.schedule, field.prediction_type), "set_alpha_to_one": True}
    ts = sampling_grid("ddim", STEPS, field.schedule, field.prediction_type, steps_offset=1)
    benchmark.group = f"sampling the teacher, {STEPS} calls, batch {BATCH} at 16x16"

    @torch.no_grad()
    def once():
        if loop == "diffusers ddim":
            scheduler_loop(field.net, DDIMScheduler.from_config(config), noise, STEPS, {"class_labels": labels})
        else:
            field.sample(noise, ts, capture=loop.endswith("captured"), class_labels=labels)
        sync()

    benchmark.pedantic(once, rounds=10, warmup_rounds=2)


def test_the_two_loops_compute_the_same_images():
    """The comparison is fair: both loops give DDIM's images (the converted sampler is DDIM, E1)."""
    from diffusers import DDIMScheduler

    field = load("teacher")
    noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(4)
    config = {**ddim_config(field.schedule, field.prediction_type), "set_alpha_to_one": True}
    ts = sampling_grid("ddim", STEPS, field.schedule, field.prediction_type, steps_offset=1)
    with torch.no_grad():
        ddim = scheduler_loop(field.net, DDIMScheduler.from_config(config), noise, STEPS, {"class_labels": labels})
        ours = field.sample(noise, ts, class_labels=labels)
    torch.testing.assert_close(ours, ddim, rtol=1e-4, atol=1e-4)
