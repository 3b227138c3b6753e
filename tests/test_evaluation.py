"""The evaluation metric: the committed classifier, FID, precision/recall, and d2f eval."""

import json
import math

import numpy as np
import pytest
import torch

pytest.importorskip("mlxtend")
pytest.importorskip("safetensors")

from d2f.cli import main  # noqa: E402
from d2f.evaluation.classifier import load_classifier, split  # noqa: E402
from d2f.evaluation.metrics import class_accuracy, features, fid, precision_recall  # noqa: E402
from d2f.training.data import mnist  # noqa: E402


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


def test_precision_and_recall(classifier):
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
    for key in ("fid", "precision", "recall", "class_accuracy"):
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
    assert report["data"]["wasserstein_to_data"] == 0 and (tmp_path / "e4.png").is_file()


def test_wasserstein_of_shifted_samples_is_the_shift():
    from d2f.evaluation.terminal_snr import wasserstein_1d

    a = np.random.default_rng(0).normal(size=5000)
    assert wasserstein_1d(a, a) == 0
    assert wasserstein_1d(a + 0.3, a) == pytest.approx(0.3, abs=1e-9)


def test_study_design_lr_choice_and_verdicts(monkeypatch, tmp_path):
    """The study's bookkeeping on fake scores: d2f beats diffusion by 10 FID except at 2 steps, where the
    seeds overlap; lr 1e-3 scores best for every objective."""
    from d2f.evaluation import study as study_module

    trained = []

    def fake_run(self, cell, grids=study_module.STUDY_GRIDS, steps=study_module.STUDY_STEPS):
        trained.append(cell)
        base = {"d2f": 10.0, "diffusion": 20.0, "fm": 300.0}[cell.objective] + cell.seed + abs(cell.lr - 1e-3) * 1e3
        scores = {
            f"{g}/{n}": {"fid": base + (12.0 if n == 2 and cell.objective == "d2f" else 0), "class_accuracy": 0.9}
            for g in self._grids(cell, grids)
            for n in steps
        }
        result = {"cell": {}, "seconds_train": 0.0, "scores": scores}
        (self.out / cell.name).mkdir(exist_ok=True)
        (self.out / cell.name / "scores.json").write_text(json.dumps(result))
        (self.out / cell.name / "metrics.json").write_text(json.dumps({"device": "cpu"}))
        self.results[cell.name] = result
        return result

    monkeypatch.setattr(study_module.Study, "run", fake_run)
    monkeypatch.setattr(study_module.Study, "make_zsnr_teacher", lambda self: None)
    report = study_module.study(str(tmp_path), plot_png=tmp_path / "study.png")
    assert report["lr_selection"]["best"] == {"d2f": 1e-3, "diffusion": 1e-3, "fm": 1e-3}
    assert len({c.name for c in trained}) == 3 * 4 + 2 * 11 - 3  # 12 lr cells, 11 groups x 2 seeds, 3 reused
    verdicts = report["verdicts_vs_diffusion"]
    assert set(verdicts) == {
        "lora8 d2f t=uniform", "lora8 d2f t=logit-normal", "lora8 d2f t=diffusion-matched",
        "zsnr lora8 d2f t=uniform", "lora32 d2f t=uniform", "full d2f t=uniform",
    }  # fmt: skip
    for verdict in verdicts.values():
        assert verdict["2"]["verdict"] == "lose" and verdict["4"]["verdict"] == "win"
    assert (tmp_path / "study.png").is_file()
    # Report-only: nothing is trained, and groups with an unfinished run are listed, not scored.
    for folder in tmp_path.glob("teacher-full-*"):
        (folder / "scores.json").unlink()
    monkeypatch.setattr(study_module.Study, "run", None)  # would raise if called
    partial = study_module.study(str(tmp_path), report_only=True)
    assert partial["not_run"] == ["full d2f t=uniform", "full diffusion"]
    assert "full d2f t=uniform" not in partial["verdicts_vs_diffusion"]
    assert partial["groups"]["lora8 diffusion"] == report["groups"]["lora8 diffusion"]
    with pytest.raises(ValueError, match="choose another --runs folder"):
        study_module.Study(str(tmp_path), 401, 300, (0, 1), 500)  # reusing runs of another budget is refused
