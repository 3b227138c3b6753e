"""The trainer's random numbers (d2f.training.draws): Philox4x32-10 against its published known answers, the
uniforms and normals made from it, and draws that depend on the sample's position alone."""

import math

import numpy as np
import pytest
import torch

from d2f.schedule import Schedule
from d2f.training.config import DEFAULT_T_SAMPLER, DEFAULT_T_SAMPLER_EPSILON, TrainConfig
from d2f.training.draws import Stream, draws, normals, philox, positions, seed_of, uniforms

# Random123's known-answer vectors for Philox4x32-10 (counter words, 64-bit key, output words).
KAT = [
    ((0, 0, 0, 0), 0, (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, 0xFFFFFFFFFFFFFFFF, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        0x299F31D0A4093822,
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize(("counter", "key", "expected"), KAT)
def test_philox_gives_the_published_known_answers(counter, key, expected):
    out = philox(key, tuple(torch.tensor([c]) for c in counter))
    assert tuple(int(x) for x in out) == expected


def test_uniforms_and_normals_have_their_distributions():
    n = 40000
    u = uniforms(7, torch.arange(n), 1, 1)[:, 0].double().numpy()
    assert u.min() > 0 and u.max() < 1
    x = np.sort(u)
    assert np.max(np.abs(x - np.arange(1, n + 1) / n)) < 1.95 / math.sqrt(n)  # Kolmogorov-Smirnov, 0.1 %
    z = normals(7, torch.arange(n), 2, 3).double()
    assert z.dtype == torch.float64 and abs(float(z.mean())) < 0.02 and abs(float(z.std()) - 1) < 0.02
    cdf = np.vectorize(lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2))))
    sorted_z = np.sort(z[:, 0].numpy())
    assert np.max(np.abs(cdf(sorted_z) - np.arange(1, n + 1) / n)) < 1.95 / math.sqrt(n)
    pairs = torch.corrcoef(z.T)
    assert float((pairs - torch.eye(3, dtype=torch.float64)).abs().max()) < 0.03  # the columns are independent


@pytest.mark.parametrize("objective", ["d2f", "diffusion"])
def test_draws_depend_on_the_position_alone(objective):
    """A micro-batch's draws, computed together, are each sample's draws computed alone, at any split: the
    uniforms and coins exactly, the noise and times to the last bit of the vectorised float transforms
    (``log``, ``cos``, ``sigmoid`` may round a tail element otherwise); another seed draws otherwise; the coins
    follow cond_dropout."""
    config = TrainConfig.teacher_task(objective=objective, seed=3, cond_dropout=0.5)
    schedule = Schedule.linear(1000, 1e-4, 0.02)
    where = torch.arange(100, 164)
    noise, times, drop = draws(config, where, (1, 4, 4), "v_prediction", schedule)
    assert noise.shape == (64, 1, 4, 4) and times.shape == drop.shape == (64,)
    for part in (where[:5], where[37:38], where[60:]):
        again = draws(config, part, (1, 4, 4), "v_prediction", schedule)
        offset = int(part[0]) - 100
        torch.testing.assert_close(again[0], noise[offset : offset + len(part)], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(again[1], times[offset : offset + len(part)], rtol=1e-12, atol=0)
        assert torch.equal(again[2], drop[offset : offset + len(part)])
        part_uniforms = uniforms(3, part, 1, 2)
        assert torch.equal(part_uniforms, uniforms(3, where, 1, 2)[offset : offset + len(part)])
    other = draws(config.replace(seed=4), where, (1, 4, 4), "v_prediction", schedule)
    assert not torch.equal(other[0], noise)
    assert 16 < int(drop.sum()) < 48
    if objective == "diffusion":
        assert times.dtype == torch.int64 and int(times.min()) >= 0 and int(times.max()) < 1000
    else:
        assert times.dtype == torch.float64 and float(times.min()) > 0 and float(times.max()) < 1


def test_an_epsilon_networks_times_come_from_its_own_default_sampler():
    """With no t_sampler set, the run draws the times of an epsilon network from DEFAULT_T_SAMPLER_EPSILON and
    those of any other from DEFAULT_T_SAMPLER (TrainConfig.t_sampler_for): the same uniforms, another law."""
    config, schedule, where = (
        TrainConfig.teacher_task(objective="d2f", seed=3),
        Schedule.scaled_linear(),
        torch.arange(64),
    )

    def times(prediction_type, t_sampler=None):
        return draws(config.replace(t_sampler=t_sampler), where, (1, 2, 2), prediction_type, schedule)[1]

    assert torch.equal(times("epsilon"), times("epsilon", DEFAULT_T_SAMPLER_EPSILON))
    assert torch.equal(times("v_prediction"), times("v_prediction", DEFAULT_T_SAMPLER))
    assert not torch.equal(times("epsilon"), times("epsilon", DEFAULT_T_SAMPLER))


def test_a_checkpoint_from_the_earlier_draw_scheme_is_not_resumed(tmp_path):
    """Resuming a run under other draws would silently make it another run: refused by name, nothing written."""
    pytest.importorskip("diffusers")  # the GPU image runs this file for its kernel test, without diffusers
    import json

    from d2f.training.draws import DRAWS
    from d2f.training.loop import train

    small = dict(resolution=16, batch_size=2, max_steps=2, num_samples=2, sample_steps=1, checkpoint_every=1)
    config = TrainConfig.teacher_task(out=str(tmp_path / "run"), warmup_steps=0, **small)
    train(config, progress=False)
    state_file = tmp_path / "run/checkpoints/step-00000002/state.json"
    state = json.loads(state_file.read_text())
    assert state["draws"] == DRAWS
    del state["draws"]  # as every checkpoint written before the counter-based draws
    state_file.write_text(json.dumps(state))
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    with pytest.raises(ValueError, match="trained with draws from cpu torch.Generator per sample"):
        train(config.replace(max_steps=3), resume="latest", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before


@pytest.mark.parametrize("n", [1, 3, 4, 13, 300])
@pytest.mark.parametrize("key", [0, 2**64 - 1, 0x299F31D0A4093822])
def test_the_draws_kernel_equals_the_torch_path(key, n):
    """One launch for a micro-batch (d2f.kernels.draws): the uniforms bit for bit, the normals to float32
    rounding of log, cos and sin; positions above 2^32 and a sample count that spans blocks and a tail."""
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled on a GPU, interpreted on the CPU
    where = torch.tensor([0, 1, 7, 2**33 + 5, 123456789012], device=device)
    for stream in (0, 2):
        assert torch.equal(
            uniforms(key, where, stream, n, backend="triton"), uniforms(key, where, stream, n, backend="torch")
        )
        torch.testing.assert_close(
            normals(key, where, stream, n, backend="triton"),
            normals(key, where, stream, n, backend="torch"),
            rtol=1e-5,
            atol=1e-5,
        )


def test_seeds_from_parts_are_distinct_non_negative_int64():
    seeds = [seed_of(run, "epoch", epoch) for run in range(20) for epoch in range(20)]
    assert len(set(seeds)) == len(seeds) and all(0 <= s < 2**63 for s in seeds)


def test_the_data_order_is_a_new_permutation_each_epoch_fixed_by_the_seed():
    """Position p is sample perm_{p // N}[p % N]: each epoch's block is a permutation, epochs differ, and the
    order depends on the seed alone (a fresh Stream, positions asked in any order, gives the same samples)."""
    order = Stream(50, seed=5).indices(torch.arange(150))
    epochs = order.reshape(3, 50)
    assert all(sorted(e.tolist()) == list(range(50)) for e in epochs)
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    backwards = torch.arange(140, 30, -1)
    assert torch.equal(Stream(50, seed=5).indices(backwards), order[backwards])
    assert not torch.equal(Stream(50, seed=6).indices(torch.arange(50)), epochs[0])


def test_positions_tile_the_stream_step_by_step_micro_batch_by_micro_batch_rank_by_rank():
    """Micro-batch m of rank r at step s starts at ((s * grad_accum + m) * world + r) * batch_size:
    ((2 * 2 + 1) * 3 + 1) * 4 = 64 here."""
    config = TrainConfig.teacher_task(batch_size=4, grad_accum=2)
    assert positions(config, 2, 1, 1, 3).tolist() == [64, 65, 66, 67]
    every = [positions(config, s, m, r, 3) for s in range(3) for m in range(2) for r in range(3)]
    assert torch.cat(every).tolist() == list(range(72))
