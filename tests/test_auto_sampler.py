"""solver="auto": the table, how d2f sample / d2f eval resolve it for an export, and the committed E5 evidence
that the table must agree with (D2FScheduler's solver="auto" is tested with the scheduler, test_scheduler)."""

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from d2f.auto_sampler import TABLE, Sampler, auto_sampler  # noqa: E402
from d2f.evaluation.few_step import auto_table  # noqa: E402
from d2f.networks.sampling import SamplingSettings, sample_export  # noqa: E402
from d2f.training.config import TrainConfig  # noqa: E402
from d2f.training.loop import train  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
E5, E5_200 = RESULTS / "few_step.json", RESULTS / "few_step_200_samples.json"


def test_the_table():
    assert auto_sampler(1, False) == auto_sampler(1, True) == Sampler("euler", "uniform", 1)
    assert auto_sampler(2, False) == Sampler("multistep", "uniform", 2)
    assert auto_sampler(2, True) == Sampler("midpoint", "uniform", 1)  # one step, two calls
    assert auto_sampler(4, False) == Sampler("midpoint", "uniform", 2)
    assert auto_sampler(5, False) == Sampler("multistep", "uniform", 5)  # 4's midpoint takes no odd budget
    assert auto_sampler(7, False) == Sampler("multistep", "uniform", 7)
    assert auto_sampler(7, True) == Sampler("multistep", "shift", 7)
    assert auto_sampler(11, False) == Sampler("multistep", "uniform", 11)  # above 10: 10's row


def test_a_budget_the_table_does_not_list_takes_the_row_below_and_two_call_rows_need_an_even_one(monkeypatch):
    monkeypatch.setitem(TABLE, True, {1: ("euler", "uniform"), 4: ("midpoint", "shift")})
    assert auto_sampler(3, True) == Sampler("euler", "uniform", 3)
    assert auto_sampler(6, True) == Sampler("midpoint", "shift", 3)  # three steps, two calls each
    assert auto_sampler(5, True) == Sampler("multistep", "shift", 5)  # no midpoint step costs one call


def test_bad_budgets_are_refused():
    for nfe in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"nfe={nfe!r} must be a positive integer"):
            auto_sampler(nfe, False)


def test_settings_resolve_auto_and_keep_what_the_user_named():
    auto = SamplingSettings(steps=2, seed=4)
    assert auto.solver == auto.grid == "auto"
    assert auto.resolve(False) == SamplingSettings(2, "multistep", "uniform", seed=4)
    assert auto.resolve(True) == SamplingSettings(1, "midpoint", "uniform", seed=4)
    assert SamplingSettings(5, grid="ddim").resolve(True) == SamplingSettings(5, "multistep", "ddim")
    assert SamplingSettings(5, "heun").resolve(True) == SamplingSettings(5, "heun", "uniform")
    with pytest.raises(ValueError, match="resolve\\(\\) the settings for the model first"):
        auto.grid_for(None)
    with pytest.raises(ValueError, match="solver='rk4' is not supported"):
        SamplingSettings(solver="rk4")


def test_exports_sample_with_the_row_of_their_kind(tmp_path):
    """The teacher (a diffusion network) takes the left-hand column; a d2f finetune the right-hand one, and
    its scheduler config says so (a diffusion finetune's does not)."""
    teacher = sample_export("teacher", SamplingSettings(steps=2), num_samples=3)
    here = "cuda" if torch.cuda.is_available() else "cpu"
    assert teacher.settings == SamplingSettings(2, "multistep", "uniform", device=here)
    small = dict(resolution=16, batch_size=4, max_steps=1, num_samples=2, sample_steps=1, checkpoint_every=0)
    for objective, flow in (("d2f", True), ("diffusion", False)):
        out = tmp_path / objective
        train(TrainConfig.teacher_task(out=str(out), objective=objective, warmup_steps=0, **small), progress=False)
        samples = sample_export(str(out / "export"), SamplingSettings(steps=2), num_samples=3)
        assert samples.settings == (
            SamplingSettings(1, "midpoint", "uniform", device=here) if flow else teacher.settings
        )
        assert samples.images.shape == (3, 1, 16, 16) and bool(torch.isfinite(samples.images).all())
        scheduler_config = json.loads((out / "export/scheduler/scheduler_config.json").read_text())
        assert scheduler_config["flow_finetuned"] is flow and scheduler_config["solver"] == "euler"


def test_the_table_is_what_e5s_committed_report_derives_where_it_measured():
    """At every budget the committed E5 report (2000 samples, KID) measured, ``auto_sampler`` takes the row that
    ``auto_table`` derives from it: the simplest row no other d2f row beats beyond the seed spread."""
    derived = auto_table(json.loads(E5.read_text()))
    assert derived["converted"] and derived["flow_finetuned"]
    for kind, flow in (("converted", False), ("flow_finetuned", True)):
        for nfe, row in derived[kind].items():
            solver, grid, _ = auto_sampler(int(nfe), flow)
            assert row == f"d2f:{solver}/{grid}", (kind, nfe)
            assert TABLE[flow][int(nfe)] == (solver, grid)


@pytest.mark.parametrize(
    "model, flow", [("teacher", False), ("teacher_epsilon", False), ("e2_d2f_lora", True), ("e3_reflow", True)]
)
def test_where_only_the_200_sample_run_measured_no_row_beats_the_table_on_every_seed(model, flow):
    """The budgets the 2000-sample report has not measured yet keep the 200-sample run's evidence (FID): there no
    d2f row has a lower FID than the table's sampler on all three seeds (the seeds share their noise, so the
    comparison is paired). At one call Euler and multistep's first step are the same step, formed in another
    order: a difference within float rounding (1e-6 relative) is a tie."""
    measured = auto_table(json.loads(E5.read_text()))["flow_finetuned" if flow else "converted"]
    report = json.loads(E5_200.read_text())["models"][model]
    for nfe in (n for n in report["nfe"] if str(n) not in measured):
        solver, grid, _ = auto_sampler(nfe, flow)
        chosen = report["rows"][f"d2f:{solver}/{grid}"]["cells"][str(nfe)]["fid"]
        assert len(chosen) == 3
        for name, row in report["rows"].items():
            other = row["cells"].get(str(nfe), {}).get("fid")
            if name.startswith("d2f:") and other:
                assert not all(o < c * (1 - 1e-6) for o, c in zip(other, chosen)), (
                    f"{model}, NFE {nfe}: {name} {other} < {chosen}"
                )
