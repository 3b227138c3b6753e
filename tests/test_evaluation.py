"""The evaluation metric: the committed classifier, FID, precision/recall, and d2f eval."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("safetensors")

from d2f.cli import main  # noqa: E402
from d2f.data.images import mnist  # noqa: E402
from d2f.evaluation.classifier import load_classifier, split  # noqa: E402
from d2f.evaluation.metrics import class_accuracy, features, fid, precision_recall  # noqa: E402


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


@pytest.mark.parametrize("resolution", [16, 24, 28])
def test_committed_classifier_is_accurate_on_held_out_digits(classifier, resolution):
    data = mnist(28)
    _, held = split(data.images, data.labels)
    accuracy = class_accuracy(classifier, data.images[held], data.labels[held], resolution)
    assert accuracy >= 0.93, accuracy


def test_fid_matches_the_gaussian_closed_form():
    """Diagonal Gaussians: FID = |mu_a - mu_b|^2 + sum (s_a - s_b)^2 for standard deviations s."""
    g = torch.Generator().manual_seed(0)
    d, n = 8, 40000
    s_a, s_b = torch.linspace(0.5, 2.0, d), torch.linspace(1.5, 0.7, d)
    mu_b = torch.full((d,), 0.3)
    a = torch.randn(n, d, generator=g, dtype=torch.float64) * s_a
    b = torch.randn(n, d, generator=g, dtype=torch.float64) * s_b + mu_b
    expected = float((mu_b**2).sum() + ((s_a - s_b) ** 2).sum())
    assert fid(a, b) == pytest.approx(expected, rel=0.05)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(classifier):
    real = mnist(16).images[::5]
    base = features(classifier, real)
    assert abs(fid(base, base)) < 1e-4  # float rounding of traces in the hundreds
    g = torch.Generator().manual_seed(0)
    scores = [
        fid(base, features(classifier, (real + sigma * torch.randn(real.shape, generator=g)).clamp(-1, 1)))
        for sigma in (0.05, 0.2, 0.5, 1.0)
    ]
    assert all(a < b for a, b in zip(scores, scores[1:])), scores


def points(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)[:, None]


def test_precision_and_recall_on_sets_counted_by_hand():
    """Each point's ball reaches its k-th neighbour other than itself.

    Real: two modes {0, 1, 2, 3} and {100, ..., 103}; with k = 3 the real radii are 3, 2, 2, 3 in each mode. Fake:
    {0.5, 1, 1.5, 2.5}, inside the first mode, so precision is 1; its radii are 2, 1.5, 1, 2, which reach the four
    real points of the first mode and none of the second, so recall is 1/2 (the second mode is missing).

    With k = 1: real {0, 1, 10, 11} (radii 1) and fake {0.5, 0.7, 4} (radii 0.2, 0.2, 3.3). Fake 0.5 and 0.7 lie
    within 1 of real 0 or 1, fake 4 does not: precision 2/3. Real 1 lies within 3.3 of fake 4; real 0 is 0.5 from
    fake 0.5 (radius 0.2) and 4 from fake 4; 10 and 11 are far: recall 1/4.
    """
    real = points(0, 1, 2, 3, 100, 101, 102, 103)
    fake = points(0.5, 1, 1.5, 2.5)
    assert precision_recall(real, fake) == (1.0, 0.5)
    assert precision_recall(fake, real) == (0.5, 1.0)
    precision, recall = precision_recall(points(0, 1, 10, 11), points(0.5, 0.7, 4), k=1)
    assert (precision, recall) == (pytest.approx(2 / 3), 0.25)


def test_precision_and_recall_of_real_digits(classifier):
    real = features(classifier, mnist(16).images[::10])
    assert precision_recall(real, real) == (1.0, 1.0)
    far = real + 100.0
    assert precision_recall(real, far) == (0.0, 0.0)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fid(real[:1], real)


def test_eval_command_writes_a_report(tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", "teacher", "--steps", "2", "--num-samples", "20", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["num_samples"] == 20 and report["resolution"] == 16
    assert (report["solver"], report["grid"], report["steps"]) == ("multistep", "uniform", 2)  # auto, resolved
    for key in ("fid", "kid", "kid_std", "precision", "recall", "class_accuracy"):
        assert math.isfinite(report[key]), key
    assert np.isclose(json.loads(capsys.readouterr().out)["fid"], report["fid"])


def test_e1_zero_shot_conversion_equals_ddim():
    """E1 in miniature: the converted teacher on the DDIM grid gives DDIM's images, hence the same FID."""
    from d2f.evaluation.experiments import E1_METHODS, zero_shot

    report = zero_shot(num_samples=20, steps=(3,))
    row = report["steps"]["3"]
    assert set(E1_METHODS) <= set(row)
    assert row["max_abs_diff_d2f_euler_vs_teacher_ddim"] < 1e-4
    assert row["d2f_euler"]["fid"] == pytest.approx(row["teacher_ddim"]["fid"], rel=1e-4)


def test_e2_finetuning_scores_every_checkpoint(tmp_path):
    """E2 in miniature: each objective, LoRA and full, scored at step 0 and at each checkpoint."""
    from d2f.evaluation.experiments import E2_OBJECTIVES, finetune

    report = finetune(
        str(tmp_path), max_steps=2, every=1, lora_seeds=(0,), full_seeds=(0,), num_samples=10, sample_steps=2
    )
    assert report["steps"] == [0, 1, 2]
    for kind in ("lora", "full"):
        for objective in E2_OBJECTIVES:
            entry = report[kind][objective]
            assert len(entry["fid"]) == 1 and len(entry["fid"][0]) == 3
            assert all(math.isfinite(v) for v in entry["fid"][0])
    # At step 0 d2f and diffusion both are the unchanged teacher; d2f on the DDIM grid then *is* DDIM.
    assert report["lora"]["d2f"]["fid_ddim_grid"][0][0] == pytest.approx(
        report["lora"]["diffusion"]["fid"][0][0], rel=1e-4
    )


def test_e3_reflow_and_e4_terminal_snr_in_miniature(tmp_path):
    """E3 and E4 end to end at toy scale: every cell is scored, and the figures are written."""
    from d2f.evaluation.reflow import E3_STEPS, reflow
    from d2f.evaluation.terminal_snr import E4_METHODS, terminal_snr

    report = reflow(str(tmp_path / "e3"), 40, 2, 2, 20, grid_png=tmp_path / "e3.png")
    assert list(report["steps"]) == [str(n) for n in E3_STEPS] and (tmp_path / "e3.png").is_file()
    assert all(math.isfinite(c["fid"]) for row in report["steps"].values() for c in row.values())
    report = terminal_snr(str(tmp_path / "e4"), 2, 20, 2, plot_png=tmp_path / "e4.png")
    assert set(report["methods"]) == set(E4_METHODS) and report["data"]["inverted_share"] == 0.5
    assert all(m["wasserstein_to_data"] > 0 for m in report["methods"].values()) and (tmp_path / "e4.png").is_file()


def test_e4_brightness_metrics_against_closed_forms():
    """W1 between empirical 1-D distributions is the mean gap of their quantile functions: a shift by c costs c,
    and U against U^2 on [0, 1] costs the integral of q - q^2, 1/6. Shares count images by mean brightness."""
    from d2f.evaluation.terminal_snr import brightness_report, wasserstein_1d

    u = (np.arange(100_000) + 0.5) / 100_000
    assert wasserstein_1d(u, u + 0.25) == pytest.approx(0.25)
    assert wasserstein_1d(u**2, u) == pytest.approx(1 / 6, abs=1e-4)
    report = brightness_report(np.array([-0.9, -0.5, -0.1, 0.6]), np.array([-0.9, -0.5, -0.1, 0.6]) - 0.1)
    assert report == pytest.approx(
        {"wasserstein_to_data": 0.1, "inverted_share": 0.25, "grey_share": 0.25, "mean": -0.225}
    )


def test_e4_at_32px_runs_every_arm_on_every_seed_with_its_teacher(tmp_path):
    """E4 at 32 px in miniature, on the committed 32 px teacher: every arm trains at 32 px from it, every
    method is scored on each seed, and the spread is the seeds' range."""
    from d2f.evaluation.terminal_snr import E4_ARMS, E4_METHODS, METRICS, terminal_snr

    report = terminal_snr(
        str(tmp_path / "e4"), 2, 10, 2, seed=5, resolution=32, seeds=2, batch_size=4, plot_png=tmp_path / "e4.png"
    )
    assert report["resolution"] == 32 and report["teacher"] == "teacher32" and report["seeds"] == [5, 6]
    for arm in E4_ARMS:
        config = json.loads((tmp_path / "e4" / "seed6" / arm / "config.json").read_text())
        assert config["resolution"] == 32 and config["pretrained"].endswith("teacher32")
    assert config["zero_terminal_snr"] is True  # the last arm
    assert set(report["methods"]) == set(E4_METHODS)
    for entry in report["methods"].values():
        assert len(entry["per_seed"]) == 2
        for metric in METRICS:
            low, high = entry["spread"][metric]
            assert low == min(r[metric] for r in entry["per_seed"]) and low <= entry[metric] <= high
    assert (tmp_path / "e4.png").is_file()


def test_e4_small_budget_at_16px_runs_the_32px_protocol_into_its_own_files(tmp_path, monkeypatch):
    """``d2f reproduce --experiment e4 --budget small`` at 16 px takes the 32 and 64 px settings (3 seeds,
    batch 32) and writes to its own result file and runs folder, leaving the full protocol's alone."""
    from d2f.evaluation.terminal_snr import E4_SETTINGS, e4_settings

    assert e4_settings(16, "small") == E4_SETTINGS[32] != E4_SETTINGS[16] == e4_settings(16)
    with pytest.raises(ValueError, match=r"budget='tiny' is not allowed for E4: one of \('full', 'small'\)"):
        e4_settings(16, "tiny")
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--experiment", "e4", "--budget", "small", "--scale", "0.01", "--num-samples", "8"]) == 0
    assert sorted(p.name for p in (tmp_path / "results").iterdir()) == [
        "terminal_snr_16_small.json",
        "terminal_snr_16_small.png",
    ]
    report = json.loads((tmp_path / "results" / "terminal_snr_16_small.json").read_text())
    assert (report["budget"], report["resolution"], report["seeds"]) == ("small", 16, [0, 1, 2])
    assert (report["batch_size"], report["max_steps"], report["num_samples"]) == (32, 2, 8)
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["e4-16-small"]
    assert sorted(p.name for p in (tmp_path / "runs" / "e4-16-small").iterdir()) == ["seed0", "seed1", "seed2"]


def test_teacher_architecture_adds_a_level_per_doubling():
    from diffusers import UNet2DModel

    from d2f.networks.teachers import ARCHITECTURE, architecture, from_scratch

    assert architecture(16) == ARCHITECTURE  # the embedded teacher is unchanged
    for resolution, levels in ((32, 3), (64, 4)):
        settings = architecture(resolution)
        assert len(settings["block_out_channels"]) == len(settings["down_block_types"]) == levels
        unet = UNet2DModel(**settings)
        # attention stays at 8x8: the one attention level is the last, after levels - 1 halvings
        assert settings["down_block_types"][-1] == "AttnDownBlock2D" and resolution >> (levels - 1) == 8
        x = torch.randn(2, 1, resolution, resolution)
        assert unet(x, torch.tensor([5, 900]), class_labels=torch.tensor([1, 10])).sample.shape == x.shape
    with pytest.raises(ValueError, match=r"resolution=24 has no teacher architecture: one of \(16, 32, 64\)"):
        from_scratch("v_prediction", 24)


def test_e5_few_step_in_miniature_counts_network_calls_honestly(tmp_path, monkeypatch):
    """E5 end to end at toy scale: every row at each NFE it reaches exactly, one score per seed, a chosen
    setting per diffusers scheduler, and a figure per model. The NFE each cell is filed under is the number of
    times the UNet was really called for it (counted through its forward; one batch per cell here). A rerun
    reads every cell from its file without calling the UNet, and a rerun with other settings is refused."""
    from diffusers import UNet2DModel

    from d2f.evaluation import few_step as e5
    from d2f.evaluation.few_step import CONVERTED, DIFFUSERS, FINETUNED_ROWS, TEACHER_ROWS, few_step

    forward, calls, filed = UNet2DModel.forward, {"now": 0, "all": 0}, []

    def counted_forward(self, *args, **kwargs):
        calls["now"] += 1
        calls["all"] += 1
        return forward(self, *args, **kwargs)

    def counted_get(self, row, sampler, nfe, scorer, draw):
        calls["now"] = 0
        cell = get(self, row, sampler, nfe, scorer, draw)
        filed.append((nfe, calls["now"]))  # a cell read from its file would file 0 calls
        return cell

    get = e5.Cells.get
    monkeypatch.setattr(UNet2DModel, "forward", counted_forward)
    monkeypatch.setattr(e5.Cells, "get", counted_get)
    monkeypatch.setattr(e5, "TIMED_NFE", 2)
    toy = dict(num_samples=20, nfe=(1, 2, 3), seeds=(0, 1), finetune_steps=2, reflow_pairs=40, reflow_pair_steps=2)
    report = few_step(str(tmp_path / "e5"), reflow_steps=2, plot_png=tmp_path / "e5.png", **toy)
    assert len(filed) > 20 and all(nfe == counted_calls for nfe, counted_calls in filed), filed
    teacher = report["models"]["teacher"]["rows"]
    for model in CONVERTED:
        assert set(report["models"][model]["rows"]) == {f"diffusers:{n}" for n in DIFFUSERS} | {
            f"d2f:{s}/{g}" for s, g in TEACHER_ROWS
        }
    for model in (*CONVERTED, "e2_d2f_lora", "e3_reflow"):
        assert (tmp_path / f"e5_{model}.png").is_file()
        rows = report["models"][model]["rows"]
        if model not in CONVERTED:
            assert set(rows) == {f"d2f:{s}/{g}" for s, g in FINETUNED_ROWS}
            assert set(rows["d2f:multistep/shift"]["cells"]) == {"1", "2", "3"}
        for row in rows.values():
            for cell in row["cells"].values():
                assert all(len(cell[key]) == 2 and all(map(math.isfinite, cell[key])) for key in ("fid", "kid"))
            assert ("samples_per_second" in row) == ("2" in row["cells"])
        ranked = report["models"][model]["separations"]["2"]["ranked"]
        assert set(ranked) == {name for name, row in rows.items() if "2" in row["cells"]}
    # d2f's two-stage steps cost 2 calls on the teacher (its velocity is singular nowhere); diffusers' Heun
    # evaluates 2n - 1 times (its last step is Euler).
    assert set(teacher["d2f:heun/uniform"]["cells"]) == set(teacher["d2f:midpoint/uniform"]["cells"]) == {"2"}
    assert set(teacher["diffusers:heun"]["cells"]) == {"1", "3"}
    assert set(teacher["d2f:multistep/uniform"]["cells"]) == set(teacher["d2f:ab3/uniform"]["cells"]) == {"1", "2", "3"}
    # At one call every first-order start is Euler: d2f's multistep and Euler give the same samples; AB3's first
    # two steps are multistep's.
    for calls_made in ("1", "2"):
        multistep, ab3 = (teacher[f"d2f:{s}/uniform"]["cells"][calls_made]["fid"] for s in ("multistep", "ab3"))
        assert multistep == pytest.approx(ab3, rel=1e-5)
    one_call = teacher["d2f:multistep/uniform"]["cells"]["1"], teacher["d2f:euler/uniform"]["cells"]["1"]
    assert one_call[0]["fid"] == pytest.approx(one_call[1]["fid"], rel=1e-6)
    for model in CONVERTED:  # each teacher's own calibration picks its diffusers settings
        candidates = report["calibration"]["candidates"][model]
        for name, row in report["models"][model]["rows"].items():
            if name.startswith("diffusers:"):
                tried = candidates[name.split(":")[1]]
                assert row["settings"] == min(tried, key=lambda c: c["fid"])["settings"]
    assert set(report["seconds_by_part"]) == {"load_and_train", *CONVERTED, "e2_d2f_lora", "e3_reflow"}

    _assert_a_rerun_reads_every_cell_back(tmp_path / "e5", toy, report, calls)


def _assert_a_rerun_reads_every_cell_back(out, toy, report, calls):
    from d2f.evaluation.few_step import few_step, wall_time

    before = calls["all"]
    again = few_step(str(out), reflow_steps=2, **toy)
    assert again["models"] == report["models"] and calls["all"] == before  # every cell read back, none drawn
    listed = few_step(str(out), reflow_steps=2, scored_only=True, **{**toy, "nfe": (1, 2, 3, 4)})
    assert listed["models"] == report["models"] and calls["all"] == before  # NFE 4 was never scored: left out
    # The wall time adds up the two runs that drew (or read) cells; the scored_only report is no run.
    runs = wall_time(str(out))["runs"]
    assert [run["part"] for run in runs] == ["few_step", "few_step"] and runs[0]["nfe"] == [1, 2, 3]
    assert runs[0]["seconds"] >= report["seconds"] - 1 and runs[1]["seconds"] < runs[0]["seconds"]
    assert wall_time(str(out))["seconds"] == pytest.approx(sum(run["seconds"] for run in runs), abs=0.2)
    fresh = out.parent / "fresh"
    assert few_step(str(fresh), scored_only=True, **toy)["models"] == {} and calls["all"] == before
    assert not (fresh / "lora-d2f-seed0").exists()  # nothing scored, nothing trained
    with pytest.raises(ValueError, match="holds a result made with settings .*'num_samples': 20"):
        few_step(str(out), reflow_steps=2, **{**toy, "num_samples": 30})
    with pytest.raises(ValueError, match="models: 'teacher_v' is not allowed"):
        few_step(str(out), models=("teacher_v",))


def test_e5_on_the_miniature_pipeline_files_each_cell_under_the_unet_calls_it_made(tmp_path, monkeypatch):
    """The pipeline comparison at toy scale (4 prompts): every diffusers scheduler at its calibrated spacing and
    every D2FScheduler row, each cell filed under the number of batched UNet calls its images really took (one
    batch of 4 prompts here), one score per seed, KID and prompt following in each."""
    from diffusers import UNet2DConditionModel

    from d2f.evaluation import few_step as e5

    forward, calls, drawn = UNet2DConditionModel.forward, {"now": 0}, []

    def counted_forward(self, *args, **kwargs):
        calls["now"] += 1
        return forward(self, *args, **kwargs)

    def counted_draw(self, pipe, steps):
        calls["now"] = 0
        images = draw(self, pipe, steps)
        scheduler = pipe.scheduler
        drawn.append((len(scheduler.timesteps), calls["now"]))
        return images

    draw = e5.PipelineScorer.draw
    monkeypatch.setattr(UNet2DConditionModel, "forward", counted_forward)
    monkeypatch.setattr(e5.PipelineScorer, "draw", counted_draw)
    report = e5.pipeline_few_step(str(tmp_path), nfe=(2, 3), seeds=(0, 1), num_prompts=4)
    assert drawn and all(listed == made for listed, made in drawn), drawn
    rows = report["rows"]
    assert set(rows) == {f"diffusers:{n}" for n in e5.DIFFUSERS} | {
        f"d2f:{s}/{g}" for s, g in e5.TEACHER_ROWS if s != "ab3"
    }
    assert set(rows["d2f:midpoint/uniform"]["cells"]) == {"2"} and set(rows["diffusers:heun"]["cells"]) == {"3"}
    for row in rows.values():
        for cell in row["cells"].values():
            assert len(cell["kid"]) == len(cell["digit_accuracy"]) == 2 and cell["n"] == [4, 4]
    assert report["separations"]["2"]["ranked"][0] in rows
    before = len(drawn)
    again = e5.pipeline_few_step(str(tmp_path), nfe=(2, 3, 4), seeds=(0, 1), num_prompts=4, scored_only=True)
    assert again["rows"] == rows and len(drawn) == before  # read back; NFE 4 was never scored, so left out
    assert [(run["part"], run["nfe"]) for run in e5.wall_time(str(tmp_path))["runs"]] == [("pipeline", [2, 3])]
    assert e5.pipeline_few_step(str(tmp_path / "fresh"), num_prompts=4, scored_only=True) is None
    # The whole experiment's report of a folder with no cells: nothing scored, no table, no run.
    whole = e5.e5(str(tmp_path / "fresh"), scored_only=True)
    assert (whole["models"], whole["pipeline"], whole["auto_table"]) == ({}, None, {})
    assert whole["wall_time"] == {"runs": [], "seconds": 0}


def test_e5_separations_rank_rows_and_name_only_differences_beyond_the_seed_spread():
    from d2f.evaluation.few_step import separations

    rows = {
        "a": {"cells": {"4": {"kid": [1.0, 2.0, 3.0]}}},
        "b": {"cells": {"4": {"kid": [4.0, 5.0, 6.0]}, "6": {"kid": [1.0, 1.0, 1.0]}}},
        "c": {"cells": {"4": {"kid": [2.5, 3.5, 4.5]}}},  # overlaps both
    }
    result = separations(rows)
    assert result["4"] == {"ranked": ["a", "c", "b"], "beats_beyond_seed_spread": {"a": ["b"], "c": [], "b": []}}
    assert result["6"] == {"ranked": ["b"], "beats_beyond_seed_spread": {"b": []}}


def test_e5_auto_table_keeps_the_simplest_row_no_row_beats_and_weighs_the_pipeline_with_the_teachers():
    from d2f.evaluation.few_step import auto_table

    def model(**rows):
        return {"rows": {f"d2f:{name.replace('_', '/')}": {"cells": cells} for name, cells in rows.items()}}

    teacher = model(
        euler_uniform={"2": {"kid": [10.0, 11.0, 12.0]}, "4": {"kid": [1.0, 2.0, 3.0]}},
        multistep_uniform={"2": {"kid": [1.0, 2.0, 3.0]}, "4": {"kid": [4.0, 5.0, 6.0]}},
        multistep_shift={"2": {"kid": [0.0, 0.5, 1.0]}, "4": {"kid": [0.0, 0.1, 0.2]}},
        ab3_uniform={"2": {"kid": [-9.0, -9.0, -9.0]}},  # a candidate of E5 only: never taken, never a rival
    )
    reflow = model(euler_uniform={"2": {"kid": [3.0, 3.0, 3.0]}}, midpoint_uniform={"2": {"kid": [1.0, 1.0, 1.0]}})
    lora = model(euler_uniform={"2": {"kid": [1.0, 1.0, 1.0]}}, midpoint_uniform={"2": {"kid": [1.0, 1.0, 1.0]}})
    report = {"models": {"teacher": teacher, "e2_d2f_lora": lora, "e3_reflow": reflow}}
    # NFE 2: multistep on either grid is unbeaten (the seeds overlap at 1.0), the uniform grid is simpler; Euler ties
    # midpoint on the finetune but is beaten on the reflow model. NFE 4: Euler is beaten by the shift grid only.
    assert auto_table(report) == {
        "converted": {"2": "d2f:multistep/uniform", "4": "d2f:multistep/shift"},
        "flow_finetuned": {"2": "d2f:midpoint/uniform"},
    }
    # The pipeline reverses NFE 4: now every row is beaten on one model; the lowest summed rank wins (shift: 0 on
    # the teacher + 1 on the pipeline; uniform multistep: 2 + 0; Euler: 1 + 2).
    # An NFE the pipeline alone measured (6) enters no table: there the teachers' budget below it holds.
    report["pipeline"] = model(
        euler_uniform={"4": {"kid": [9.0, 9.0, 9.0]}, "6": {"kid": [0.0, 0.0, 0.0]}},
        multistep_uniform={"4": {"kid": [1.0, 1.0, 1.0]}},
        multistep_shift={"4": {"kid": [5.0, 5.0, 5.0]}},
    )
    assert auto_table(report)["converted"] == {"2": "d2f:multistep/uniform", "4": "d2f:multistep/shift"}


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 0.5), st.floats(1e-3, 0.5), st.floats(1e-3, 0.5), st.floats(0.0, 0.4))
def test_adams_bashforth_weights_match_their_closed_forms(h, h1, h2, t0):
    """docs/conventions.md §5: one node is Euler, two are multistep's ``(1 + k, -k)`` with ``k = h / (2 h_1)``,
    three are AB3's variable-step weights."""
    from d2f.evaluation.few_step import adams_bashforth_weights

    assert adams_bashforth_weights([t0], t0, t0 + h) == pytest.approx([1.0])
    k = h / (2 * h1)
    assert adams_bashforth_weights([t0, t0 - h1], t0, t0 + h) == pytest.approx([1 + k, -k], rel=1e-9, abs=1e-9)
    w0 = (h**2 / 3 + (2 * h1 + h2) * h / 2 + h1 * (h1 + h2)) / (h1 * (h1 + h2))
    w1 = -(h**2 / 3 + (h1 + h2) * h / 2) / (h1 * h2)
    w2 = (h**2 / 3 + h1 * h / 2) / ((h1 + h2) * h2)
    got = adams_bashforth_weights([t0, t0 - h1, t0 - h1 - h2], t0, t0 + h)
    assert got == pytest.approx([w0, w1, w2], rel=1e-7, abs=1e-7) and sum(got) == pytest.approx(1.0)
    assert adams_bashforth_weights([0.5, 0.4, 0.3], 0.5, 0.6) == pytest.approx([23 / 12, -16 / 12, 5 / 12])


def test_depth_experiment_in_miniature(tmp_path):
    """Every arm and the regression reference at every NFE, one score per seed, finite metrics and a figure
    of inputs, ground truth and one row per method."""
    from d2f.evaluation.depth import ARMS, depth

    figure = tmp_path / "d.png"
    report = depth(str(tmp_path / "e"), steps=2, batch_size=4, seeds=(0,), nfe=(1, 2), held_out=10, figure_png=figure)
    assert set(report["arms"]) == {"/".join(arm) for arm in ARMS}
    for cells in report["arms"].values():
        assert set(cells) == {"1", "2"}
        for cell in cells.values():
            assert set(cell) == {"abs_rel", "rmse", "delta1"} and all(len(v) == 1 for v in cell.values())
            assert 0 <= cell["delta1"][0] <= 1 and math.isfinite(cell["abs_rel"][0])
    assert len(report["regression"]["abs_rel"]) == 1 and figure.is_file()
    assert len(report["figure_rows"]) == 2 + len(ARMS) + 1


def test_wasserstein_of_shifted_samples_is_the_shift():
    from d2f.evaluation.terminal_snr import wasserstein_1d

    a = np.random.default_rng(0).normal(size=5000)
    assert wasserstein_1d(a, a) == 0
    assert wasserstein_1d(a + 0.3, a) == pytest.approx(0.3, abs=1e-9)


def test_study_runs_a_real_cell_on_two_seeds_in_worker_processes(tmp_path):
    """The study's real path in miniature: the zero-terminal-SNR teacher trained (1 step), then one d2f cell from
    it on two seeds in two spawned worker processes, each trained (2 steps) and scored on every grid; a second
    run reads the finished cells back instead of training them again."""
    from d2f.evaluation import study as study_module
    from d2f.evaluation.study import STUDY_GRIDS, Cell, Study

    args = (str(tmp_path), 2, 10, (0, 1), 1)
    s = Study(*args)
    s.make_zsnr_teacher()
    zsnr = json.loads((tmp_path / "zsnr-teacher" / "export" / "d2f.json").read_text())
    assert zsnr["train_config"]["zero_terminal_snr"] and zsnr["train_config"]["max_steps"] == 1
    cells = [Cell("d2f", 1e-3, seed, "uniform", 8, "zsnr") for seed in (0, 1)]
    bar = study_module.tqdm(total=2, disable=True)
    study_module._run_cells(s, args, [(c, STUDY_GRIDS, (2, 4)) for c in cells], 2, bar)
    for cell in cells:
        result = s.results[cell.name]
        assert set(result["scores"]) == {f"{g}/{n}" for g in STUDY_GRIDS for n in (2, 4)}
        assert all(math.isfinite(v["fid"]) and 0 <= v["class_accuracy"] <= 1 for v in result["scores"].values())
        trained = json.loads((tmp_path / cell.name / "export" / "d2f.json").read_text())["train_config"]
        assert (trained["objective"], trained["seed"], trained["lr"], trained["max_steps"]) == (
            "d2f",
            cell.seed,
            1e-3,
            2,
        )
        assert trained["pretrained"] == str(tmp_path / "zsnr-teacher" / "export")
    first, second = (s.results[c.name]["scores"]["uniform/4"]["fid"] for c in cells)
    assert first != second  # two seeds, two runs
    again = Study(*args)
    exports = {c.name: (tmp_path / c.name / "export" / "d2f.json").stat().st_mtime_ns for c in cells}
    assert [again.run(c, STUDY_GRIDS, (2, 4)) for c in cells] == [s.results[c.name] for c in cells]
    assert exports == {c.name: (tmp_path / c.name / "export" / "d2f.json").stat().st_mtime_ns for c in cells}


def _fake_study_runs(monkeypatch, study_module, fid_of) -> list:
    """Replace training and scoring by ``fid_of(cell)`` (None: the run diverges); returns the cells trained."""
    trained = []

    def fake_train_and_score(self, cell, grids, steps):
        trained.append(cell)
        fid = fid_of(cell)
        if fid is None:
            raise FloatingPointError(f"{cell.name}: the loss is nan at step 3\nmore")
        (self.out / cell.name).mkdir(exist_ok=True)
        scores = {
            f"{g}/{n}": {"fid": fid + (12.0 if n == 2 and cell.objective == "d2f" else 0), "class_accuracy": 0.9}
            for g in self._grids(cell, grids)
            for n in steps
        }
        return {"cell": {}, "seconds_train": 0.0, "device": "cpu", "scores": scores}

    monkeypatch.setattr(study_module.Study, "_train_and_score", fake_train_and_score)
    monkeypatch.setattr(study_module.Study, "make_zsnr_teacher", lambda self: None)
    return trained


def test_study_design_lr_choice_and_verdicts(monkeypatch, tmp_path):
    """The study's bookkeeping on fake scores: d2f beats diffusion by 10 FID except at 2 steps, where the
    seeds overlap; lr 1e-3 scores best for every objective and capacity, so no lr search grows."""
    from d2f.evaluation import study as study_module

    base = {"d2f": 10.0, "diffusion": 20.0, "fm": 300.0}
    trained = _fake_study_runs(
        monkeypatch, study_module, lambda c: base[c.objective] + c.seed + abs(c.lr - 1e-3) * 1e3 + c.lora_rank / 1e3
    )
    report = study_module.study(str(tmp_path), seeds=(0, 1), plot_png=tmp_path / "study.png")
    assert report["lr_selection"]["best"] == {
        "lora8": {"d2f": 1e-3, "diffusion": 1e-3, "fm": 1e-3},
        "lora32": {"d2f": 1e-3, "diffusion": 1e-3},
        "full": {"d2f": 1e-3, "diffusion": 1e-3},
    }
    assert report["lr_selection"]["best_at_ladder_end"] == []
    # 28 lr cells (4 lrs x 7 searches) and 13 groups x 2 seeds, 7 of them lr cells (LoRA 8 d2f uniform,
    # diffusion and fm; rank 32 and full d2f uniform and diffusion, seed 0).
    assert len({c.name for c in trained}) == 4 * 7 + 2 * 13 - 7
    assert report["groups"]["full diffusion"]["uniform/10"]["fid"] == [20.0, 21.0]
    verdicts = report["verdicts_vs_diffusion"]
    assert set(verdicts) == {
        "lora8 d2f t=uniform", "lora8 d2f t=logit-normal", "lora8 d2f t=diffusion-matched",
        "zsnr lora8 d2f t=uniform", "lora32 d2f t=uniform", "lora32 d2f t=logit-normal", "full d2f t=uniform",
        "full d2f t=logit-normal",
    }  # fmt: skip
    for verdict in verdicts.values():
        assert verdict["2"]["verdict"] == "lose" and verdict["4"]["verdict"] == "win"
    assert (tmp_path / "study.png").is_file()
    from d2f.evaluation.study_tables import markdown

    tables = markdown(report)
    assert "| lora8 fm | 301 | **300** | 302 | 309 |" in tables  # 300 + |lr - 1e-3| * 1e3, seed 0
    assert "| full diffusion, its own DDIM | 20 / 21 (d) | 20 / 21 (d) | 20 / 21 (d) | 20 / 21 (d) |" in tables
    assert "| full d2f t=uniform | lose | win | win | win |" in tables
    # Report-only: nothing is trained, and groups with an unfinished run are listed, not scored; an lr run
    # scored only at 10 steps does not count as finished for its group.
    for folder in tmp_path.glob("teacher-full-*-seed1"):
        (folder / "scores.json").unlink()
    scores = tmp_path / "teacher-r32-diffusion-lr0.001-seed0" / "scores.json"
    lr_only = json.loads(scores.read_text())
    lr_only["scores"] = {"ddim/10": lr_only["scores"]["ddim/10"]}
    scores.write_text(json.dumps(lr_only))
    monkeypatch.setattr(study_module.Study, "_train_and_score", None)  # would raise if called
    partial = study_module.study(str(tmp_path), seeds=(0, 1), report_only=True)
    assert partial["not_run"] == ["lora32 diffusion", "full d2f t=uniform", "full d2f t=logit-normal", "full diffusion"]
    assert "full d2f t=uniform" not in partial["verdicts_vs_diffusion"]
    assert partial["groups"]["lora8 diffusion"] == report["groups"]["lora8 diffusion"]
    with pytest.raises(ValueError, match="choose another --runs folder"):
        study_module.Study(str(tmp_path), 401, 300, (0, 1), 500)  # reusing runs of another budget is refused


def test_study_lr_search_walks_off_edges_and_records_divergence(monkeypatch, tmp_path):
    """d2f is best at 3e-2 (off the starting grid's top), diffusion at ever lower lr (down to the ladder's end),
    naive fm diverges from 3e-2 up; full-finetuning diffusion diverges at seed 1 of its best lr."""
    from d2f.evaluation import study as study_module

    def fid_of(cell):
        if cell.objective == "fm" and cell.lr >= 3e-2:
            return None
        if cell.objective == "diffusion" and cell.lora_rank == 0 and cell.seed == 1:
            return None
        if cell.objective == "d2f":
            return 10.0 + abs(math.log10(cell.lr / 3e-2)) + cell.seed
        return {"diffusion": 20.0 + cell.lr * 1e3, "fm": 300.0 - cell.lr * 1e3}[cell.objective] + cell.seed

    trained = _fake_study_runs(monkeypatch, study_module, fid_of)
    report = study_module.study(str(tmp_path))
    lr = report["lr_selection"]
    assert lr["best"]["lora8"] == {"d2f": 3e-2, "diffusion": 3e-5, "fm": 1e-2}
    assert lr["best"]["full"] == {"d2f": 3e-2, "diffusion": 3e-5}
    assert list(lr["fid_at_10_steps_natural_grid"]["lora8"]["d2f"]) == [
        "0.0003",
        "0.001",
        "0.003",
        "0.01",
        "0.03",
        "0.1",
    ]
    assert list(lr["fid_at_10_steps_natural_grid"]["lora32"]["diffusion"])[:2] == ["3e-05", "0.0001"]
    assert lr["fid_at_10_steps_natural_grid"]["lora8"]["fm"]["0.03"] == "diverged"
    assert lr["best_at_ladder_end"] == ["full diffusion", "lora32 diffusion", "lora8 diffusion"]
    assert report["diverged"] == {"full diffusion": ["teacher-full-diffusion-lr3e-05-seed1"]}
    assert "full d2f t=uniform" not in report["verdicts_vs_diffusion"]
    assert report["verdicts_vs_diffusion"]["lora32 d2f t=uniform"]["10"]["verdict"] == "win"
    diverged = json.loads((tmp_path / "teacher-r8-fm-uniform-lr0.03-seed0" / "scores.json").read_text())
    assert diverged["diverged"] == "teacher-r8-fm-uniform-lr0.03-seed0: the loss is nan at step 3"
    # A diverged run is a result: the study run again trains nothing.
    count = len(trained)
    again = study_module.study(str(tmp_path))
    assert len(trained) == count
    assert {**again, "seconds": 0} == {**report, "seconds": 0}


def test_defaults_follow_the_committed_study():
    """d2f train's defaults are what results/study.json supports: the lr per capacity is the picked one or
    within 5 % of its FID, the default t sampler's mean FID at 10 and 25 steps is within 5 % of the best
    sampler's, and the uniform grid is d2f's best for Euler at 2 to 10 steps (the grid a named solver gets
    by default; --solver auto follows E5 instead, test_auto_sampler)."""
    from pathlib import Path
    from statistics import fmean

    from d2f.training.config import DEFAULT_LR_FULL, DEFAULT_LR_LORA, DEFAULT_T_SAMPLER

    report = json.loads((Path(__file__).resolve().parents[1] / "results" / "study.json").read_text())
    assert report["not_run"] == [] and report["diverged"] == {}
    lr = report["lr_selection"]
    for capacity, default in (("lora8", DEFAULT_LR_LORA), ("lora32", DEFAULT_LR_LORA), ("full", DEFAULT_LR_FULL)):
        fids = lr["fid_at_10_steps_natural_grid"][capacity]["d2f"]
        assert fids[f"{default:g}"] <= 1.05 * fids[f"{lr['best'][capacity]['d2f']:g}"], capacity
    groups = report["groups"]
    for n in (10, 25):
        by_sampler = {
            label.split("t=")[1]: min(fmean(groups[label][f"{g}/{n}"]["fid"]) for g in ("uniform", "ddim", "shift"))
            for label in groups
            if label.startswith("lora8 d2f t=")
        }
        assert by_sampler[DEFAULT_T_SAMPLER] <= 1.05 * min(by_sampler.values()), (n, by_sampler)
    for n in (2, 4, 10):
        group = groups[f"lora8 d2f t={DEFAULT_T_SAMPLER}"]
        assert min(("uniform", "ddim", "shift"), key=lambda g: fmean(group[f"{g}/{n}"]["fid"])) == "uniform", n
