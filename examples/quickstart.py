"""Wrap a diffusers UNet with D2FVelocity, check it against DDIM, and sample it as a flow model.

No weights are downloaded: the UNet is built from a small config with a fixed seed, so the samples are
not images; the point is the API and the zero-shot identity (Euler on the DDIM grid == DDIM).
Swap in `UNet2DModel.from_pretrained(...)` or an SD UNet for real use.
"""

import torch
from diffusers import DDIMScheduler, UNet2DModel

import d2f

torch.manual_seed(0)
unet = UNet2DModel(
    sample_size=16,
    in_channels=1,
    out_channels=1,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"),
    up_block_types=("AttnUpBlock2D", "UpBlock2D"),
).eval()
scheduler = DDIMScheduler(
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="v_prediction",
)

# The conversion: the schedule (rebuilt in float64) and the velocity field of the network.
schedule = d2f.Schedule.from_diffusers(scheduler)
velocity = d2f.D2FVelocity(unet, schedule, prediction_type=schedule.prediction_type)
noise = torch.randn(4, 1, 16, 16)

# 1. Zero-shot: FM Euler on the DDIM-equivalent grid reproduces diffusers' DDIM.
steps = 10
ts = d2f.ddim_grid(schedule, steps, spacing="leading", steps_offset=1, set_alpha_to_one=False)
x = velocity.sample(noise, ts, progress=True)
fm_latent = d2f.scale(float(ts[-1])) * x  # DDIM ends at alphas_cumprod[0]: return to its latent space

scheduler.set_timesteps(steps)
z = noise
with torch.no_grad():
    for k in scheduler.timesteps:
        z = scheduler.step(unet(z, k).sample, k, z).prev_sample
print(f"max |FM Euler - DDIM| over {steps} steps: {float((fm_latent - z).abs().max()):.2e}")

# 2. As a flow model: any grid and solver, e.g. 4 Heun steps on an SD3-shifted grid from t_min.
ts = d2f.shift_grid(4, shift=2.0, t_start=schedule.t_min)
x = velocity.sample(noise, ts, solver="heun")
print(f"4 Heun steps: sample mean {float(x.mean()):+.3f}, std {float(x.std()):.3f}")
