"""The control methods end to end on the tiny model, with a training folder of two sources: every method runs on
the same candidate stream; random keeps candidates at the matched IGF method's rate; ppl ranks by the pretrained
loss in the direction that tracks IG on the labelled pairs; oracle ranks by the LM's first-order IG; dsir keeps
the top of the pool by its n-gram importance weight; source_matched keeps each source at IGF's rate for it; all
appear in the statistics, and IGF is compared with each of them."""
import json
import math
import os

import pytest
import torch
from scipy import stats
from transformers import AutoModelForCausalLM

import run_clm_igf
from conftest import tiny_flags
from igf import artifacts
from igf.config import METHODS, stage_seed
from igf.dsir import dsir_scores
from igf.information_gain import context_losses
from igf.selection import top_fraction_threshold

RUNS = 4


@pytest.fixture(scope="module")
def study(tiny_model, text_folders, tmp_path_factory):
    folder = tmp_path_factory.mktemp("controls") / "out"
    args = tiny_flags(tiny_model, text_folders, folder)
    args[args.index("--num_runs") + 1] = str(RUNS)
    args[args.index("--batch_size") + 1] = "6"
    assert run_clm_igf.main(args + ["--methods", *METHODS]) == 0
    runs = {m: [json.load(open(os.path.join(folder, artifacts.RUNS, f"{m}_run{r:03d}.json"))) for r in range(RUNS)]
            for m in METHODS}
    return folder, runs


def test_every_method_runs_and_is_compared(study):
    folder, runs = study
    results = json.load(open(os.path.join(folder, artifacts.RESULTS)))
    assert set(results["methods"]) == set(METHODS)
    controls = ("random", "ppl", "oracle", "dsir", "source_matched")
    assert set(results["tests"]) == {f"{m}_vs_standard" for m in METHODS if m != "standard"} | {
        f"{a}_vs_{b}" for a in ("igf_constant", "igf_shifting") for b in controls}
    table = open(os.path.join(folder, artifacts.RESULTS_TABLE)).read()
    assert all(f"| {m} |" in table for m in METHODS) and "held-out exact IG" in table
    for m in METHODS:
        for r, rec in enumerate(runs[m]):
            assert rec["seed"] == runs["standard"][r]["seed"]  # run r of every method: the same stream
            assert [len(rows) for rows in rec["kept_rows"]] == [6] * 3
    # standard takes the stream as it comes; every filter skips some of it
    assert all(d == 6 for rec in runs["standard"] for d in rec["candidates_drawn"])
    for m in ("igf_constant", "random", "ppl", "oracle", "dsir", "source_matched"):
        assert sum(d for rec in runs[m] for d in rec["candidates_drawn"]) > RUNS * 3 * 6, m
    assert "## IGF against each control" in table and "| igf_constant vs source_matched |" in table


def test_dsir_keeps_the_top_of_the_pool_by_importance(study):
    folder, runs = study
    sets = run_clm_igf_sets(folder, all_sets=True)
    objective = sets.objective_set(8, stage_seed(runs["dsir"][0]["fingerprint"]["seed"], "objective_set"))[0]
    scores = dsir_scores(sets.train.numpy(), objective.numpy(), 10000)
    acceptance = runs["dsir"][0]["fingerprint"]["selection"]["acceptance"]
    for rec in runs["dsir"]:
        for b, (rows, threshold) in enumerate(zip(rec["kept_rows"], rec["thresholds"])):
            assert threshold == top_fraction_threshold(torch.as_tensor(scores), acceptance[b])
            assert all(scores[r] >= threshold for r in rows)
    # the kept contexts lean to the objective set's style (A) more than the pool does
    a = sets.source_names.index("style_a")
    kept_a = sum(s == a for rec in runs["dsir"] for batch in rec["kept_sources"] for s in batch)
    assert kept_a / (6 * 3 * RUNS) > (sets.sources["train"] == a).double().mean().item()


def test_source_matched_keeps_each_source_at_the_igf_rate(study):
    """Each source s is kept with probability a_s, the fraction of s's pool contexts IGF keeps: the expected share
    of s among the kept is a_s n_s / sum_t a_t n_t. The kept counts over all runs lie within 4 SD of it."""
    folder, runs = study
    sets = run_clm_igf_sets(folder, all_sets=True)
    selection = runs["source_matched"][0]["fingerprint"]["selection"]
    assert selection["control_matches"] == "igf_constant" and "source_acceptance" in selection
    igf_sources = [s for rec in runs["igf_constant"] for batch in rec["kept_sources"] for s in batch]
    matched = [s for rec in runs["source_matched"] for batch in rec["kept_sources"] for s in batch]
    pool = sets.sources["train"]
    a = sets.source_names.index("style_a")
    # IGF's own kept share of style A estimates a_A n_A / sum a_t n_t; both draw the same number of contexts
    n = len(matched)
    share_igf = sum(s == a for s in igf_sources) / n
    share_matched = sum(s == a for s in matched) / n
    sd = math.sqrt(max(share_igf * (1 - share_igf), 1 / n) / n) * math.sqrt(2)
    assert abs(share_matched - share_igf) <= 4 * sd + 1e-9
    assert share_matched != pytest.approx((pool == a).double().mean().item(), abs=0.05)  # not the pool's mix
    # the same coins as random: where a source's rate is 1 both keep every candidate of it
    assert runs["source_matched"][0]["seed"] == runs["random"][0]["seed"]


def test_random_matches_the_igf_acceptance(study):
    """Drawing until k of Bernoulli(a) candidates pass takes k/a draws on average, variance k(1-a)/a^2
    (negative binomial): random's total draws must lie within 4 SD of what IGF's acceptance implies."""
    folder, runs = study
    acceptance = runs["random"][0]["fingerprint"]["selection"]["acceptance"]
    kept = 6 * RUNS
    for b, a in enumerate(acceptance):
        drawn = sum(rec["candidates_drawn"][b] for rec in runs["random"])
        mean, sd = kept / a, math.sqrt(kept * (1 - a)) / a
        assert abs(drawn - mean) <= 4 * sd + 1e-9, (b, a, drawn, mean, sd)
        assert runs["random"][0]["thresholds"][b] == pytest.approx(1 - a)  # keep when u >= 1 - a
    # the matched method keeps that fraction of the pool: its draws agree with the same expectation
    igf_drawn = sum(sum(rec["candidates_drawn"]) for rec in runs["igf_constant"])
    expected = sum(kept / a for a in acceptance)
    assert abs(igf_drawn - expected) <= 4 * math.sqrt(sum(kept * (1 - a) / a ** 2 for a in acceptance))


def test_ppl_keeps_by_pretrained_loss_in_the_direction_of_ig(study, tiny_model):
    folder, runs = study
    pairs = json.load(open(os.path.join(folder, artifacts.IG_PAIRS)))["pairs"]
    rho = stats.spearmanr([math.log(p["context_ppl"]) for p in pairs], [p["ig"] for p in pairs])[0]
    direction = 1 if rho >= 0 else -1
    assert runs["ppl"][0]["fingerprint"]["selection"]["ppl_direction"] == direction
    # every kept context passes the batch's threshold on direction * its pretrained loss
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    sets = run_clm_igf_sets(folder)
    for rec in runs["ppl"]:
        for rows, threshold in zip(rec["kept_rows"], rec["thresholds"]):
            losses = context_losses(model, sets[rows], 8, torch.device("cpu"))
            assert all(direction * v >= threshold - 1e-12 for v in losses.tolist())


def run_clm_igf_sets(folder, all_sets=False):
    """The training pool (or all the ContextSets) of the run in ``folder``, rebuilt from its saved configuration."""
    cfg = run_clm_igf.parse_args(config_argv(json.load(open(os.path.join(folder, artifacts.CONFIG)))))
    _, _, sets, _, _ = run_clm_igf.load_model_and_contexts(cfg, torch.device("cpu"))
    return sets if all_sets else sets.train


def config_argv(config):
    d = config["data"]
    return ["--model_name_or_path", d["model_name_or_path"], "--train_file", d["train_file"], "--validation_file",
            d["validation_file"], "--test_file", d["test_file"], "--context_len", str(d["context_len"]),
            "--size_objective_set", str(d["size_objective_set"]), "--size_test_set", str(d["size_test_set"]),
            "--seed", str(config["run"]["seed"])]
