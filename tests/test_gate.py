"""The learner's quality with its uncertainty (bootstrap CI), the gate that refuses a learner no better than chance,
and the ensemble's mean prediction."""
import json
import os
import random

import numpy as np
import pytest
import torch
from scipy import stats

import run_clm_igf
from conftest import set_flag
from igf import artifacts
from igf.secondary_learner import SecondaryLearner, build_learner, gate_refusal, learner_quality, predict
from igf.statistics import spearman_ci


def test_spearman_ci_against_an_independent_bootstrap():
    rng = np.random.default_rng(3)
    x = rng.normal(size=300)
    y = 0.3 * x + rng.normal(size=300)
    got = spearman_ci(x, y, n_resamples=4000, seed=1)
    # by hand: resample pairs with replacement, rank each side, Pearson of the ranks, 2.5 / 97.5 percentiles
    draw = np.random.default_rng(11)
    rhos = []
    for _ in range(4000):
        i = draw.integers(0, len(x), len(x))
        rhos.append(np.corrcoef(stats.rankdata(x[i]), stats.rankdata(y[i]))[0, 1])
    low, high = np.percentile(rhos, [2.5, 97.5])
    assert got["spearman"] == pytest.approx(np.corrcoef(stats.rankdata(x), stats.rankdata(y))[0, 1], abs=1e-12)
    assert got["ci"][0] == pytest.approx(low, abs=0.015) and got["ci"][1] == pytest.approx(high, abs=0.015)
    assert got["ci"][0] < got["spearman"] < got["ci"][1] and got["n"] == 300
    # the width shrinks as 1 / sqrt(n): four times the pairs, about half the interval
    wide = spearman_ci(x[:75], y[:75], seed=1)["ci"]
    assert 1.5 < (wide[1] - wide[0]) / (got["ci"][1] - got["ci"][0]) < 2.7
    assert spearman_ci([1.0, 1.0, 1.0, 1.0], [1, 2, 3, 4])["ci"] == [None, None]  # undefined: a constant side


def test_gate_reads_heldout_labels_first_and_refuses_a_ci_touching_zero():
    good = {"n_heldout": 500, "heldout_spearman": 0.25, "heldout_spearman_ci": [0.16, 0.33],
            "n_exact": 40, "exact_spearman": -0.1, "exact_spearman_ci": [-0.4, 0.2]}
    assert learner_quality(good)[3] == "held-out labels" and gate_refusal(good, "it") is None
    weak = {**good, "heldout_spearman": 0.05, "heldout_spearman_ci": [-0.04, 0.14]}
    message = gate_refusal(weak, "pipeline 2's secondary learner")
    assert message.startswith("pipeline 2's secondary learner is not better than chance: held-out Spearman 0.05 "
                              "(95 % CI -0.04 to 0.14, n = 500 held-out labels)")
    assert "--allow_weak_learner" in message and "\n" not in message
    exact_only = {"n_heldout": 0, "n_exact": 40, "exact_spearman": 0.5, "exact_spearman_ci": [0.2, 0.7]}
    assert learner_quality(exact_only)[3] == "exact validation pairs" and gate_refusal(exact_only, "it") is None
    assert "never scored" in gate_refusal({"n_heldout": 0, "n_exact": 0}, "it")


def test_ensemble_mean_is_its_members_average():
    torch.manual_seed(0)
    embeddings = torch.randn(50, 8)
    ensemble = build_learner(embeddings, ensemble=3, channels=4, kernel_size=3, hidden=5, dropout=0.0)
    ids = torch.randint(0, 50, (7, 12))
    members = torch.stack([predict(m, ids) for m in ensemble.members])
    assert torch.allclose(predict(ensemble, ids), members.mean(dim=0), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(ensemble(ids), members.mean(dim=0), atol=1e-5)  # the network, not the tables
    assert not torch.allclose(members[0], members[1])  # independent initialisations
    assert ensemble.members[1].embed is ensemble.members[0].embed  # one frozen table, not three copies
    assert set(ensemble.trainable_state()) | ensemble.frozen_keys() == set(ensemble.state_dict())
    assert isinstance(build_learner(embeddings, ensemble=1, channels=4), SecondaryLearner)


def _args(tiny_args, **flags):
    args = [a for a in tiny_args if a != "--allow_weak_learner"]
    args = set_flag(args, "--num_heldout_pairs", "64")
    for flag, value in flags.items():
        args = set_flag(args, f"--{flag}", *value) if value else args + [f"--{flag}"]
    return args


def _shuffle_labels(out):
    """Give every training context another's label (and z-score): a learner can learn nothing true from them."""
    path = os.path.join(out, artifacts.IG_PAIRS)
    pairs = artifacts.read_json(path)
    labels = [(p["ig"], p["ig_z"]) for p in pairs["pairs"]]
    random.Random(0).shuffle(labels)
    pairs["pairs"] = [{**p, "ig": ig, "ig_z": z} for p, (ig, z) in zip(pairs["pairs"], labels)]
    artifacts.write_json(path, pairs)


def test_gate_refuses_a_learner_trained_on_shuffled_labels(tiny_args, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_clm_igf.main(_args(tiny_args, stages=["ig_pairs"])) == 0
    _shuffle_labels(out)
    capsys.readouterr()
    assert run_clm_igf.main(_args(tiny_args, stages=["learner", "finetune", "plot"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]  # not the progress bars
    assert len(err) == 1 and err[0].startswith("error: pipeline 0's secondary learner is not better than chance")
    metrics = json.load(open(os.path.join(out, artifacts.LEARNER_METRICS)))
    assert metrics["heldout_spearman_ci"][0] <= 0 and metrics["n_heldout"] == 64  # the evidence is kept
    assert os.listdir(os.path.join(out, artifacts.RUNS)) == []  # no run written

    # --allow_weak_learner: the same learner fine-tunes, with the refusal printed as a warning
    assert run_clm_igf.main(_args(tiny_args, stages=["learner", "finetune"], allow_weak_learner=None)) == 0
    assert "warning (--allow_weak_learner): pipeline 0's secondary learner" in capsys.readouterr().out
    assert os.path.exists(artifacts.run_path(out, "igf_constant", 0, 0))


def test_gate_passes_a_learner_of_a_learnable_signal(tiny_args, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert run_clm_igf.main(_args(tiny_args)) == 0
    metrics = json.load(open(os.path.join(out, artifacts.LEARNER_METRICS)))
    assert metrics["heldout_spearman_ci"][0] > 0 and len(metrics["heldout_spearman_per_member"]) == 3
    assert "quality: held-out Spearman" in capsys.readouterr().out
    assert os.path.exists(artifacts.run_path(out, "igf_constant", 0, 1))
