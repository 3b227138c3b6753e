"""One training step (forward, backward, AdamW) of the embedded teacher: d2f against diffusion finetuning.

The paper claims Diff2Flow adds no overhead to a training step; the target here is within 2 %. Same
model (the 16x16 teacher at 24x24, LoRA rank 8 with full first/last convs, or full finetuning), same
batch of 32 MNIST digits, CPU.
"""

import pytest
import torch

pytest.importorskip("accelerate")

from d2f.training.conditioning import Conditioning  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.data import load_dataset  # noqa: E402
from d2f.training.draws import Stream, positions  # noqa: E402
from d2f.training.export import load_network  # noqa: E402
from d2f.training.loop import _micro_batch_loss  # noqa: E402
from d2f.training.models import add_lora, trainable_parameters  # noqa: E402


@pytest.mark.parametrize("lora_rank", [8, 0], ids=["lora8", "full"])
@pytest.mark.parametrize("objective", ["d2f", "diffusion"])
def test_train_step(benchmark, objective, lora_rank):
    torch.manual_seed(0)
    config = TrainConfig(objective=objective, lora_rank=lora_rank, batch_size=32, resolution=24)
    network = load_network("teacher")
    data = load_dataset("mnist", 24, 1)
    conditioning = Conditioning.plan(config, network, data)
    if lora_rank:
        add_lora(network, lora_rank, full_convs=True)
    network.unet.train()
    optimizer = torch.optim.AdamW(trainable_parameters(network.unet).values(), lr=1e-4)
    stream = Stream(len(data), 0)
    step = iter(range(10**6))
    benchmark.group = f"train step, batch 32 at 24x24, {'LoRA 8' if lora_rank else 'full'}"

    def once():
        where = positions(config, next(step), 0, 0, 1)
        loss = _micro_batch_loss(config, network, network.unet, data, stream, conditioning, where, "cpu")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    benchmark.pedantic(once, rounds=30, warmup_rounds=3)
