"""One training step of a Stable-Diffusion-2.1-sized UNet: Diff2Flow against diffusion finetuning, LoRA and
full, with and without gradient checkpointing. Time (pytest-benchmark) and peak memory (``extra_info``).

The UNet is built from SD 2.1's architecture (865M parameters) with random weights: the step's cost does
not depend on the weights, and nothing is downloaded. On the CPU: batch 1 at 32x32 latents (256 px), text
embeddings of 77x1024. On CUDA: batch 4 at 96x96 latents (768 px, SD 2.1's own size), bf16 autocast.
Peak memory is the process's resident high-water mark on the CPU (reset before each case through
``/proc/self/clear_refs``) and ``torch.cuda.max_memory_allocated`` on CUDA.
"""

from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate")
pytest.importorskip("diffusers")

from d2f.data.images import Dataset  # noqa: E402
from d2f.networks.models import Network, add_lora, trainable_parameters  # noqa: E402
from d2f.schedule import Schedule  # noqa: E402
from d2f.training.conditioning import Conditioning  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.draws import Stream, positions  # noqa: E402
from d2f.training.loop import _micro_batch_loss  # noqa: E402

SD21_UNET = dict(
    sample_size=96,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=1024,
    attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True,
)
CUDA = torch.cuda.is_available()
BATCH, SIZE = (4, 96) if CUDA else (1, 32)


def reset_peak() -> None:
    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")


def peak_gib() -> float:
    if CUDA:
        return torch.cuda.max_memory_allocated() / 2**30
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 2**20


# The objective varies fastest, so each d2f case runs right beside its diffusion twin (on a 2-core machine
# the first cases of a session ran slowest).
@pytest.mark.parametrize("objective", ["d2f", "diffusion"])
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "grad-ckpt"])
@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora8", "full"])
def test_sd21_train_step(benchmark, objective, lora_rank, checkpointing):
    from diffusers import UNet2DConditionModel

    device = "cuda" if CUDA else "cpu"
    torch.manual_seed(0)
    reset_peak()
    unet = UNet2DConditionModel(**SD21_UNET).to(device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    schedule = Schedule.scaled_linear(prediction_type="v_prediction")
    network = Network(unet, schedule, "v_prediction", None, "sd21-architecture", "StableDiffusionPipeline")
    g = torch.Generator().manual_seed(0)
    data = Dataset(
        images=torch.randn(64, 4, SIZE, SIZE, generator=g),
        encoder_hidden_states=torch.randn(64, 77, 1024, generator=g),
        null_encoder_hidden_states=torch.zeros(77, 1024),
    )
    config = TrainConfig.teacher_task(objective=objective, lora_rank=lora_rank, batch_size=BATCH, resolution=SIZE)
    conditioning = Conditioning.plan(config, network, data)
    if lora_rank:
        add_lora(network, lora_rank, full_convs=None)
    else:
        unet.requires_grad_(True)
    unet.train()
    optimizer = torch.optim.AdamW(trainable_parameters(unet).values(), lr=1e-5)
    stream, step = Stream(len(data), 0), iter(range(10**6))
    autocast = torch.autocast("cuda", torch.bfloat16) if CUDA else torch.autocast("cpu", enabled=False)
    benchmark.group = f"SD 2.1 UNet train step, batch {BATCH} at {SIZE}x{SIZE} latents, {device}"

    def once():
        with autocast:
            loss = _micro_batch_loss(
                config, network, unet, data, stream, conditioning, positions(config, next(step), 0, 0, 1), device
            )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(once, rounds=10, warmup_rounds=2)
    benchmark.extra_info["peak_memory_gib"] = round(peak_gib(), 2)
    benchmark.extra_info["trainable_parameters"] = sum(p.numel() for p in trainable_parameters(unet).values())
