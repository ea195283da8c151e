"""Pure functions against hand-computed values: perplexity, z-scores, IG sign, thresholds, statistics,
candidate selection, and the construction of disjoint context sets."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats

from igf import data, information_gain, selection, statistics, thresholds
from igf.errors import IGFError

# ----------------------------------------------------------------------------- perplexity and IG

@pytest.mark.parametrize("vocab", [2, 7, 29, 1000])
def test_perplexity_of_uniform_logits_is_vocab_size(vocab):
    ids = torch.randint(0, vocab, (3, 9), generator=torch.Generator().manual_seed(0))
    logits = torch.full((3, 9, vocab), 0.37)  # any constant: softmax is uniform
    assert information_gain.perplexity_from_logits(logits, ids) == pytest.approx(vocab, rel=1e-6)


def test_token_nll_matches_manual_log_softmax():
    logits = torch.tensor([[[1.0, 2.0, 0.5, -1.0],
                            [0.0, -0.5, 3.0, 1.0],
                            [2.0, 2.0, 2.0, 9.0]]])  # (1, 3, 4); the last position predicts nothing
    ids = torch.tensor([[3, 1, 2]])  # position 0 predicts 1, position 1 predicts 2

    def nll(row, target):
        return -(row[target] - math.log(sum(math.exp(v) for v in row)))

    expected = nll([1.0, 2.0, 0.5, -1.0], 1) + nll([0.0, -0.5, 3.0, 1.0], 2)
    total, n = information_gain.token_nll(logits, ids)
    assert n == 2
    assert total.item() == pytest.approx(expected, rel=1e-6)
    assert information_gain.perplexity_from_logits(logits, ids) == pytest.approx(math.exp(expected / 2), rel=1e-6)


def test_zscore():
    values = [1.0, 2.0, 4.0, 9.0]
    z, mean, std = information_gain.zscore(values)
    assert mean == pytest.approx(4.0)
    assert std == pytest.approx(math.sqrt(np.var(values)))  # population std
    assert std == pytest.approx(math.sqrt((9 + 4 + 0 + 25) / 4))
    assert np.mean(z) == pytest.approx(0.0, abs=1e-12)
    assert np.std(z) == pytest.approx(1.0)
    assert z == pytest.approx([(v - 4.0) / std for v in values])


@pytest.mark.parametrize("values", [[3.0, 3.0, 3.0], [0.5]])
def test_zscore_of_equal_values_raises(values):
    with pytest.raises(IGFError):
        information_gain.zscore(values)


def test_information_gain_sign():
    assert information_gain.information_gain(10, 7) == 3  # the step lowered the objective perplexity: helpful
    assert information_gain.information_gain(7, 10) == -3


# ----------------------------------------------------------------------------- thresholds

def test_constant_threshold():
    assert all(thresholds.constant_threshold(b, 0.25) == 0.25 for b in range(50))


def test_step_threshold():
    assert [thresholds.step_threshold(b, 1.0, -1.0, 3) for b in range(6)] == [1.0, 1.0, 1.0, -1.0, -1.0, -1.0]


def test_linear_threshold():
    f = lambda b: thresholds.linear_threshold(b, 1.0, -1.0, 10)  # noqa: E731
    assert f(0) == 1.0
    assert f(5) == pytest.approx(0.0, abs=1e-15)
    assert f(10) == -1.0
    assert f(11) == -1.0 and f(100) == -1.0
    values = [f(b) for b in range(12)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert thresholds.linear_threshold(3, 2.0, 0.0, 4) == pytest.approx(0.5)


def test_exponential_threshold():
    f = lambda b: thresholds.exponential_threshold(b, 1.0, -1.0, 4)  # noqa: E731
    assert f(0) == 1.0
    assert f(4) == pytest.approx(-1.0 + 2.0 * math.exp(-1))
    values = [f(b) for b in range(200)]
    assert all(a > b for a, b in zip(values[:40], values[1:40]))  # strictly decreasing while representable
    assert all(a >= b >= -1.0 for a, b in zip(values, values[1:]))  # approaches loose from above, never below
    assert values[-1] == pytest.approx(-1.0, abs=1e-12)


def test_threshold_schedule_dispatch():
    const = thresholds.threshold_schedule("igf_constant", constant=0.3)
    assert [const(b) for b in (0, 5, 99)] == [0.3, 0.3, 0.3]
    step = thresholds.threshold_schedule("igf_shifting", schedule="step", strict=2.0, loose=-0.5, shift_batches=2)
    assert [step(b) for b in range(4)] == [2.0, 2.0, -0.5, -0.5]
    lin = thresholds.threshold_schedule("igf_shifting", schedule="linear", strict=1.0, loose=-1.0, shift_batches=4)
    assert [lin(b) for b in range(6)] == pytest.approx([1.0, 0.5, 0.0, -0.5, -1.0, -1.0])
    exp = thresholds.threshold_schedule("igf_shifting", schedule="exponential", strict=1.0, loose=0.0,
                                        shift_batches=2)
    assert exp(2) == pytest.approx(math.exp(-1))
    with pytest.raises(ValueError):
        thresholds.threshold_schedule("standard")


# ----------------------------------------------------------------------------- statistics

def test_summarize():
    values = [1.0, 2.0, 3.0, 4.0, 10.0]
    s = statistics.summarize(values)
    assert s["n"] == 5
    assert s["mean"] == pytest.approx(4.0)
    sample_std = math.sqrt(((1 - 4) ** 2 + (2 - 4) ** 2 + 1 + 0 + 36) / 4)
    assert s["se"] == pytest.approx(sample_std / math.sqrt(5))
    assert s["median"] == 3.0
    assert (s["min"], s["max"]) == (1.0, 10.0)
    assert statistics.summarize([2.0])["se"] is None  # undefined for one run, not NaN (JSON-safe)
    assert statistics.summarize([1.0, 2.0, 3.0, 4.0])["median"] == 2.5


def test_area_under_curve():
    # trapezoids: (10 + 8) / 2 * 1 + (8 + 4) / 2 * 2 = 9 + 12 = 21, over a span of 3
    assert statistics.area_under_curve([0, 1, 3], [10.0, 8.0, 4.0]) == pytest.approx(7.0)
    assert statistics.area_under_curve([0, 5], [2.0, 2.0]) == pytest.approx(2.0)
    assert statistics.area_under_curve([0], [5.0]) == 5.0


def test_welch_t_test_matches_scipy():
    a, b = [20.1, 19.5, 21.0, 20.7, 19.9], [21.5, 22.0, 20.9, 23.1]
    res = statistics.welch_t_test(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert res["t"] == pytest.approx(ref.statistic, rel=1e-12)
    assert res["p"] == pytest.approx(ref.pvalue, rel=1e-12)
    assert res["t"] < 0  # a has the lower mean
    assert statistics.welch_t_test([1.0], b) == {"t": None, "p": None}
    assert statistics.welch_t_test(a, [2.0]) == {"t": None, "p": None}


def _record(method, drawn, curve, batch_size=4):
    return {"method": method, "batch_size": batch_size, "candidates_drawn": drawn,
            "steps": list(range(len(curve))), "test_ppl": curve}


def test_compare_methods():
    records = {"standard": [_record("standard", [4, 4], [10.0, 9.0, 8.0]),
                            _record("standard", [4, 4], [10.0, 9.5, 8.5])],
               "igf_constant": [_record("igf_constant", [6, 10], [10.0, 8.0, 7.0]),
                                _record("igf_constant", [8, 8], [10.0, 8.5, 7.2])]}
    out = statistics.compare_methods(records)
    assert out["methods"]["standard"]["candidates_per_kept_context"] == 1.0
    assert out["methods"]["igf_constant"]["candidates_per_kept_context"] == pytest.approx(32 / 16)
    assert out["methods"]["igf_constant"]["final_test_ppl"]["mean"] == pytest.approx(7.1)
    assert out["methods"]["standard"]["curve"]["mean"] == pytest.approx([10.0, 9.25, 8.25])
    assert out["methods"]["standard"]["runs"] == 2
    assert set(out["tests"]) == {"igf_constant_vs_standard"}
    ref = stats.ttest_ind([7.0, 7.2], [8.0, 8.5], equal_var=False)
    assert out["tests"]["igf_constant_vs_standard"]["final"]["welch"]["p"] == pytest.approx(ref.pvalue)


# ----------------------------------------------------------------------------- candidate selection

def candidates(order, scores=None):
    return selection.scored(iter(order), None if scores is None else (lambda rows: scores[rows]), chunk=1)


def test_select_batch_keeps_passing_rows_in_stream_order():
    scores = torch.tensor([0.9, -1.0, 0.1, 0.5, -0.2, 2.0, 0.0])
    order = [3, 1, 4, 6, 0, 2, 5]
    kept, drawn = selection.select_batch(candidates(order, scores), 3, threshold=0.0)
    assert kept == [3, 6, 0]  # 3 (0.5), 1 rejected, 4 rejected, 6 (0.0 >= 0.0 kept), 0 (0.9)
    assert drawn == 5
    kept, drawn = selection.select_batch(candidates(order, scores), 2, threshold=0.6)
    assert (kept, drawn) == ([0, 5], 7)
    kept, drawn = selection.select_batch(candidates(order), 4, -math.inf)  # standard: every candidate
    assert (kept, drawn) == ([3, 1, 4, 6], 4)


def test_select_batches_continue_the_stream_and_score_in_chunks():
    scores = torch.tensor([1.0, -1.0] * 8)
    calls = []

    def score(rows):
        calls.append(list(rows))
        return scores[rows]

    rule = selection.Rule(score, lambda b: 0.0, chunk=4)
    plan = selection.select_batches(rule, iter(range(16)), 2, 2)
    assert plan.batches == [[0, 2], [4, 6]] and plan.drawn == [3, 4] and plan.thresholds == [0.0, 0.0]
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7]]  # scored a chunk at a time, in stream order
    standard = selection.select_batches(selection.Rule(None, lambda b: -math.inf), itertools.count(), 3, 2)
    assert standard.batches == [[0, 1, 2], [3, 4, 5]] and standard.thresholds == [None, None]


def test_candidate_stream_is_seeded_and_covers_each_pass():
    s1 = selection.candidate_stream(5, torch.Generator().manual_seed(3))
    s2 = selection.candidate_stream(5, torch.Generator().manual_seed(3))
    first = [next(s1) for _ in range(15)]
    assert first == [next(s2) for _ in range(15)]
    for k in range(3):
        assert sorted(first[5 * k: 5 * k + 5]) == [0, 1, 2, 3, 4]


def test_acceptance_rate():
    scores = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    assert thresholds.acceptance_rate(scores, 0.0) == 0.75
    assert thresholds.acceptance_rate(scores, 3.0) == 0.0
    assert thresholds.acceptance_rate(scores, -5.0) == 1.0


def test_top_fraction_threshold():
    reference = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert selection.top_fraction_threshold(reference, 0.4) == 4.0  # keeps 5 and 4
    assert selection.top_fraction_threshold(reference, 0.5) == 3.0  # ceil(2.5) = 3 values
    assert selection.top_fraction_threshold(reference, 1.0) == -math.inf  # all, not down to the sample's lowest
    assert selection.top_fraction_threshold(reference, 0.0) == math.inf


def test_ppl_direction_is_the_sign_of_the_rank_correlation():
    ig = [1.0, 2.0, 3.0, 4.0]
    assert selection.ppl_direction([10.0, 20.0, 30.0, 40.0], ig) == 1  # loss rises with IG: keep high loss
    assert selection.ppl_direction([40.0, 30.0, 20.0, 10.0], ig) == -1
    assert selection.ppl_direction([5.0, 5.0, 5.0, 5.0], ig) == 1  # undefined: the default direction


def test_random_rule_keeps_the_matched_fraction():
    inputs = selection.SelectionInputs(acceptance=[0.25, 0.75])
    plans = [selection.select_batches(selection.make_rule("random", inputs, seed), iter(range(10 ** 6)), 400, 2)
             for seed in range(3)]
    for b, rate in enumerate([0.25, 0.75]):
        drawn = sum(p.drawn[b] for p in plans)
        assert 1200 / drawn == pytest.approx(rate, abs=0.03)  # ~4 binomial SEs at 1,200 kept


# ----------------------------------------------------------------------------- contexts

def test_cut_contexts():
    ids = np.arange(11)
    out = data.cut_contexts(ids, 3)
    assert out.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]  # the tail (9, 10) is dropped
    assert out.dtype == torch.int64
    assert data.cut_contexts(np.arange(2), 3).shape == (0, 3)


def _stream(windows):
    return np.concatenate([np.asarray(w, dtype=np.int64) for w in windows])


def _rows(t):
    return {tuple(r) for r in t.tolist()}


def w(k, T=4):
    """A distinct window of T tokens, identified by k."""
    return [k * 10 + i for i in range(T)]


def _sets(streams, T, size_objective_set, size_test_set, objective_seed, test_seed):
    """(ContextSets, objective set) as the driver makes them."""
    sets = data.build_context_sets(streams, T, size_test_set, test_seed)
    return sets, sets.objective_set(size_objective_set, objective_seed)[0]


def test_build_context_sets_is_disjoint():
    val_windows = [w(1), w(2), w(3), w(4), w(50)]  # w(50) is also a test window
    test_windows = [w(5), w(6), w(50), w(7)]
    own_train = [w(20 + k) for k in range(8)]
    train_windows = own_train[:3] + [w(1), w(5)] + own_train[3:6] + [w(3), w(50), w(7)] + own_train[6:]
    streams = {"train": _stream(train_windows), "validation": _stream(val_windows), "test": _stream(test_windows)}
    sets, objective = _sets(streams, 4, size_objective_set=4, size_test_set=0, objective_seed=0, test_seed=1)
    obj, test, train = _rows(objective), _rows(sets.test), _rows(sets.train)
    assert len(objective) == 4 and len(obj) == 4
    assert test == {tuple(x) for x in test_windows}  # size_test_set=0 keeps every test context
    assert obj == {tuple(w(k)) for k in (1, 2, 3, 4)}  # w(50) is a test window: never in the objective set
    assert not obj & test and not obj & train and not test & train
    # every shared window is dropped from train; the rest stays, in stream order
    assert sets.train.tolist() == own_train


def test_the_pool_drops_every_validation_window_so_no_pipeline_changes_it():
    val_windows = [w(k) for k in range(1, 9)]
    test_windows = [w(k) for k in range(11, 19)]
    train_windows = [w(k) for k in range(1, 9)] + [w(k) for k in range(11, 19)] + [w(k) for k in range(30, 34)]
    streams = {"train": _stream(train_windows), "validation": _stream(val_windows), "test": _stream(test_windows)}
    sets, objective = _sets(streams, 4, size_objective_set=3, size_test_set=5, objective_seed=7, test_seed=8)
    assert objective.shape == (3, 4) and sets.test.shape == (5, 4)
    obj, test, train = _rows(objective), _rows(sets.test), _rows(sets.train)
    assert obj <= {tuple(x) for x in val_windows} and test <= {tuple(x) for x in test_windows}
    assert not obj & test and not obj & train and not test & train
    # every validation window (a later pipeline may sample any of them) and the sampled test windows
    assert train == {tuple(x) for x in train_windows} - {tuple(x) for x in val_windows} - test
    assert len(sets.train) == len(train_windows) - 8 - 5
    other = sets.objective_set(3, 8)[0]  # another pipeline's objective set: the same pool
    assert not _rows(other) & train and not torch.equal(other, objective)


def test_build_context_sets_is_deterministic_for_a_seed():
    rng = np.random.default_rng(0)
    streams = {s: rng.integers(0, 1000, size=n) for s, n in (("train", 400), ("validation", 200), ("test", 200))}
    make = lambda o, t: _sets(streams, 5, 6, 7, objective_seed=o, test_seed=t)  # noqa: E731
    (a, obj_a), (b, obj_b) = make(1, 2), make(1, 2)
    assert torch.equal(a.train, b.train) and torch.equal(a.test, b.test) and torch.equal(obj_a, obj_b)
    assert not torch.equal(make(3, 2)[1], obj_a)
    assert not torch.equal(make(1, 4)[0].test, a.test)
    assert torch.equal(make(3, 2)[0].test, a.test)  # each set has its own generator


def test_build_context_sets_errors():
    ok = {"train": np.arange(40), "validation": np.arange(100, 140), "test": np.arange(200, 240)}
    with pytest.raises(IGFError, match="fewer than one context"):
        _sets({**ok, "validation": np.arange(3)}, 4, 2, 2, 0, 1)
    with pytest.raises(IGFError, match="the test text has 0 tokens"):
        _sets({**ok, "test": np.arange(0)}, 4, 2, 2, 0, 1)
    with pytest.raises(IGFError, match="size_objective_set 11"):
        _sets(ok, 4, 11, 2, 0, 1)  # 10 validation contexts
    with pytest.raises(IGFError, match="size_test_set 11"):
        _sets(ok, 4, 2, 11, 0, 1)
    same = np.arange(40)
    with pytest.raises(IGFError, match="no context that is not also"):
        _sets({"train": same[:8], "validation": same[:8], "test": same[8:16]}, 4, 2, 0, 0, 1)
