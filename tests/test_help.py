"""Every command a user runs answers --help with exit 0 and a usage text, and does no work: the driver (with each
preset's defaults), the asset builder, the filter and the benchmarks, run as a user types them (subprocesses).
Every flag's help string is formatted on its own too, so a stray '%' anywhere fails here, not on a user's screen."""
import argparse
import dataclasses
import os
import subprocess
import sys

import pytest

from conftest import ROOT
from igf.config import PRESETS, SECTIONS, build_parser

COMMANDS = {  # what a user types -> what the usage line names
    "driver": [sys.executable, "run_clm_igf.py"],
    "assets": [sys.executable, "-m", "igf.assets"],
    "filter": [sys.executable, "-m", "igf.filter"],
    "distil": [sys.executable, "-m", "igf.distil"],
    "ig_speed": [sys.executable, "benchmarks/ig_speed.py"],
    "ig_signal": [sys.executable, "benchmarks/ig_signal.py"],
    "filter_speed": [sys.executable, "benchmarks/filter_speed.py"],
    "learner_ladder": [sys.executable, "benchmarks/learner_ladder.py"],
    "ig_drift": [sys.executable, "benchmarks/ig_drift.py"],
    "color_conditional": [sys.executable, "benchmarks/color_conditional.py"],
    "refresh_every": [sys.executable, "benchmarks/refresh_every.py"],
}


def run(argv, env=None, cwd=ROOT):
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120, env=env)
    return proc.returncode, proc.stdout, proc.stderr


def fields():
    return [f for cls in SECTIONS.values() for f in dataclasses.fields(cls)]


@pytest.mark.parametrize("preset,flag", [(None, "--help"), (None, "-h"), ("default", "--help"), ("study", "--help"),
                                         ("paper", "-h"), ("rho", "--help")])
def test_driver_help_lists_every_flag_with_its_default(preset, flag):
    argv = COMMANDS["driver"] + ([] if preset is None else ["--preset", preset]) + [flag]
    code, out, err = run(argv)
    assert code == 0 and "Traceback" not in err, err
    assert out.startswith("usage: run_clm_igf.py")
    text = " ".join(out.split())  # argparse wraps lines
    for f in fields():
        assert f"--{f.name}" in out, f.name
    defaults = {**{f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                   for f in fields()}, **PRESETS.get(preset or "default", {})}
    for name in ("num_runs", "max_steps", "eval_every", "num_pipelines"):  # the preset's value, not the class's
        assert f"--{name} {name.upper()}" in text
        entry = text.rsplit(f"--{name} {name.upper()}", 1)[1].split(" --")[0]  # its line, not the usage line
        assert f"(default: {defaults[name]})" in entry, name


def test_every_help_string_formats():
    """argparse %-formats each help string when it renders --help: every one must survive that on its own."""
    parser = build_parser()
    formatter = argparse.ArgumentDefaultsHelpFormatter("run_clm_igf.py")
    for action in parser._actions:
        if action.help is not None:
            formatter._expand_help(action)  # raises ValueError / TypeError on a stray '%'
    for f in fields():  # and the text that reaches the user is the field's own, percent signs included
        assert f.metadata["help"].replace("%", "%%") in [a.help for a in parser._actions], f.name


@pytest.mark.parametrize("name", ["assets", "filter", "distil", "ig_speed", "ig_signal", "filter_speed",
                                  "refresh_every"])
def test_every_entry_point_answers_help_without_working(name, tmp_path):
    env = {**os.environ, "IGF_CACHE_DIR": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    code, out, err = run(COMMANDS[name] + ["--help"], env=env)
    assert code == 0 and "Traceback" not in err, err
    assert out.startswith("usage:") and "--help" in out
    assert not os.path.exists(tmp_path / "cache") and not os.path.exists(os.path.join(ROOT, "--help"))  # no work


def test_assets_refuses_an_unknown_option_in_one_line(tmp_path):
    env = {**os.environ, "IGF_CACHE_DIR": str(tmp_path / "cache")}
    folder = str(tmp_path / "x")
    code, out, err = run(COMMANDS["assets"] + ["--cache", folder], env=env)
    assert code == 2 and "Traceback" not in err
    assert [line for line in err.splitlines() if "error:" in line] == [
        "python -m igf.assets: error: unrecognized arguments: --cache"]
    assert os.listdir(tmp_path) == [] and not os.path.exists(os.path.join(ROOT, "--cache"))  # built nothing
