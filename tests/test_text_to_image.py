"""E6's driver (``evaluation/text_to_image.py``): one naive-FM cell run for real through the shipped miniature, and
the summary and the pick of the base's best scheduler on scores whose answer is known by hand."""

import json

import pytest

from d2f.evaluation.prompts import evaluation_prompts, sample_prompts
from d2f.evaluation.text_to_image import Cell, best_base, load_shown, run_cell, summarize


@pytest.mark.slow
def test_a_naive_fm_cell_trains_and_scores_through_the_pipelines_encoder_and_vae(tmp_path):
    """Naive FM has no diffusers scheduler: its cell draws with d2f's solvers, the pipeline's text encoder and VAE,
    and the same per-image noise as the pipeline; the cell's result is cached in its run folder."""
    from d2f.data.digit_captions import write_digit_folder
    from d2f.data.encode import encode

    folder = write_digit_folder(tmp_path / "digits", 128, count=32)
    encode("miniature", folder, 128, tmp_path / "latents.safetensors", progress=False, device="cpu")
    cell = Cell("lora", "fm", 0)
    report = run_cell(tmp_path, tmp_path / "latents.safetensors", cell, max_steps=2, calls=(1,))
    assert report["cell"] == "lora-fm-s0" and report["flow_finetuned"]
    for sampler in ("auto", "ddim"):
        scores = report["scores"][sampler]["1"]
        assert scores["n"] == len(evaluation_prompts()) and 0 <= scores["digit_accuracy"] <= 1
        assert scores["fid"] > 0
    shown = load_shown(tmp_path / cell.name)
    assert shown.shape == (len(sample_prompts()), 3, 128, 128) and shown.abs().max() <= 1
    assert json.loads((tmp_path / cell.name / "e6.json").read_text()) == report
    assert run_cell(tmp_path, tmp_path / "missing", cell, max_steps=2, calls=(1,)) == report  # cached, not rerun
    with pytest.raises(ValueError, match="made with settings .*'max_steps': 2.*not .*'max_steps': 3"):
        run_cell(tmp_path, tmp_path / "missing", cell, max_steps=3, calls=(1,))


def _scores(digit, fid):
    return {"digit_accuracy": digit, "thickness_accuracy": 0.5, "slant_accuracy": 0.4, "fid": fid}


def test_the_summary_is_the_mean_and_spread_over_seeds_per_method():
    runs = [
        {"cell": "lora-d2f-s0", "scores": {"auto": {"4": _scores(0.5, 100.0)}}},
        {"cell": "lora-d2f-s1", "scores": {"auto": {"4": _scores(0.7, 300.0)}}},
        {"cell": "full-d2f-s0", "scores": {"auto": {"4": _scores(0.9, 50.0)}}},
    ]
    summary = summarize(runs)
    lora = summary["lora-d2f"]["auto"]["4"]
    assert lora["seeds"] == 2 and lora["digit_accuracy"] == pytest.approx(0.6)
    assert lora["digit_accuracy_std"] == pytest.approx(0.1414213, rel=1e-5) and lora["fid"] == pytest.approx(200)
    assert summary["full-d2f"]["auto"]["4"] == {**summary["full-d2f"]["auto"]["4"], "seeds": 1, "fid_std": 0.0}


def test_the_base_best_is_the_highest_digit_accuracy_then_the_lowest_fid_and_never_d2f():
    rows = {
        "ddim own": {"1": _scores(0.2, 900.0), "2": _scores(0.9, 80.0)},
        "euler trailing": {"1": _scores(0.3, 950.0), "2": _scores(0.9, 60.0)},
        "d2f auto (zero-shot)": {"1": _scores(0.8, 100.0), "2": _scores(1.0, 10.0)},
    }
    best = best_base(rows)
    assert best["1"]["scheduler"] == "euler trailing" and best["2"]["scheduler"] == "euler trailing"
    assert best["2"]["fid"] == 60.0
