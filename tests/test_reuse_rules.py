"""When saved artifacts are reused, retrained or refused: the model's weights (not only its name) identify it,
a redraw summarises every saved run and leaves config.json alone, --overwrite_output_dir needs every stage, and
a learner whose pairs changed is retrained when its stage runs."""
import os

import run_clm_igf
from conftest import make_tiny_model, set_flag, tiny_flags
from igf import artifacts


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def last_error(capsys):
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_same_name_other_weights_is_refused(text_files, tmp_path, capsys):
    model = make_tiny_model(tmp_path / "model", seed=0)
    argv = set_flag(tiny_flags(model, text_files, tmp_path / "out"), "--stages", "ig_pairs")
    assert run_clm_igf.main(argv) == 0
    make_tiny_model(tmp_path / "model", seed=1)  # same folder, same config, new weights
    assert run_clm_igf.main(argv) == 2
    err = last_error(capsys)
    assert err.startswith("error:") and "ig_pairs.json" in err and "model.weights" in err


def test_redraw_uses_every_saved_run_and_keeps_config(tiny_model, text_files, tmp_path):
    out = tmp_path / "out"
    argv = tiny_flags(tiny_model, text_files, out)
    assert run_clm_igf.main(argv) == 0
    config = read(out / artifacts.CONFIG)
    assert run_clm_igf.main(set_flag(argv, "--num_runs", "1") + ["--plot_only"]) == 0
    results = artifacts.read_json(out / artifacts.RESULTS)
    assert all(m["runs"] == 2 for m in results["methods"].values())  # both saved runs, not --num_runs 1
    assert read(out / artifacts.CONFIG) == config


def test_overwrite_needs_every_stage(tiny_model, text_files, tmp_path, capsys):
    out = tmp_path / "out"
    argv = tiny_flags(tiny_model, text_files, out)
    assert run_clm_igf.main(argv) == 0
    before = {name: read(out / name) for name in (artifacts.IG_PAIRS, artifacts.LEARNER, artifacts.RESULTS)}
    assert run_clm_igf.main(set_flag(argv, "--stages", "finetune", "plot") + ["--overwrite_output_dir"]) == 2
    assert "--overwrite_output_dir" in last_error(capsys)
    assert {name: read(out / name) for name in before} == before


def test_learner_is_retrained_when_its_pairs_change(tiny_model, text_files, tmp_path):
    out = tmp_path / "out"
    argv = set_flag(tiny_flags(tiny_model, text_files, out), "--stages", "ig_pairs", "learner")
    assert run_clm_igf.main(argv) == 0
    metrics = read(out / artifacts.LEARNER_METRICS)
    assert run_clm_igf.main(set_flag(argv, "--num_ig_pairs", "30")) == 0
    assert read(out / artifacts.LEARNER_METRICS) != metrics
    assert artifacts.read_json(out / artifacts.LEARNER_METRICS)["n_train"] + artifacts.read_json(
        out / artifacts.LEARNER_METRICS)["n_val"] == 30
    assert os.path.exists(out / artifacts.LEARNER)
