"""Where contexts come from and what the selection report says about them: text read exactly as datasets' text
loader reads it, one source per file of a folder, a window's source by majority, DSIR's importance weights against
an independent computation, and the report's measures against hand values."""
import collections
import math

import numpy as np
import pytest
from scipy import stats

from igf import data, dsir, selection_report
from igf.errors import IGFError

# ----------------------------------------------------------------------------- reading text

def test_read_lines_splits_as_the_datasets_text_loader(tmp_path):
    import datasets

    path = tmp_path / "odd.txt"
    path.write_bytes("one\r\ntwo\rthree\n\nfour\u2028still four\x0cand five\u00e9\nlast without newline".encode())
    ours = list(data.read_lines(str(path)))
    theirs = datasets.load_dataset("text", data_files={"train": str(path)}, keep_linebreaks=True)["train"]["text"]
    assert ours == theirs
    assert ours[:3] == ["one\n", "two\n", "three\n"]  # universal newlines; "\u2028" and "\x0c" end no line


def test_a_folder_is_one_source_per_file_in_path_order(tmp_path):
    (tmp_path / "b").mkdir()
    for name, text in (("b/z.txt", "zz\n"), ("a.txt", "aa\n"), ("b/c.md", "cc\n"), (".hidden", "x\n")):
        (tmp_path / name).write_text(text)
    files = data.text_files(str(tmp_path))
    assert [name for _, name in files] == ["a", "b/c", "b/z"]  # hidden files left out
    assert data.text_files(str(tmp_path / "a.txt")) == [(str(tmp_path / "a.txt"), "a")]
    with pytest.raises(IGFError, match="not found"):
        data.text_files(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(IGFError, match="empty folder"):
        data.text_files(str(tmp_path / "empty"))


def test_every_token_and_context_knows_its_source(tiny_model, tmp_path):
    from transformers import AutoTokenizer

    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "a.txt").write_text("the king . the queen\nthe realm\n")  # 5 + 2 tokens (no "\n" token)
    (tmp_path / "train" / "b.txt").write_text("a cat sat on my mat\n")
    (tmp_path / "v.txt").write_text("the sword and the crown .\n")
    (tmp_path / "t.txt").write_text("one red ball near a bed .\n")
    raw = data.load_raw_splits(str(tmp_path / "train"), str(tmp_path / "v.txt"), str(tmp_path / "t.txt"))
    corpus = data.tokenize_splits(raw, AutoTokenizer.from_pretrained(tiny_model))
    assert corpus.source_names == ["a", "b", "v", "t"]
    a, b = corpus.source_names.index("a"), corpus.source_names.index("b")
    assert corpus.sources["train"].tolist() == [a] * 7 + [b] * 6
    # windows of 4: [a a a a] [a a a b] [b b b b] (the tail of 1 is dropped): the second is mostly a
    assert data.window_sources(corpus.sources["train"], 4).tolist() == [a, a, b]
    assert data.window_sources(np.array([3, 3, 1, 1, 2]), 4).tolist() == [1]  # a tie: the source listed first
    sets = data.build_context_sets(corpus, 4, 0, 0)
    assert sets.sources["train"].tolist() == [a, a, b] and sets.source_names == ("a", "b", "v", "t")


# ----------------------------------------------------------------------------- DSIR

def _bucket(key, buckets):
    """splitmix64's finalizer on a Python int, written out independently of igf/dsir.py's numpy version."""
    m = (1 << 64) - 1
    z = key & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return (z ^ (z >> 31)) % buckets


def _features(context, buckets):
    unigrams = [_bucket(int(a), buckets) for a in context]
    bigrams = [_bucket((1 << 62) | (int(a) << 31) | int(b), buckets) for a, b in zip(context, context[1:])]
    return collections.Counter(unigrams + bigrams)


def test_dsir_scores_against_an_independent_computation():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 12, size=(40, 6))  # a toy vocabulary of 12 tokens
    pool[:8] = rng.integers(0, 4, size=(8, 6))  # ... and 8 contexts of the target's tokens alone
    objective = rng.integers(0, 4, size=(5, 6))  # the target uses only tokens 0-3
    buckets = 50
    raw, target = collections.Counter(), collections.Counter()
    for c in pool:
        raw.update(_features(c, buckets))
    for c in objective:
        target.update(_features(c, buckets))
    n_raw, n_target = sum(raw.values()), sum(target.values())
    expected = [sum(n * (math.log(target[f] / n_target + 1e-8) - math.log(raw[f] / n_raw + 1e-8))
                    for f, n in _features(c, buckets).items()) for c in pool]
    assert dsir.dsir_scores(pool, objective, buckets) == pytest.approx(expected, rel=1e-12, abs=1e-9)
    # contexts of the target's tokens score higher than the rest
    scores = dsir.dsir_scores(pool, objective, buckets)
    in_target = np.all(pool < 4, axis=1) | (np.mean(pool < 4, axis=1) > 0.8)
    assert in_target[:8].all() and not in_target[8:].all()  # both kinds are there to compare
    assert scores[in_target].mean() > scores[~in_target].mean()
    lean = dsir.dsir_scores(np.vstack([objective, pool]), objective, buckets)
    assert lean[:5].min() > np.median(lean[5:])  # the objective set's own contexts rank near the top


def test_dsir_buckets_are_a_hash_of_unigrams_and_bigrams():
    ctx = np.array([[3, 7, 3]])
    b = dsir.ngram_buckets(ctx, 10_000)
    assert b.shape == (1, 5) and b[0, 0] == b[0, 2]  # the same unigram, the same bucket
    assert b.tolist()[0] == [_bucket(3, 10_000), _bucket(7, 10_000), _bucket(3, 10_000),
                             _bucket((1 << 62) | (3 << 31) | 7, 10_000), _bucket((1 << 62) | (7 << 31) | 3, 10_000)]


# ----------------------------------------------------------------------------- the selection report

def test_unigram_kl_by_hand():
    prior = np.array([0.5, 0.25, 0.25])
    target = {"0": 1, "1": 1}  # p = (1/2, 1/2, 0)
    kept = {"0": 2}  # q = ((2 + m/2) / (2 + m), (m/4) / (2 + m), ...)
    m = 2
    q0, q1 = (2 + m * 0.5) / (2 + m), (m * 0.25) / (2 + m)
    expected = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / q1)
    assert selection_report.unigram_kl(target, kept, prior, prior_tokens=m) == pytest.approx(expected)
    assert selection_report.unigram_kl(target, {"0": 10**6, "1": 10**6}, prior) == pytest.approx(0, abs=1e-3)


def test_overlap_and_loss_sample():
    assert selection_report.overlap([[1, 2], [3, 4]], [[4, 9], [1]]) == 0.5
    assert selection_report.loss_sample(10, 256) == list(range(10))
    sample = selection_report.loss_sample(1000, 5)
    assert sample == [0, 250, 500, 749, 999] or sample == [0, 250, 500, 750, 999]
    assert selection_report.loss_sample(10, 0) == []


def _run(method, run, kept_rows, sources, unigrams, loss):
    return {"method": method, "run": run, "batch_size": 2, "candidates_drawn": [2 * (1 + (method != "standard"))],
            "kept_rows": kept_rows, "kept_sources": sources, "kept_unigrams": unigrams, "kept_loss": loss}


def test_selection_report_by_hand():
    contexts = {"source_names": ["kjv/a", "kjv/b", "shakespeare/c"], "vocab_size": 4,
                "pool": {"n": 8, "sources": [2, 2, 4], "unigrams": {"0": 4, "1": 4, "2": 4, "3": 4}},
                "test": {"n": 2, "sources": [1, 0, 1], "unigrams": {"0": 2, "3": 2}},
                "objective": [{"n": 2, "sources": [2, 0, 0], "unigrams": {"0": 4}}]}
    records = {"standard": {0: [_run("standard", 0, [[0, 5]], [[0, 2]], {"0": 2, "2": 2}, [3.0, 5.0])]},
               "igf_constant": {0: [_run("igf_constant", 0, [[0, 1]], [[0, 1]], {"0": 4}, [2.0, 2.0])]}}
    report = selection_report.selection_report(records, contexts)
    igf, std = report["methods"]["igf_constant"], report["methods"]["standard"]
    assert igf["groups"]["kjv"]["mean"] == 1.0 and std["groups"]["kjv"]["mean"] == 0.5
    assert report["sets"]["pool"]["groups"] == {"kjv": 0.5, "shakespeare": 0.5}
    assert report["sets"]["objective"][0]["groups"]["kjv"] == 1.0
    assert igf["pretrained_loss"]["mean"] == 2.0 and std["pretrained_loss"]["mean"] == 4.0
    assert std["overlap"]["mean"] == 0.5 and igf["overlap"] is None  # the reference itself
    assert igf["candidates"]["mean"] == 2.0 and std["candidates"]["mean"] == 1.0
    assert igf["kl_objective"]["mean"] < std["kl_objective"]["mean"]  # IGF kept only the objective's token
    lifts = {r["source"]: r["lift"] for r in igf["sources"]["all"]}
    assert lifts == {"kjv/a": 2.0, "kjv/b": 2.0, "shakespeare/c": 0.0}
    assert igf["sources"]["avoided"][0]["source"] == "shakespeare/c"
    text = selection_report.selection_markdown(report)
    assert "| igf_constant | 100.0 % | 0.0 % |" in text and "*pool*" in text and "shakespeare/c ×0.00" in text


def test_selection_report_uses_the_pipeline_as_the_replicate():
    """Two pipelines shift the KJV share in opposite directions: the SE is that of the two pipeline means (each
    the mean of its runs), not of the four runs pooled (scipy.stats.sem on the pipeline means)."""
    contexts = {"source_names": ["kjv/a", "shakespeare/c"], "vocab_size": 4,
                "pool": {"n": 8, "sources": [4, 4], "unigrams": {"0": 8, "1": 8}},
                "test": {"n": 2, "sources": [1, 1], "unigrams": {"0": 2}},
                "objective": [{"n": 2, "sources": [1, 1], "unigrams": {"0": 2}}] * 2}
    # kept sources per run (2 contexts each; 0 = kjv): pipeline 0 keeps KJV shares 1.0 and 0.5, pipeline 1 0.0 and 0.5
    kept = {0: [[[0, 0]], [[0, 1]]], 1: [[[1, 1]], [[0, 1]]]}
    records = {m: {p: [_run(m, r, [[0, 1]], kept[p][r], {"0": 2}, [1.0, 2.0 + p]) for r in range(2)]
                   for p in (0, 1)} for m in ("standard", "igf_constant")}
    report = selection_report.selection_report(records, contexts)
    for entry in report["methods"].values():
        means = [np.mean([1.0, 0.5]), np.mean([0.0, 0.5])]
        kjv = entry["groups"]["kjv"]
        assert entry["replicate"] == "pipelines" and kjv["n"] == 2
        assert kjv["mean"] == pytest.approx(np.mean(means)) and kjv["se"] == pytest.approx(stats.sem(means))
        assert kjv["se"] != pytest.approx(stats.sem([1.0, 0.5, 0.0, 0.5]))  # the pooled runs' SE differs
        assert entry["pretrained_loss"]["se"] == pytest.approx(stats.sem([1.5, 2.0]))  # kept losses [1, 2 + p]
    assert "the pipeline being the replicate" in selection_report.selection_markdown(report)
