"""Wrap a diffusers UNet with D2FVelocity, check it against DDIM, and sample it as a flow model.

The UNet is d2f's embedded teacher (a small class-conditional MNIST model that ships with the package), loaded
the way any diffusers UNet and scheduler are loaded from a local folder; nothing is downloaded. Swap in your
own `UNet2DModel.from_pretrained(...)` / `DDIMScheduler.from_pretrained(...)` for real use.
"""

import torch
from diffusers import DDIMScheduler, UNet2DModel

import d2f
from d2f.networks.teachers import teacher_path

unet = UNet2DModel.from_pretrained(teacher_path() / "unet").eval()
scheduler = DDIMScheduler.from_pretrained(teacher_path() / "scheduler")

# The conversion: the schedule (rebuilt in float64) and the velocity field of the network.
schedule = d2f.Schedule.from_diffusers(scheduler)
velocity = d2f.D2FVelocity(unet, schedule, prediction_type=schedule.prediction_type)
noise = torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
digits = torch.tensor([3, 1, 4, 1])  # class labels, passed through to the UNet

# 1. Zero-shot: FM Euler on the DDIM-equivalent grid reproduces diffusers' DDIM.
steps = 10
ts = d2f.ddim_grid(schedule, steps, spacing="leading", steps_offset=1, set_alpha_to_one=False)
x = velocity.sample(noise, ts, progress=True, class_labels=digits)
fm_latent = d2f.scale(float(ts[-1])) * x  # DDIM ends at alphas_cumprod[0]: return to its latent space

scheduler.set_timesteps(steps)
z = noise
with torch.no_grad():
    for k in scheduler.timesteps:
        z = scheduler.step(unet(z, k, class_labels=digits).sample, k, z).prev_sample
print(f"max |FM Euler - DDIM| over {steps} steps: {float((fm_latent - z).abs().max()):.2e}")

# 2. As a flow model: any grid and solver, e.g. 4 Heun steps on an SD3-shifted grid from t_min.
ts = d2f.shift_grid(4, shift=2.0, t_start=schedule.t_min)
x = velocity.sample(noise, ts, solver="heun", class_labels=digits)
print(f"4 Heun steps: sample mean {float(x.mean()):+.3f}, std {float(x.std()):.3f}")
