"""--num_pipelines: independent replicates of objective set, IG labels and learner. Pipeline 0 is the
single-pipeline run, byte for byte; pipeline p >= 1 has its own seeds and folder; standard runs once per run
index; statistics come within and across pipelines; a finished one-pipeline folder grows a second pipeline
without redoing the first."""
import json
import os

import pytest

import run_clm_igf
from conftest import tiny_flags
from igf import artifacts

METHODS = ["standard", "igf_constant", "random"]


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def one_and_two(tiny_model, text_files, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    one, two = root / "one", root / "two"
    assert run_clm_igf.main(tiny_flags(tiny_model, text_files, one) + ["--methods", *METHODS]) == 0
    assert run_clm_igf.main(tiny_flags(tiny_model, text_files, two) + ["--methods", *METHODS,
                                                                       "--num_pipelines", "2"]) == 0
    return one, two


def test_pipeline_zero_is_the_single_pipeline_run(one_and_two):
    one, two = one_and_two
    for name in (artifacts.IG_PAIRS, artifacts.LEARNER, artifacts.LEARNER_METRICS):
        assert read(one / name) == read(two / name), name
    for name in sorted(os.listdir(one / artifacts.RUNS)):
        assert read(one / artifacts.RUNS / name) == read(two / artifacts.RUNS / name), name


def test_a_second_pipeline_has_its_own_objective_set_labels_and_learner(one_and_two):
    _, two = one_and_two
    p1 = two / artifacts.PIPELINES / "1"
    assert sorted(os.listdir(p1 / artifacts.RUNS)) == ["igf_constant_run000.json", "igf_constant_run001.json",
                                                       "random_run000.json", "random_run001.json"]
    assert sorted(os.listdir(two / artifacts.RUNS))[-2:] == ["standard_run000.json", "standard_run001.json"]
    zero, first = (json.load(open(folder / artifacts.IG_PAIRS)) for folder in (two, p1))
    assert zero["fingerprint"]["objective"] != first["fingerprint"]["objective"]
    assert [p["context_index"] for p in zero["pairs"]] != [p["context_index"] for p in first["pairs"]]
    assert read(two / artifacts.LEARNER) != read(p1 / artifacts.LEARNER)
    run0, run1 = (json.load(open(folder / artifacts.RUNS / "igf_constant_run000.json")) for folder in (two, p1))
    assert run0["seed"] == run1["seed"] and run1["pipeline"] == 1  # the same candidate stream
    assert run0["fingerprint"]["selection"]["learner"] != run1["fingerprint"]["selection"]["learner"]
    contexts = json.load(open(two / artifacts.CONTEXTS))
    assert len(contexts["objective"]) == 2


def test_statistics_within_and_across_pipelines(one_and_two):
    _, two = one_and_two
    results = json.load(open(two / artifacts.RESULTS))
    assert results["num_pipelines"] == 2 and len(results["pipelines"]) == 2
    across = results["across_pipelines"]["igf_constant_vs_standard"]["final"]
    within = [p["tests"]["igf_constant_vs_standard"]["final"]["paired_mean_difference"]["mean"]
              for p in results["pipelines"]]
    assert across["per_pipeline"] == within and "igf_constant_vs_random" in results["across_pipelines"]
    assert results["methods"]["igf_constant"]["runs"] == 4 and results["methods"]["standard"]["runs"] == 2
    assert len(results["learner_spread"]["per_pipeline"]) == 2
    table = open(two / artifacts.RESULTS_TABLE).read()
    assert table.startswith("## Across pipelines") and "## Pipeline 1" in table
    selection = json.load(open(two / artifacts.SELECTION))
    assert selection["methods"]["igf_constant"]["candidates"]["n"] == 4


def test_a_finished_folder_grows_a_pipeline_without_redoing_the_first(one_and_two, tiny_model, text_files, tmp_path):
    one, two = one_and_two
    grown = tmp_path / "grown"
    os.system(f"cp -r {one} {grown}")
    before = {name: read(grown / name) for name in (artifacts.IG_PAIRS, artifacts.LEARNER)}
    runs = {name: os.stat(grown / artifacts.RUNS / name).st_mtime_ns for name in os.listdir(grown / artifacts.RUNS)}
    assert run_clm_igf.main(tiny_flags(tiny_model, text_files, grown) + ["--methods", *METHODS,
                                                                         "--num_pipelines", "2"]) == 0
    assert before == {name: read(grown / name) for name in before}  # reused: the same pairs and learner
    assert runs == {name: os.stat(grown / artifacts.RUNS / name).st_mtime_ns for name in runs}  # not run again
    p1 = artifacts.PIPELINES + "/1"
    for name in (artifacts.IG_PAIRS, artifacts.LEARNER, "runs/igf_constant_run001.json"):
        assert read(grown / p1 / name) == read(two / p1 / name), name
