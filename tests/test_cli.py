"""The ``d2f`` command's error boundary: every mistake a user can fix ends in one line naming the flag or
file, with exit status 2 and no traceback; nothing is written."""

import pytest

pytest.importorskip("accelerate")
pytest.importorskip("peft")

from d2f.cli import main  # noqa: E402

SAMPLE = ["sample", "--model", "teacher", "--steps", "2", "--num-samples", "4"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([*SAMPLE, "--resolution", "0"], "resolution=0 must be a positive integer"),
        ([*SAMPLE, "--resolution", "-3"], "resolution=-3 must be a positive integer"),
        ([*SAMPLE, "--resolution", "15"], "resolution=15: 15x15 samples do not fit this UNet2DModel"),
        ([*SAMPLE, "--num-samples", "0"], "num_samples=0 must be a positive integer"),
        ([*SAMPLE, "--num-samples", "-5"], "num_samples=-5 must be a positive integer"),
        ([*SAMPLE, "--out", "grid.xyz"], "out='grid.xyz': the suffix names no image format"),
        ([*SAMPLE, "--device", "gpu0"], "device='gpu0' is not a torch device"),
        (["eval", "--out", "{tmp}"], "Is a directory; expected a file name: '{tmp}'"),
        (["eval", "--num-samples", "1"], "num_samples=1 is too few: precision/recall"),
        (["eval", "--num-samples", "3"], "num_samples=3 is too few: precision/recall"),
        (["eval", "--model", "{tmp}"], "no d2f.json there, so it is not a d2f export"),
        (["pairs", "--num-samples", "0", "--out", "{tmp}/p.safetensors"], "num_pairs=0 must be a positive integer"),
        (["train", "--out", "{tmp}/a-file"], "File exists: '{tmp}/a-file'"),
        (["teacher", "--resolution", "24", "--out", "{tmp}/t"], "resolution=24 has no teacher recipe: one of (16,"),
        (
            ["reproduce", "--experiment", "e4", "--resolution", "24", "--out", "{tmp}/r"],
            "resolution=24 is not allowed for E4: one of (16, 32, 64)",
        ),
        (
            ["reproduce", "--experiment", "e1", "--resolution", "64", "--out", "{tmp}/r"],
            "resolution=64 is for experiment 'e4' only, not 'e1'",
        ),
        (
            ["reproduce", "--experiment", "e2", "--budget", "small", "--out", "{tmp}/r"],
            "budget='small' is for experiment 'e4' only, not 'e2'",
        ),
    ],
)
def test_a_user_error_is_one_line_with_status_2(tmp_path, capsys, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main([arg.replace("{tmp}", str(tmp_path)) for arg in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"d2f {argv[0]}: error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_every_flag_has_a_help_line():
    """argparse's ArgumentDefaultsHelpFormatter appends each default; the line itself must be written."""
    import argparse

    from d2f.cli import COMMANDS, build_parser

    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert set(commands) == set(COMMANDS)
    for name, command in commands.items():
        for action in command._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, (name, action.option_strings)


def test_flags_left_unset_give_the_library_defaults(monkeypatch):
    """The defaults the help shows are the ones the library uses: a flag left unset builds the same TrainConfig,
    SamplingSettings and encode() call as the Python API's own defaults."""
    import dataclasses
    import inspect

    from d2f.cli import _sampling_settings, build_parser
    from d2f.data.encode import encode
    from d2f.networks.sampling import SamplingSettings
    from d2f.training import loop
    from d2f.training.config import TrainConfig
    from d2f.training.recipes import train_miniature

    configs = []
    monkeypatch.setattr(loop, "train", lambda config, resume, progress: configs.append(config) or {})
    assert main(["train"]) == 0
    assert configs == [dataclasses.replace(TrainConfig(), out="runs/d2f-captioned-digits")]
    parser = build_parser()
    for command in ("sample", "eval"):
        assert _sampling_settings(parser.parse_args([command])) == SamplingSettings(), command
    args = parser.parse_args(["encode", "--pretrained", "p", "--data", "d", "--resolution", "8", "--out", "o"])
    for name in ("caption_column", "flip", "sample", "seed", "batch_size", "device", "cond_data"):
        assert getattr(args, name) == inspect.signature(encode).parameters[name].default, name
    args = parser.parse_args(["miniature"])
    for name in ("vae_steps", "unet_steps", "seed"):
        assert getattr(args, name) == inspect.signature(train_miniature).parameters[name].default, name
