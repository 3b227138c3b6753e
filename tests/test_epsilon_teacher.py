"""FM sampling of a *trained* epsilon-prediction network (SD 1.x's kind): the shipped ``teacher-epsilon``, SD's
schedule. Random weights cannot show what these check: where FM grids start decides whether the latents keep
DDIM's scale, and the images their quality."""

import pytest
import torch

pytest.importorskip("diffusers")
from diffusers import DDIMScheduler, UNet2DModel  # noqa: E402

import d2f  # noqa: E402
from d2f.data.images import mnist  # noqa: E402
from d2f.evaluation.classifier import load_classifier  # noqa: E402
from d2f.evaluation.metrics import features, fid  # noqa: E402
from d2f.networks.export import ddim_config, read_export  # noqa: E402
from d2f.networks.teachers import teacher_path  # noqa: E402

TEACHER = teacher_path(prediction_type="epsilon")


@pytest.fixture(scope="module")
def unet():
    return UNet2DModel.from_pretrained(TEACHER / "unet").eval()


@torch.no_grad()
def pipeline_loop(unet, scheduler, calls, noise, labels):
    """DDPMPipeline's loop (with the teacher's class labels): the latent after every step."""
    scheduler.set_timesteps(calls)
    latents = [noise * scheduler.init_noise_sigma]
    for k in scheduler.timesteps:
        z_in = scheduler.scale_model_input(latents[-1], k)
        out = unet(z_in, k.float().expand(len(noise)), class_labels=labels).sample
        latents.append(scheduler.step(out, k, latents[-1]).prev_sample)
    return latents


def d2f_scheduler(**settings):
    return d2f.D2FScheduler.from_pretrained(TEACHER, subfolder="scheduler", **settings)


def ddim_scheduler(spacing):
    """DDIM on the teacher's schedule with its own step rule (leading, offset 1) or trailing spacing."""
    export = read_export(TEACHER)
    config = ddim_config(export.schedule, export.meta["prediction_type"])
    return DDIMScheduler.from_config({**config, "timestep_spacing": spacing})


@pytest.mark.parametrize(
    "settings", [dict(solver="auto"), dict(solver="euler", grid="uniform"), dict(solver="midpoint", grid="shift")]
)
def test_latents_keep_ddims_scale_at_every_step(unet, settings):
    """Every step's latent std stays within DDIM's range (15 % either way: ``alpha*data + sigma*noise`` lies
    between the data's std and the noise's), and the last one within 15 % of DDIM's last. From t = 1e-3, below
    the lowest timestep the network was trained at, the same loop's latents blow up (the defect: std 28 and
    more in SD 1.x-like pipelines)."""
    noise = torch.randn(20, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 10
    ddim = [float(z.std()) for z in pipeline_loop(unet, ddim_scheduler("leading"), 4, noise, labels)]
    ours = [float(z.std()) for z in pipeline_loop(unet, d2f_scheduler(**settings), 4, noise, labels)]
    assert 0.85 * min(ddim) < min(ours) and max(ours) < 1.15 * max(ddim), (ours, ddim)
    assert abs(ours[-1] / ddim[-1] - 1) < 0.15, (ours, ddim)
    below = pipeline_loop(unet, d2f_scheduler(**settings, t_min=1e-3), 4, noise, labels)
    assert max(float(z.std()) for z in below) > 10


def test_auto_at_4_and_6_calls_beats_ddim_on_fid(unet):
    """FID (500 samples, the evaluation classifier) of solver="auto" against DDIM at the same network calls, both
    its own leading rule and trailing spacing. Measured here: 4 calls, auto 4.72 against DDIM 13.46 / 12.35;
    6 calls, 5.02 against 8.16 / 7.42."""
    classifier = load_classifier()
    real = features(classifier, mnist(16).images)
    noise = torch.randn(500, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(500) % 10

    def score(scheduler, calls):
        return fid(real, features(classifier, pipeline_loop(unet, scheduler, calls, noise, labels)[-1]))

    for calls in (4, 6):
        auto = score(d2f_scheduler(solver="auto"), calls)
        for spacing in ("leading", "trailing"):
            assert auto < score(ddim_scheduler(spacing), calls), (calls, spacing)
