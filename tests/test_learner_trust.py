"""A learner folder is trusted for what it says, or refused in one line: its hash covers config.json with the
tensors (an edited metric or scale is damaged, like an edited weight), the tensors' shapes are checked against the
architecture before anything is allocated, every value is range-checked; Learner.score refuses a bare string and
warns once for a learner that fails the gate; the scale IGF selected on (--no-standardize_scores) is recorded and
honoured by the filter, Learner.score and the card."""
import json
import math
import os
import shutil
import warnings

import numpy as np
import pytest
import torch
from test_learner_folder import one_error_line

import run_clm_igf
from conftest import make_tiny_model, tiny_flags
from igf import Learner, artifacts, filter
from igf.errors import IGFError
from igf.learner import CONFIG, WEIGHTS, content_sha


@pytest.fixture(scope="module")
def trained(text_folders, tmp_path_factory):
    """(learner folder, its training text): a learner trained on a tiny LM with --no-standardize_scores."""
    root = tmp_path_factory.mktemp("trust")
    lm = make_tiny_model(root / "lm")
    out = root / "out"
    argv = tiny_flags(lm, text_folders, out) + ["--stages", "ig_pairs", "learner", "--no-standardize_scores"]
    assert run_clm_igf.main(argv) == 0
    corpus = root / "train.txt"
    corpus.write_text("".join(open(os.path.join(text_folders["train"], n), encoding="utf-8").read()
                              for n in sorted(os.listdir(text_folders["train"]))), encoding="utf-8")
    return str(out / artifacts.LEARNER_FOLDER), str(corpus), str(out)


def edited(folder, tmp_path, name, rehash=False, **changes):
    """A copy of ``folder`` whose config.json has ``changes`` (dotted keys); ``rehash``: its content_sha made to
    fit again, as a forger would (so that only the range or shape checks can catch it)."""
    from safetensors.torch import load_file

    copy = shutil.copytree(folder, tmp_path / name)
    config = json.load(open(os.path.join(copy, CONFIG)))
    for key, value in changes.items():
        *path, last = key.split(".")
        node = config
        for k in path:
            node = node[k]
        node[last] = value
    if rehash:
        config["content_sha"] = content_sha(config, load_file(os.path.join(copy, WEIGHTS)))
    with open(os.path.join(copy, CONFIG), "w") as fh:  # json.dump writes NaN as NaN, as a hand edit would
        json.dump(config, fh)
    return copy


def test_an_edited_config_is_damaged_like_an_edited_weight(trained, tmp_path, capsys):
    folder, corpus, _ = trained
    argv = ["--input", corpus, "--output", tmp_path / "k.jsonl", "--allow_weak_learner"]
    good = {"n_heldout": 16, "heldout_spearman": 0.9, "heldout_spearman_ci": [0.8, 0.95]}
    for name, change in (("metrics", {"metrics": good}), ("scale", {"scale.mean": 0.0}),
                         ("standardize", {"standardize": True}), ("context", {"context_len": 8})):
        copy = edited(folder, tmp_path, name, **change)
        one_error_line(capsys, [copy, *argv], "altered or damaged")
        with pytest.raises(IGFError, match="altered or damaged"):
            Learner.from_pretrained(copy)
    assert not os.path.exists(tmp_path / "k.jsonl")


@pytest.mark.parametrize("change, fragment", [
    ({"scale.std": math.nan}, "scale must hold a finite mean and a finite std > 0"),
    ({"scale.std": 0.0}, "finite std > 0"),
    ({"scale.mean": math.inf}, "finite mean"),
    ({"context_len": 0}, "context_len must be an integer >= 2"),
    ({"context_len": 16.5}, "context_len must be an integer"),
    ({"architecture.dropout": 1.5}, "architecture.dropout must lie in [0, 1)"),
    ({"architecture.channels": -3}, "architecture.channels must be a positive integer"),
    ({"architecture.pooling": "sum"}, "architecture.pooling must be one of"),
    ({"metrics.heldout_spearman_ci": [0.5, 7]}, "metrics.heldout_spearman_ci must be a correlation"),
    ({"metrics.n_heldout": -1}, "metrics.n_heldout must be a count"),
    ({"standardize": "yes"}, "standardize must be true or false"),
    ({"pool.acceptance_at_zero": 1.5}, "pool must hold"),
    ({"pool": [1]}, "pool must hold"),
    ({"metrics": [1]}, "metrics must be an object"),
    ({"architecture": [1]}, "architecture is missing"),
    ({"built_on": None}, "built_on must name"),
])
def test_every_value_is_range_checked(change, fragment, trained, tmp_path, capsys):
    folder, corpus, _ = trained
    copy = edited(folder, tmp_path, "bad", rehash=True, **change)  # even with a hash that fits
    one_error_line(capsys, [copy, "--input", corpus, "--output", tmp_path / "k.jsonl", "--allow_weak_learner"],
                   "is damaged or was edited", fragment)


@pytest.mark.parametrize("change, fragment", [
    ({"architecture.channels": 7}, "channels"), ({"architecture.ensemble": 2}, "ensemble"),
    ({"architecture.kernel_size": 5}, "kernel_size"), ({"architecture.hidden": 9}, "hidden"),
    ({"architecture.pooling": "mean_max"}, "pooling"), ({"architecture.vocab_size": 99}, "vocab_size"),
])
def test_the_architecture_is_read_from_the_shapes_before_anything_is_allocated(change, fragment, trained, tmp_path,
                                                                               capsys, monkeypatch):
    import safetensors.torch

    folder, corpus, _ = trained
    copy = edited(folder, tmp_path, "arch", rehash=True, **change)

    def no_load(*args, **kwargs):
        raise AssertionError("tensors loaded before the shapes were checked")
    monkeypatch.setattr(safetensors.torch, "load_file", no_load)
    monkeypatch.setattr(torch.nn.Conv1d, "__init__", no_load)  # no network built either
    one_error_line(capsys, [copy, "--input", corpus, "--output", tmp_path / "k.jsonl", "--allow_weak_learner"],
                   "do not fit its config.json", fragment)


def test_score_refuses_a_bare_string_and_warns_once_for_a_weak_learner(trained):
    folder, corpus, _ = trained
    learner = Learner.from_pretrained(folder)
    with pytest.raises(IGFError, match="a list of texts, not one string"):
        learner.score("the king and the queen " * 10)
    text = open(corpus, encoding="utf-8").read()
    learner.config = {**learner.config, "metrics": {"n_heldout": 16, "heldout_spearman": 0.1,
                                                    "heldout_spearman_ci": [-0.4, 0.5]}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = learner.score([text])
        learner.score([text])
        learner.score_rows({"text": [text]})
    assert len(caught) == 1 and "not better than chance" in str(caught[0].message)
    assert len(first) > 10
    learner = Learner.from_pretrained(folder)
    learner.config = {**learner.config, "metrics": {"n_heldout": 16, "heldout_spearman": 0.9,
                                                    "heldout_spearman_ci": [0.8, 0.95]}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        learner.score([text])
    assert not caught  # a learner that passes the gate scores silently


def test_the_scale_igf_used_is_recorded_and_honoured(trained, tmp_path):
    """With --no-standardize_scores IGF keeps raw predicted IG >= 0: the folder says so, and the filter, score()
    and the card's pool acceptance use the raw predictions, computed here by the network's own forward pass."""
    from safetensors.torch import load_file

    from igf.secondary_learner import LearnerEnsemble, SecondaryLearner

    folder, corpus, out = trained
    config = json.load(open(os.path.join(folder, CONFIG)))
    assert config["standardize"] is False
    # the network rebuilt by hand from the safetensors file: forward (nn.Conv1d), not the token tables
    tensors, arch = load_file(os.path.join(folder, WEIGHTS)), config["architecture"]
    members = [SecondaryLearner(tensors["embed.weight"], channels=arch["channels"], kernel_size=arch["kernel_size"],
                                hidden=arch["hidden"], dropout=0.0, pooling=arch["pooling"])
               for _ in range(arch["ensemble"])]
    net = LearnerEnsemble(members)
    net.load_state_dict({k: v for k, v in tensors.items() if k != "embed.weight"}, strict=False)
    tokenizer = Learner.from_pretrained(folder).tokenizer
    lines = open(corpus, encoding="utf-8").read().splitlines(keepends=True)
    ids = [t for line in lines for t in tokenizer(line, add_special_tokens=False)["input_ids"]]
    n = len(ids) // 16
    with torch.no_grad():
        raw = net.eval()(torch.tensor(ids[: 16 * n]).view(n, 16)).numpy()
    got = Learner.from_pretrained(folder).score(lines)
    assert np.allclose(got, raw, atol=1e-5) and not np.allclose(got, (raw - raw.mean()) / raw.std(), atol=1e-3)
    assert filter.main([folder, "--input", corpus, "--output", str(tmp_path / "k.jsonl"), "--scores",
                        str(tmp_path / "s.jsonl"), "--allow_weak_learner"]) == 0
    scores = np.array([json.loads(line)["score"] for line in open(tmp_path / "s.jsonl")])
    assert np.allclose(scores, raw, atol=1e-5)
    kept = len(open(tmp_path / "k.jsonl").readlines())
    unsure = np.abs(raw) < 1e-5  # too close to the threshold to tell float32 rounding apart
    assert (raw >= 0)[~unsure].sum() <= kept <= (raw >= 0).sum() + unsure.sum()
    assert config["pool"]["acceptance_at_zero"] == pytest.approx(float((raw >= 0).mean()), abs=unsure.mean() + 1e-12)
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "raw predicted IG, as IGF used it (--no-standardize_scores)" in card
    # the output folder's learner file on its LM (no learner folder) is read on the same scale
    bare = shutil.copytree(out, tmp_path / "bare", ignore=shutil.ignore_patterns(artifacts.LEARNER_FOLDER))
    artifacts.write_json(os.path.join(bare, artifacts.CONFIG), {"data": {}, "ig": {}, "learner": {}, "run": {},
                                                                "finetune": {"standardize_scores": False}})
    assert np.array_equal(Learner.from_output_dir(str(bare)).score(lines), got)


def test_the_driver_rewrites_the_folder_for_another_standardize_scores(trained, text_folders, tmp_path, capsys):
    _, _, out = trained
    copy = shutil.copytree(out, tmp_path / "out")
    argv = tiny_flags(os.path.join(os.path.dirname(out), "lm"), text_folders, copy) + ["--stages", "ig_pairs",
                                                                                      "learner"]
    capsys.readouterr()
    assert run_clm_igf.main(argv + ["--no-standardize_scores"]) == 0  # the same: nothing written
    assert "wrote the learner folder" not in capsys.readouterr().out
    assert run_clm_igf.main(argv + ["--standardize_scores"]) == 0
    assert "wrote the learner folder" in capsys.readouterr().out
    learner = Learner.from_pretrained(os.path.join(copy, artifacts.LEARNER_FOLDER))
    assert learner.standardized and learner.config["standardize"] is True
