"""The control methods end to end on the tiny model, with a training folder of two sources: every method runs on
the same candidate stream; random keeps candidates at the matched IGF method's rate; ppl ranks by the pretrained
loss in the direction that tracks IG on the labelled pairs; oracle ranks by the LM's first-order IG; dsir keeps
the top of the pool by its n-gram importance weight; source_matched keeps each source at IGF's rate for it; all
appear in the statistics, and IGF is compared with each of them. What IGF keeps is recomputed here from the saved
learner file alone, and each run's batches are drawn again from its seeded stream: no check reads a run's record
to learn what that run should have done."""
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
from igf.config import METHODS as ALL_METHODS
from igf.config import ONLINE_METHODS, stage_seed
from igf.dsir import dsir_scores
from igf.information_gain import context_losses
from igf.secondary_learner import load_saved_learner, predict
from igf.selection import RANDOM_SEED_OFFSET, candidate_stream
from igf.thresholds import standardize

RUNS = 4
# the static controls; the model-aware rules (first-order SGD IG at theta_t, conditional models) have tests of their
# own (tests/test_online.py), and this fixture labels with exact Adam IG
METHODS = [m for m in ALL_METHODS if m not in ONLINE_METHODS + ("color", "color_validation")]


@pytest.fixture(scope="module")
def learned(tiny_model, text_folders, tmp_path_factory):
    """Stages 1-3 of the study: (folder, its flags, ContextSets rebuilt from the saved configuration, every pool
    context's predicted IG on the pool's z scale). The z-scores come from the saved learner file alone (its weights
    and the score scale it records), not from anything a run recorded."""
    folder = tmp_path_factory.mktemp("controls") / "out"
    args = tiny_flags(tiny_model, text_folders, folder)
    args[args.index("--num_runs") + 1] = str(RUNS)
    args[args.index("--batch_size") + 1] = "6"
    args += ["--methods", *METHODS]
    assert run_clm_igf.main(args + ["--stages", "ig_pairs", "learner"]) == 0
    sets = run_clm_igf_sets(folder, all_sets=True)
    path = os.path.join(folder, artifacts.LEARNER)
    saved = artifacts.read_torch(path)
    embeddings = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).get_input_embeddings().weight
    scores = predict(load_saved_learner(path, saved, embeddings), sets.train)  # (N_pool,)
    return folder, args, sets, standardize(scores, saved["scale"]["mean"], saved["scale"]["std"])


@pytest.fixture(scope="module")
def study(learned):
    """Stages 4-5, IGF's threshold at the median z-score of style A's contexts: the tiny learner puts (nearly) every
    style-B context below every style-A one, so at a threshold of 0 source_matched keeps each style at a rate of 1
    or 0 and its coins decide nothing; at this one it keeps style A at about 1/2, and its coins decide which."""
    folder, args, sets, z = learned
    a = sets.source_names.index("style_a")
    threshold = round(z[sets.sources["train"] == a].median().item(), 3)
    assert run_clm_igf.main(args + ["--stages", "finetune", "plot", "--constant_threshold", str(threshold)]) == 0
    runs = {m: [json.load(open(os.path.join(folder, artifacts.RUNS, f"{m}_run{r:03d}.json"))) for r in range(RUNS)]
            for m in METHODS}
    return folder, runs


@pytest.fixture(scope="module")
def pool(learned, study):
    """(ContextSets, the pool's z-scores from the saved learner, IGF's threshold as the saved configuration has it)."""
    folder, _, sets, z = learned
    return sets, z, json.load(open(os.path.join(folder, artifacts.CONFIG)))["finetune"]["constant_threshold"]


def run_seed(folder, run):
    """The seed of run ``run``'s candidate stream, from the saved configuration (igf/config.py SEED_OFFSETS)."""
    return stage_seed(json.load(open(os.path.join(folder, artifacts.CONFIG)))["run"]["seed"], "finetune") + run


def replay(pool_size, seed, keep, batch_size=6, num_batches=3):
    """(kept rows per batch, candidates drawn per batch) of a run drawn again: the candidates in the order of the
    stream seeded ``seed``, each kept when ``keep(row)``, until a batch holds ``batch_size``."""
    stream = candidate_stream(pool_size, torch.Generator().manual_seed(seed))
    kept, drawn = [], []
    for _ in range(num_batches):
        rows, n = [], 0
        while len(rows) < batch_size:
            row, n = next(stream), n + 1
            if keep(row):
                rows.append(row)
        kept.append(rows)
        drawn.append(n)
    return kept, drawn


def coin_rule(seed, cut):
    """keep(row) of random and source_matched: the run's next coin u ~ U[0, 1), seeded ``seed`` +
    RANDOM_SEED_OFFSET (one coin per candidate, in stream order), passes ``cut(row)`` = 1 - the row's rate."""
    coins = torch.Generator().manual_seed(seed + RANDOM_SEED_OFFSET)
    return lambda row: torch.rand(1, generator=coins, dtype=torch.float64).item() >= cut(row)


def kept_and_drawn(record):
    return record["kept_rows"], record["candidates_drawn"]


def test_every_method_runs_and_is_compared(study):
    folder, runs = study
    results = json.load(open(os.path.join(folder, artifacts.RESULTS)))
    assert set(results["methods"]) == set(METHODS)
    controls = ("random", "ppl", "oracle", "dsir", "dsir_validation", "source_matched")
    assert set(results["tests"]) == {f"{m}_vs_standard" for m in METHODS if m != "standard"} | {
        f"{a}_vs_{b}" for a in ("igf_constant", "igf_shifting") for b in controls} | {"oracle_vs_dsir"}
    table = open(os.path.join(folder, artifacts.RESULTS_TABLE)).read()
    assert all(f"| {m} |" in table for m in METHODS) and "held-out exact IG" in table
    for m in METHODS:
        for r, rec in enumerate(runs[m]):
            assert rec["seed"] == runs["standard"][r]["seed"]  # run r of every method: the same stream
            assert [len(rows) for rows in rec["kept_rows"]] == [6] * 3
    # standard takes the stream as it comes; every filter skips some of it
    assert all(d == 6 for rec in runs["standard"] for d in rec["candidates_drawn"])
    for m in ("igf_constant", "random", "ppl", "oracle", "dsir", "dsir_validation", "source_matched"):
        assert sum(d for rec in runs[m] for d in rec["candidates_drawn"]) > RUNS * 3 * 6, m
    assert "## IGF against each control" in table and "| igf_constant vs source_matched |" in table


def test_dsir_keeps_the_top_of_the_pool_by_importance(study, pool):
    """IGF keeps the n pool contexts whose z-score passes its threshold, so dsir keeps the pool's top n by importance
    weight: its threshold is the n-th largest weight, and its batches are its stream's contexts at or above it."""
    folder, runs = study
    sets, z, igf_threshold = pool
    seed = json.load(open(os.path.join(folder, artifacts.CONFIG)))["run"]["seed"]
    objective = sets.objective_set(8, stage_seed(seed, "objective_set"))[0]
    n = int((z >= igf_threshold).sum())
    assert 0 < n < len(z)
    # dsir fits its target on the objective set, dsir_validation on every validation context
    for method, target in (("dsir", objective), ("dsir_validation", sets.validation)):
        scores = dsir_scores(sets.train.numpy(), target.numpy(), 10000)
        threshold = sorted(scores.tolist(), reverse=True)[n - 1]
        for r, rec in enumerate(runs[method]):
            assert rec["thresholds"] == [threshold] * 3, method
            keep = lambda row, s=scores, t=threshold: s[row] >= t  # noqa: E731
            assert kept_and_drawn(rec) == replay(len(z), run_seed(folder, r), keep)
    scores = dsir_scores(sets.train.numpy(), objective.numpy(), 10000)
    assert not torch.equal(torch.as_tensor(scores), torch.as_tensor(dsir_scores(
        sets.train.numpy(), sets.validation.numpy(), 10000)))  # two targets, two rankings
    # the kept contexts lean to the objective set's style (A) more than the pool does
    a = sets.source_names.index("style_a")
    kept_a = sum(s == a for rec in runs["dsir"] for batch in rec["kept_sources"] for s in batch)
    assert kept_a / (6 * 3 * RUNS) > (sets.sources["train"] == a).double().mean().item()


def test_source_matched_keeps_each_source_at_the_igf_rate(study, pool):
    """Each source s is kept with probability a_s, the fraction of s's pool contexts IGF keeps: the expected share
    of s among the kept is a_s n_s / sum_t a_t n_t. The kept counts over all runs lie within 4 SD of it. Exactly:
    a_s recomputed from the pool's z-scores and sources, random's coins over the run's stream give its batches."""
    folder, runs = study
    sets, z, threshold = pool
    sources = sets.sources["train"].tolist()
    passes = (z >= threshold).tolist()
    rate = [sum(p for p, s in zip(passes, sources) if s == t) / sources.count(t) for t in range(max(sources) + 1)]
    assert any(0 < a < 1 for a in rate), rate  # else every coin passes or fails, whatever its seed
    for r, rec in enumerate(runs["source_matched"]):
        seed = run_seed(folder, r)
        assert kept_and_drawn(rec) == replay(len(z), seed, coin_rule(seed, lambda row: 1 - rate[sources[row]]))
        assert rec["kept_sources"] == [[sources[row] for row in rows] for rows in rec["kept_rows"]]
        # the coins of run r and no other: another seed's coins keep other candidates
        assert kept_and_drawn(rec) != replay(len(z), seed, coin_rule(seed + 1, lambda row: 1 - rate[sources[row]]))
    selection = runs["source_matched"][0]["fingerprint"]["selection"]
    assert selection["control_matches"] == "igf_constant" and "source_acceptance" in selection
    matched = [s for rec in runs["source_matched"] for batch in rec["kept_sources"] for s in batch]
    a = sets.source_names.index("style_a")
    n = len(matched)
    expected = rate[a] * sources.count(a) / sum(rate[t] * sources.count(t) for t in range(len(rate)))
    share_matched = sum(s == a for s in matched) / n
    assert abs(share_matched - expected) <= 4 * math.sqrt(expected * (1 - expected) / n) + 1e-9
    assert share_matched != pytest.approx(sources.count(a) / len(sources), abs=0.05)  # not the pool's mix


def test_random_matches_the_igf_acceptance(study, pool):
    """IGF's acceptance a is the fraction of the pool whose z-score (recomputed from the saved learner) passes its
    threshold. Exactly: IGF's batches are its stream's contexts that pass, and random's are the candidates whose
    coin u passes 1 - a. In distribution: drawing until k of Bernoulli(a) candidates pass takes k/a draws on
    average, variance k(1-a)/a^2 (negative binomial): random's draws lie within 4 SD of it."""
    folder, runs = study
    _, z, threshold = pool
    passes = (z >= threshold).tolist()
    a = sum(passes) / len(passes)
    assert 0 < a < 1
    for r in range(RUNS):
        seed = run_seed(folder, r)
        assert kept_and_drawn(runs["igf_constant"][r]) == replay(len(z), seed, passes.__getitem__)
        assert kept_and_drawn(runs["random"][r]) == replay(len(z), seed, coin_rule(seed, lambda row: 1 - a))
        assert runs["random"][r]["thresholds"] == [1 - a] * 3  # keep when u >= 1 - a
    kept = 6 * RUNS
    for b in range(3):
        drawn = sum(rec["candidates_drawn"][b] for rec in runs["random"])
        mean, sd = kept / a, math.sqrt(kept * (1 - a)) / a
        assert abs(drawn - mean) <= 4 * sd + 1e-9, (b, a, drawn, mean, sd)


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
