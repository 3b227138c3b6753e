"""One training step (forward, backward, AdamW) of the embedded teacher: d2f against diffusion finetuning,
and against a plain diffusers-style step written here.

The paper claims Diff2Flow adds no overhead to a training step; the target here is within 2 % of d2f's own
diffusion objective, and within 1 % of the plain step (issue: zero overhead). Same model (the 16x16 teacher
at 24x24, LoRA rank 8 with full first/last convs, or full finetuning), same batch of 32 MNIST digits, on the
GPU where there is one (``benchmarks/gpu.sh``), else the CPU.

The plain step is what diffusers' training scripts do: ``torch.randn_like`` and ``torch.randint`` on the
device, ``DDPMScheduler.add_noise``, the UNet, MSE against the scheduler's target (``get_velocity`` for
v-prediction), backward, AdamW. It takes its batch from the same data stream as d2f's, and it has no
conditioning dropout (d2f's step draws a dropout coin per sample).
"""

import pytest
import torch

pytest.importorskip("accelerate")

from common import DEVICE, sync  # noqa: E402
from d2f.data.datasets import load_dataset  # noqa: E402
from d2f.networks.export import load_network  # noqa: E402
from d2f.networks.models import add_lora, trainable_parameters  # noqa: E402
from d2f.training.conditioning import Conditioning  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.draws import Stream, positions  # noqa: E402
from d2f.training.loop import _micro_batch_loss  # noqa: E402


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora8", "full"])
@pytest.mark.parametrize("objective", ["d2f", "diffusion"])
def test_train_step(benchmark, objective, lora_rank):
    torch.manual_seed(0)
    config = TrainConfig.teacher_task(objective=objective, lora_rank=lora_rank, batch_size=32, resolution=24)
    network = load_network("teacher")
    data = load_dataset("mnist", 24, 1)
    conditioning = Conditioning.plan(config, network, data)
    if lora_rank:
        add_lora(network, lora_rank, full_convs=True)
    network.unet.to(DEVICE).train()
    optimizer = torch.optim.AdamW(trainable_parameters(network.unet).values(), lr=1e-4)
    stream = Stream(len(data), 0)
    step = iter(range(10**6))
    benchmark.group = f"train step, batch 32 at 24x24, {'LoRA 8' if lora_rank else 'full'}"

    def once():
        where = positions(config, next(step), 0, 0, 1)
        loss = _micro_batch_loss(config, network, network.unet, data, stream, conditioning, where, DEVICE)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    benchmark.pedantic(once, rounds=30, warmup_rounds=3)


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora8", "full"])
def test_train_step_plain_diffusers(benchmark, lora_rank):
    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    config = TrainConfig.teacher_task(objective="diffusion", lora_rank=lora_rank, batch_size=32, resolution=24)
    network = load_network("teacher")
    data = load_dataset("mnist", 24, 1)
    scheduler = DDPMScheduler.from_config(
        {**network.schedule.diffusers_config(), "prediction_type": network.prediction_type}
    )
    if lora_rank:
        add_lora(network, lora_rank, full_convs=True)
    unet = network.unet.to(DEVICE).train()
    optimizer = torch.optim.AdamW(trainable_parameters(unet).values(), lr=1e-4)
    stream = Stream(len(data), 0)
    step = iter(range(10**6))
    benchmark.group = f"train step, batch 32 at 24x24, {'LoRA 8' if lora_rank else 'full'}"

    def once():
        indices = stream.indices(positions(config, next(step), 0, 0, 1))
        clean, labels = data.images[indices].to(DEVICE), data.labels[indices].to(DEVICE)
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (len(clean),), device=DEVICE)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        target = scheduler.get_velocity(clean, noise, timesteps) if network.prediction_type == "v_prediction" else noise
        pred = unet(noisy, timesteps, class_labels=labels).sample
        torch.nn.functional.mse_loss(pred.float(), target.float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()

    benchmark.pedantic(once, rounds=30, warmup_rounds=3)
