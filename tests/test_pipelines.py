"""--num_pipelines: independent replicates of objective set, IG labels and learner. Pipeline 0 is the
single-pipeline run, byte for byte; pipeline p >= 1 has its own seeds and folder, its own candidate streams and
standard runs (--pipeline_streams own), or shares run r's stream and standard run with pipeline 0 (shared);
statistics come within and across pipelines; a finished one-pipeline folder grows a second pipeline without
redoing the first."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
from scipy import integrate, stats

import run_clm_igf
from conftest import tiny_flags
from igf import artifacts

METHODS = ["standard", "igf_constant", "random"]


def read(path):
    with open(path, "rb") as fh:
        return fh.read()


def paired_runs(folder, a, b, pipeline, runs=2):
    """[(run r of method a in ``pipeline``, the run of method b that drew the same candidate stream)]: b's partner
    found by its seed among every run file of b in the folder, whichever pipeline folder holds it (one, or the
    pairing is ambiguous)."""
    every = [json.load(open(path)) for path in glob.glob(os.path.join(folder, "**", artifacts.RUNS, f"{b}_run*.json"),
                                                        recursive=True)]
    out = []
    for r in range(runs):
        ra = json.load(open(artifacts.run_path(folder, a, pipeline, r)))
        partners = [rb for rb in every if rb["seed"] == ra["seed"]]
        assert len(partners) == 1, (a, b, pipeline, r, len(partners))
        assert partners[0]["run"] == r
        out.append((ra, partners[0]))
    return out


def area_under_curve(record):
    """Mean test perplexity over the run: the trapezoid rule over the evaluated steps, divided by their span."""
    steps = record["steps"]
    return integrate.trapezoid(record["test_ppl"], steps) / (steps[-1] - steps[0])


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
    assert sorted(os.listdir(p1 / artifacts.RUNS)) == sorted(os.listdir(two / artifacts.RUNS)) == [
        f"{m}_run00{r}.json" for m in sorted(METHODS) for r in (0, 1)]  # its own standard runs
    zero, first = (json.load(open(folder / artifacts.IG_PAIRS)) for folder in (two, p1))
    assert zero["fingerprint"]["objective"] != first["fingerprint"]["objective"]
    assert [p["context_index"] for p in zero["pairs"]] != [p["context_index"] for p in first["pairs"]]
    assert read(two / artifacts.LEARNER) != read(p1 / artifacts.LEARNER)
    run0, run1 = (json.load(open(folder / artifacts.RUNS / "igf_constant_run000.json")) for folder in (two, p1))
    assert run0["seed"] != run1["seed"] and run1["pipeline"] == 1  # its own candidate stream
    standard0, standard1 = (json.load(open(folder / artifacts.RUNS / "standard_run000.json")) for folder in (two, p1))
    assert standard1["seed"] == run1["seed"] and standard0["test_ppl"] != standard1["test_ppl"]
    assert run0["fingerprint"]["selection"]["learner"] != run1["fingerprint"]["selection"]["learner"]
    contexts = json.load(open(two / artifacts.CONTEXTS))
    assert len(contexts["objective"]) == 2


def test_statistics_within_and_across_pipelines(one_and_two):
    _, two = one_and_two
    results = json.load(open(two / artifacts.RESULTS))
    assert results["num_pipelines"] == 2 and len(results["pipelines"]) == 2
    # every contrast recomputed from the run files: each pipeline's mean paired difference, then scipy's t-test
    for a, b in (("igf_constant", "standard"), ("igf_constant", "random")):
        for part, value in (("final", lambda rec: rec["test_ppl"][-1]), ("auc", area_under_curve)):
            diffs = [np.mean([value(ra) - value(rb) for ra, rb in paired_runs(two, a, b, p)]) for p in range(2)]
            across = results["across_pipelines"][f"{a}_vs_{b}"][part]
            assert across["per_pipeline"] == pytest.approx(diffs, rel=1e-12)
            assert across["mean"] == pytest.approx(np.mean(diffs), rel=1e-12)
            assert across["se"] == pytest.approx(np.std(diffs, ddof=1) / np.sqrt(2), rel=1e-9)
            t_test = stats.ttest_1samp(diffs, 0.0)
            assert across["t_test"] == pytest.approx({"t": t_test.statistic, "p": t_test.pvalue}, rel=1e-9)
            assert across["lower_in_pipelines"] == sum(d < 0 for d in diffs)
            within = [res["tests"][f"{a}_vs_{b}"][part]["paired_mean_difference"]["mean"]
                      for res in results["pipelines"]]
            assert within == pytest.approx(diffs, rel=1e-12)
    assert results["methods"]["igf_constant"]["runs"] == 4 and results["methods"]["standard"]["runs"] == 4
    assert len(results["learner_spread"]["per_pipeline"]) == 2
    table = open(two / artifacts.RESULTS_TABLE).read()
    assert table.startswith("## Across pipelines") and "## Pipeline 1" in table
    # the selection report takes the pipeline as the replicate: mean +- SE of the two pipelines' means over their
    # runs (candidates per kept context, recomputed from the run files)
    selection = json.load(open(two / artifacts.SELECTION))
    per_pipeline = [np.mean([sum(r["candidates_drawn"]) / (r["batch_size"] * len(r["candidates_drawn"]))
                             for r, _ in paired_runs(two, "igf_constant", "standard", p)]) for p in range(2)]
    candidates = selection["methods"]["igf_constant"]["candidates"]
    assert selection["methods"]["igf_constant"]["replicate"] == "pipelines" and candidates["n"] == 2
    assert candidates["mean"] == pytest.approx(np.mean(per_pipeline), rel=1e-12)
    assert candidates["se"] == pytest.approx(stats.sem(per_pipeline), rel=1e-9)


def test_shared_streams_pair_every_pipeline_with_one_standard_run(one_and_two, tiny_model, text_files, tmp_path):
    _, two = one_and_two
    shared = tmp_path / "shared"
    assert run_clm_igf.main(tiny_flags(tiny_model, text_files, shared) + [
        "--methods", *METHODS, "--num_pipelines", "2", "--pipeline_streams", "shared"]) == 0
    p1 = shared / artifacts.PIPELINES / "1"
    assert sorted(os.listdir(p1 / artifacts.RUNS)) == ["igf_constant_run000.json", "igf_constant_run001.json",
                                                       "random_run000.json", "random_run001.json"]
    run0, run1 = (json.load(open(folder / artifacts.RUNS / "igf_constant_run000.json")) for folder in (shared, p1))
    assert run0["seed"] == run1["seed"]  # the same candidate stream
    for name in os.listdir(shared / artifacts.RUNS):  # pipeline 0 is the same either way
        a, b = (json.load(open(folder / artifacts.RUNS / name)) for folder in (shared, two))
        if name.startswith("standard"):  # shared by every pipeline, so it belongs to none
            assert (a.pop("pipeline"), b.pop("pipeline")) == (None, 0)
        assert a == b, name
    results = json.load(open(shared / artifacts.RESULTS))
    assert results["methods"]["standard"]["runs"] == 2
    for p in range(2):  # each pipeline's runs pair with the one standard run of their stream (pipeline: none)
        pairs = paired_runs(shared, "igf_constant", "standard", p)
        assert all(rb["pipeline"] is None for _, rb in pairs)
        diffs = [ra["test_ppl"][-1] - rb["test_ppl"][-1] for ra, rb in pairs]
        within = results["pipelines"][p]["tests"]["igf_constant_vs_standard"]["final"]["paired_mean_difference"]
        assert within["mean"] == pytest.approx(np.mean(diffs), rel=1e-12)


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


def test_plot_only_reads_the_design_from_the_saved_config(one_and_two, tiny_model, text_files, tmp_path, capsys):
    """Redrawing an own-streams study with the command line's defaults (one pipeline, shared streams) gives the same
    statistics: the design comes from config.json. Without it, the mismatch is refused in one line, as the
    runs cannot pair with the baseline the command line names."""
    from test_bad_input import check_error

    _, two = one_and_two
    copy = tmp_path / "copy"
    shutil.copytree(two, copy)
    os.remove(copy / artifacts.RESULTS)
    argv = tiny_flags(tiny_model, text_files, copy) + ["--plot_only", "--pipeline_streams", "shared"]
    assert run_clm_igf.main(argv) == 0
    assert "the saved run's design (config.json), not the command line's" in capsys.readouterr().out
    assert json.load(open(copy / artifacts.RESULTS)) == json.load(open(two / artifacts.RESULTS))
    os.remove(copy / artifacts.CONFIG)  # no saved design: the command line's, which does not fit the runs
    code = run_clm_igf.main(argv + ["--num_pipelines", "2", "--methods", *METHODS])
    check_error(code, "", capsys.readouterr().err, "candidate stream", "no standard run of pipeline 0",
                "--pipeline_streams")
