"""`nnunet-heart pipeline`'s options are stated once, in `option_table.OPTIONS`: the parser,
--help and the command line each Slurm job is given (`command_line`) are made from that table."""
import dataclasses
import subprocess
import sys

import pytest

from nnunet_heart_ext.pipeline import option_table, options
from nnunet_heart_ext.pipeline.option_table import OPTIONS, USAGE
from nnunet_heart_ext.pipeline.options import Options, command_line, parse


@pytest.fixture
def clean_env(monkeypatch):
    for opt in OPTIONS:
        if opt.env:
            monkeypatch.delenv(opt.env, raising=False)
    return monkeypatch


def test_help_lists_every_option_of_the_table_and_the_parser_knows_exactly_those(capsys):
    assert parse(["--help"]) is None
    shown = capsys.readouterr().out
    assert shown == USAGE
    for opt in OPTIONS:
        assert opt.flag in shown, opt.flag
        if opt.env:
            assert f"[{opt.env}" in shown or opt.env in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"), opt.env
        if opt.rows:
            assert opt.help_text() in shown
        assert opt.name in {f.name for f in dataclasses.fields(Options)} or opt.name == "help", opt.name
    flags = set(options._build_parser()._option_string_actions)
    assert flags == {f for opt in OPTIONS for f in (opt.flag,) + opt.aliases}
    cli = subprocess.run([sys.executable, "-m", "nnunet_heart_ext.cli", "pipeline", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert cli.returncode == 0 and cli.stdout == USAGE


def test_help_text_of_an_option_is_its_table_row():
    opt = option_table.Opt("--x-y", option_table.OPTIONS_SECTION,
                           (("--x-y N", "first (default: {default}) {env}\nsecond"),), env="HEART_X", default="7")
    assert opt.help_text() == "  --x-y N            first (default: 7) [HEART_X]\n" + " " * 21 + "second"
    assert opt.dest == opt.name == "x_y"
    assert opt.argv(None) == opt.argv(False) == opt.argv([]) == [] and opt.argv(True) == ["--x-y"]
    assert opt.argv([0, 2]) == ["--x-y", "0,2"] and opt.argv(3) == ["--x-y", "3"]


ARGVS = [
    ["--src", "s", "--work", "w"],
    ["--demo"],
    ["--demo", "--seed", "3", "--folds", "0,2", "--force", "predict", "--force", "train", "--work", "/tmp/demo w"],
    ["--src", "s", "--test-dir", "t", "--configs", "2d,3d_fullres", "--trainer", "T", "--planner", "P", "--plans",
     "Q", "--device", "cpu", "--parallel", "3", "--checkpoint", "c.pth", "--skip-disk-check", "--no-tta", "--out",
     "z.zip", "--raw", "r", "--preprocessed", "p", "--results", "res", "--launcher", "slurm",
     "--slurm-args=--time=1 --partition=gpu", "--wait", "--gpus", "1,2"],
]
NOT_PASSED_ON = {"gpus", "slurm_args", "wait", "dry_run", "status", "json"}  # what a Slurm job does not need


@pytest.mark.parametrize("argv", ARGVS)
def test_command_line_round_trips(argv, tmp_path, clean_env):
    """A job's command line gives the job the submitter's Options: parse(command_line(parse(argv)))
    in another folder and without the environment equals parse(argv), for every option passed on."""
    o = parse(argv, cwd=tmp_path)
    only = o.steps()
    job = command_line(o, only)
    assert job[:4] == [sys.executable, "-m", "nnunet_heart_ext.cli", "pipeline"]
    again = parse(job[4:], cwd=tmp_path / "elsewhere")
    for f in dataclasses.fields(Options):
        if f.name == "only":
            assert again.only == only
        elif f.name == "launcher":
            assert again.launcher == "local"
        elif f.name not in NOT_PASSED_ON:
            assert getattr(again, f.name) == getattr(o, f.name), f.name
    passed = {opt.name for opt in OPTIONS if opt.passed_on}
    assert passed == {f.name for f in dataclasses.fields(Options)} - NOT_PASSED_ON - {"phantom"}


def test_environment_defaults_are_spelled_out_for_the_job(tmp_path, clean_env):
    clean_env.setenv("HEART_TRAINER", "EnvTrainer")
    clean_env.setenv("HEART_FOLDS", "1,3")
    clean_env.setenv("HEART_NO_TTA", "1")
    o = parse(["--src", "s"], cwd=tmp_path)
    assert o.trainer == "EnvTrainer" and o.folds == [1, 3] and o.no_tta
    job = command_line(o, ["train"], folds=[3])
    for opt in OPTIONS:
        if opt.env:
            clean_env.delenv(opt.env, raising=False)
    again = parse(job[4:], cwd=tmp_path / "elsewhere")
    assert again.trainer == "EnvTrainer" and again.folds == [3] and again.no_tta and again.only == ["train"]
    assert again.force_from is None
    o.force_from = "validate"
    assert parse(command_line(o, ["train", "validate"])[4:]).force_from == "validate"
