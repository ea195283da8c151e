"""Statistics of seeded runs against hand-computed values and scipy.stats called directly: each comparison of a
method with standard fine-tuning, pairing of runs by their index, None for undefined tests, the Markdown table and
the figure."""
import io
import json
import math
import random

import pytest
from matplotlib.figure import Figure
from scipy import stats

from igf import plot, statistics

METHODS = ["standard", "igf_constant", "igf_shifting", "random", "ppl", "oracle"]


def _record(method, run, curve, drawn=None, batch_size=4):
    drawn = [batch_size] * (len(curve) - 1) if drawn is None else drawn
    return {"method": method, "run": run, "batch_size": batch_size, "context_len": 32, "candidates_drawn": drawn,
            "steps": list(range(len(curve))), "test_ppl": list(curve)}


def _flat(method, finals, runs=None):
    """Records whose curves are flat, so that the area under the curve equals the final perplexity."""
    runs = range(len(finals)) if runs is None else runs
    return [_record(method, r, [v, v]) for r, v in zip(runs, finals)]


# ----------------------------------------------------------------------------- single comparisons

def test_hedges_g_by_hand():
    # a = [1, 2, 3], b = [3, 4, 5]: means 2 and 4, both sample variances 1, so the pooled SD is 1 and d = -2;
    # J = 1 - 3 / (4 * (3 + 3) - 9) = 1 - 3/15 = 0.8, so g = -1.6
    assert statistics.hedges_g([1.0, 2.0, 3.0], [3.0, 4.0, 5.0]) == pytest.approx(-1.6, rel=1e-12)
    # a = [1, 3] (mean 2, variance 2), b = [2, 4, 6] (mean 4, variance 4): pooled variance (1*2 + 2*4) / 3 = 10/3;
    # d = -2 / sqrt(10/3); J = 1 - 3 / (4 * 5 - 9) = 8/11
    assert statistics.hedges_g([1.0, 3.0], [2.0, 4.0, 6.0]) == pytest.approx(-2 / math.sqrt(10 / 3) * 8 / 11)
    assert statistics.hedges_g([3.0, 4.0, 5.0], [1.0, 2.0, 3.0]) == pytest.approx(1.6)  # sign follows a - b


def test_relative_median_change_by_hand():
    # medians 10 and 12: (10 - 12) / 12 = -1/6, negative = lower perplexity than the baseline
    assert statistics.relative_median_change([9.0, 10.0, 11.0], [10.0, 12.0, 14.0]) == pytest.approx(-1 / 6)
    assert statistics.relative_median_change([1.0, 3.0], [0.0, 0.0]) is None


def test_mann_whitney_by_hand():
    # every value of a lies below every value of b: U(a) = 0; exactly 1 of the C(6, 3) = 20 equally likely
    # orderings is this extreme on each side, so the two-sided p = 2/20 = 0.1
    res = statistics.mann_whitney_u([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert res["u"] == 0.0
    assert res["p"] == pytest.approx(0.1, rel=1e-12)


def test_wilcoxon_by_hand():
    # differences -1, -2, -3, +4: |d| ranks 1, 2, 3, 4; W+ = 4, W- = 6, the statistic is min(W+, W-) = 4;
    # exact two-sided p = 2 * P(W+ <= 4) over the 16 equally likely sign patterns; the subsets of {1, 2, 3, 4} with
    # a sum <= 4 are {}, {1}, {2}, {3}, {1, 2}, {4}, {1, 3}: 7 of 16, so p = 14/16
    res = statistics.wilcoxon_signed_rank([1.0, 2.0, 3.0, 8.0], [2.0, 4.0, 6.0, 4.0])
    assert res == {"statistic": 4.0, "p": pytest.approx(14 / 16), "n_pairs": 4}


def test_tests_agree_with_scipy():
    a, b = [20.1, 19.5, 21.0, 20.7, 19.9, 20.3], [21.5, 22.0, 20.9, 23.1, 21.7, 20.8]
    welch, ref = statistics.welch_t_test(a, b), stats.ttest_ind(a, b, equal_var=False)
    assert (welch["t"], welch["p"]) == (pytest.approx(ref.statistic, rel=1e-12), pytest.approx(ref.pvalue, rel=1e-12))
    assert welch["t"] < 0  # a has the lower mean
    mw, ref = statistics.mann_whitney_u(a, b), stats.mannwhitneyu(a, b, alternative="two-sided")
    assert (mw["u"], mw["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue, rel=1e-12))
    wx, ref = statistics.wilcoxon_signed_rank(a, b), stats.wilcoxon(a, b)
    assert (wx["statistic"], wx["p"]) == (pytest.approx(ref.statistic), pytest.approx(ref.pvalue, rel=1e-12))
    assert wx["n_pairs"] == 6
    assert 0 < welch["p"] < 1 and 0 < mw["p"] < 1 and 0 < wx["p"] < 1


@pytest.mark.filterwarnings("ignore:Precision loss occurred")  # scipy, on the one side that does not vary
def test_undefined_tests_give_none():
    none = {"t": None, "p": None}
    assert statistics.welch_t_test([1.0], [2.0, 3.0]) == none  # fewer than two runs
    assert statistics.welch_t_test([2.0, 2.0], [3.0, 3.0]) == none  # no variance on either side
    assert statistics.welch_t_test([2.0, 2.0], [3.0, 4.0])["p"] is not None  # one side varying is enough
    assert statistics.mann_whitney_u([1.0], [2.0, 3.0]) == {"u": None, "p": None}
    assert statistics.mann_whitney_u([5.0, 5.0], [5.0, 5.0]) == {"u": None, "p": None}
    assert statistics.wilcoxon_signed_rank([1.0], [2.0]) == {"statistic": None, "p": None, "n_pairs": 1}
    assert statistics.wilcoxon_signed_rank([], []) == {"statistic": None, "p": None, "n_pairs": 0}
    assert statistics.wilcoxon_signed_rank([1.0, 2.0], [1.0, 2.0]) == {"statistic": None, "p": None, "n_pairs": 2}
    assert statistics.hedges_g([1.0], [2.0, 3.0]) is None
    assert statistics.hedges_g([2.0, 2.0], [3.0, 3.0]) is None
    with pytest.raises(ValueError):
        statistics.wilcoxon_signed_rank([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- all methods, runs paired by index

def _paired_example():
    """standard and igf_constant over runs 0-4 (igf_constant also has run 5, standard does not); by run, IGF is
    lower every time, while the list orders below would pair the runs differently."""
    std = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0, 4: 50.0}
    igf = {0: 9.0, 1: 19.5, 2: 28.0, 3: 39.2, 4: 47.0, 5: 33.0}
    records = {"standard": [_record("standard", r, [60.0, 0.5 * (60.0 + v), v]) for r, v in reversed(std.items())],
               "igf_constant": [_record("igf_constant", r, [60.0, 0.5 * (60.0 + v), v], drawn=[6, 10])
                                for r, v in igf.items()]}
    return std, igf, records


def test_compare_methods_pairs_runs_by_index():
    std, igf, records = _paired_example()
    out = statistics.compare_methods(records)
    assert out["baseline"] == "standard" and set(out["tests"]) == {"igf_constant_vs_standard"}
    final = out["tests"]["igf_constant_vs_standard"]["final"]
    # paired over runs 0-4 only: run 5 has no standard partner
    ref = stats.wilcoxon([igf[r] for r in range(5)], [std[r] for r in range(5)])
    assert final["wilcoxon"] == {"statistic": pytest.approx(ref.statistic), "p": pytest.approx(ref.pvalue),
                                 "n_pairs": 5}
    # all 5 differences negative: W+ = 0, exact two-sided p = 2/32
    assert final["wilcoxon"]["statistic"] == 0.0 and final["wilcoxon"]["p"] == pytest.approx(2 / 32)
    by_list_order = stats.wilcoxon([igf[r] for r in range(5)], [std[r] for r in reversed(range(5))])
    assert final["wilcoxon"]["p"] != pytest.approx(by_list_order.pvalue)
    # the unpaired tests use every run: 6 against 5
    a, b = list(igf.values()), list(reversed(std.values()))
    assert final["welch"]["p"] == pytest.approx(stats.ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert final["mann_whitney"]["p"] == pytest.approx(stats.mannwhitneyu(a, b, alternative="two-sided").pvalue)
    assert final["hedges_g"] == pytest.approx(statistics.hedges_g(a, b))
    assert final["median_change"] == pytest.approx((sorted(a)[2] + sorted(a)[3]) / 2 / 30.0 - 1)
    # area under [60, m, v] with m = (60 + v) / 2 over steps 0-2: ((60 + m) / 2 + (m + v) / 2) / 2 = 30 + v / 2
    auc = out["tests"]["igf_constant_vs_standard"]["auc"]
    ref = stats.wilcoxon([30 + igf[r] / 2 for r in range(5)], [30 + std[r] / 2 for r in range(5)])
    assert auc["wilcoxon"]["p"] == pytest.approx(ref.pvalue) and auc["wilcoxon"]["n_pairs"] == 5
    assert out["methods"]["igf_constant"]["auc_test_ppl"]["mean"] == pytest.approx(30 + sum(igf.values()) / 12)
    # the per-method summaries are unchanged
    assert out["methods"]["igf_constant"]["candidates_per_kept_context"] == pytest.approx(16 * 6 / (2 * 4 * 6))
    assert out["methods"]["standard"]["candidates_per_kept_context"] == 1.0
    assert out["methods"]["standard"]["runs"] == 5 and out["methods"]["igf_constant"]["runs"] == 6
    assert out["methods"]["standard"]["final_test_ppl"]["median"] == 30.0


def test_record_order_does_not_change_the_results():
    _, _, records = _paired_example()
    out = statistics.compare_methods(records)
    rng = random.Random(0)
    for _ in range(3):
        shuffled = {m: rng.sample(recs, len(recs)) for m, recs in records.items()}
        again = statistics.compare_methods(shuffled)
        assert again["tests"] == out["tests"]


def test_duplicate_run_index_is_refused():
    records = {"standard": _flat("standard", [1.0, 2.0], runs=[0, 0]), "random": _flat("random", [1.0, 2.0])}
    with pytest.raises(ValueError, match="appears twice"):
        statistics.compare_methods(records)


def test_degenerate_runs_give_none_and_valid_json():
    one = statistics.compare_methods({"standard": _flat("standard", [10.0]), "ppl": _flat("ppl", [9.0])})
    final = one["tests"]["ppl_vs_standard"]["final"]
    assert final["welch"] == {"t": None, "p": None} and final["mann_whitney"] == {"u": None, "p": None}
    assert final["wilcoxon"] == {"statistic": None, "p": None, "n_pairs": 1} and final["hedges_g"] is None
    assert final["median_change"] == pytest.approx(-0.1)
    same = statistics.compare_methods({"standard": _flat("standard", [5.0, 5.0]),
                                       "oracle": _flat("oracle", [5.0, 5.0])})
    final = same["tests"]["oracle_vs_standard"]["final"]
    assert final["welch"]["p"] is None and final["mann_whitney"]["p"] is None and final["hedges_g"] is None
    assert final["wilcoxon"] == {"statistic": None, "p": None, "n_pairs": 2} and final["median_change"] == 0.0
    disjoint = statistics.compare_methods({"standard": _flat("standard", [5.0, 6.0], runs=[0, 1]),
                                           "random": _flat("random", [4.0, 5.0], runs=[2, 3])})
    assert disjoint["tests"]["random_vs_standard"]["auc"]["wilcoxon"]["n_pairs"] == 0
    for results in (one, same, disjoint):
        json.dumps(results, allow_nan=False)  # raises on NaN or infinity


def test_without_baseline_there_are_no_tests():
    out = statistics.compare_methods({"igf_constant": _flat("igf_constant", [1.0, 2.0]),
                                      "random": _flat("random", [2.0, 3.0])})
    assert out["baseline"] is None and out["tests"] == {}
    assert list(out["methods"]) == ["igf_constant", "random"]


# ----------------------------------------------------------------------------- the Markdown table

def test_format_p():
    assert statistics.format_p(0.0912345) == "0.0912"
    assert statistics.format_p(0.25) == "0.25"
    assert statistics.format_p(0.00012345) == "1.23e-04"
    assert statistics.format_p(None) == "n/a"


def test_markdown_table():
    # final = AUC: standard 12, 13, 14 (median 13); igf_constant 9, 10, 11 (median 10): change (10 - 13) / 13;
    # Mann-Whitney: all of IGF below, p = 0.1; Hedges' g: d = -3 / 1, J = 0.8, g = -2.40
    records = {"igf_constant": _flat("igf_constant", [9.0, 10.0, 11.0]),
               "standard": _flat("standard", [12.0, 13.0, 14.0]),
               "random": _flat("random", [13.0])}
    results = statistics.compare_methods(records)
    learner = {"exact_pearson": 0.1123, "exact_spearman": None, "n_exact": 20, "context_loss_spearman": -0.25}
    table = statistics.markdown_table(results, learner)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 4 and "Welch p" in rows[0] and "Hedges' g" in rows[0]
    cells = [[c.strip() for c in row.split("|")[1:-1]] for row in rows[1:]]
    assert [c[0] for c in cells] == ["standard", "igf_constant", "random"]  # the baseline first
    assert all(len(c) == 9 for c in cells)
    cells = {c[0]: c for c in cells}
    assert cells["standard"][1:] == ["13.00 (13.00 ± 0.58)", "", "13.00 ± 0.58", "1.00", "", "", "", ""]
    welch = statistics.format_p(stats.ttest_ind([9, 10, 11], [12, 13, 14], equal_var=False).pvalue)
    paired = statistics.format_p(stats.wilcoxon([9, 10, 11], [12, 13, 14]).pvalue)
    assert cells["igf_constant"][1:] == ["10.00 (10.00 ± 0.58)", "−23.1 %", "10.00 ± 0.58", "1.00",
                                         f"{welch} / {welch}", "0.1 / 0.1", f"{paired} / {paired} (n = 3)",
                                         "−2.40 / −2.40"]
    assert cells["random"][1:] == ["13.00 (13.00 ± n/a)", "0.0 %", "13.00 ± n/a", "1.00", "n/a / n/a",
                                   "n/a / n/a", "n/a / n/a (n = 1)", "n/a / n/a"]
    assert ("Secondary learner vs held-out exact IG (n = 20): Pearson 0.11, Spearman n/a; "
            "the context's own pretrained loss: Spearman -0.25") in table
    assert "run r of each method shares its seed and candidate stream" in table
    no_learner = statistics.markdown_table(results)
    assert "Secondary learner" not in no_learner and no_learner.startswith(table.split("\n\n")[0])


def test_markdown_table_without_standard():
    results = statistics.compare_methods({"oracle": _flat("oracle", [1.0, 2.0]), "ppl": _flat("ppl", [2.0, 3.0])})
    table = statistics.markdown_table(results, {"exact_pearson": 0.5, "exact_spearman": 0.4, "n_exact": 8})
    rows = [line for line in table.splitlines() if line.startswith("| oracle") or line.startswith("| ppl")]
    assert len(rows) == 2 and all(row.endswith("|  |  |  |  |") for row in rows)
    assert "(n = 8): Pearson 0.50, Spearman 0.40\n" in table and "pretrained loss" not in table


# ----------------------------------------------------------------------------- the figure

def _png(fig):
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=50)
    plot.plt.close(fig)
    return buf.getvalue()


def _nested(records):
    """{method: [records]} of one pipeline as the driver loads them: {method: {0: [records]}}."""
    return {m: {0: recs} for m, recs in records.items()}


def test_figure_with_six_methods():
    rng = random.Random(1)
    records = _nested({m: [_record(m, r, [100.0, 90.0 - i + rng.random(), 80.0 - i + rng.random()]) for r in range(3)]
                       for i, m in enumerate(METHODS)})
    results = statistics.compare_all(records, [None])
    fig = plot.plot_results(results, records)
    assert isinstance(fig, Figure)
    left, middle, right = fig.axes
    assert len(left.get_lines()) == 6
    assert len({line.get_color() for line in left.get_lines()}) == 6  # one colour per method
    # the paired difference from standard: one curve per other method, and the zero line
    assert len(middle.get_lines()) == 5 + 1
    diff = results["paired_difference"]["igf_constant"]
    by_run = {r["run"]: r["test_ppl"] for r in records["standard"][0]}
    expected = [sum(r["test_ppl"][i] - by_run[r["run"]][i] for r in records["igf_constant"][0]) / 3 for i in range(3)]
    assert diff["mean"] == pytest.approx(expected) and diff["n"] == 3
    title = right.get_title()
    for m in METHODS[1:]:
        assert f"{m}: Welch p=" in title
    assert "paired p=" in title and "(n=3)" in title
    assert [t.get_text() for t in right.get_xticklabels()][-1] == "oracle"
    assert "3 runs per method" in fig._suptitle.get_text()
    assert _png(fig).startswith(b"\x89PNG")


def test_figure_without_standard():
    records = _nested({m: [_record(m, r, [100.0, 90.0 + r, 85.0 + r]) for r in range(2)]
                       for m in ("random", "oracle", "x")})
    results = statistics.compare_all(records, [None])
    fig = plot.plot_results(results, records)
    right = fig.axes[2]
    assert right.get_title() == "after the last batch"
    assert len(fig.axes[0].get_lines()) == 3
    assert _png(fig).startswith(b"\x89PNG")
    one = {"standard": {0: [_record("standard", 0, [100.0, 90.0])]}}
    assert _png(plot.plot_results(statistics.compare_all(one, [None]), one)).startswith(b"\x89PNG")


# ----------------------------------------------------------------------------- replicated pipelines

def _pipelines(shift):
    """standard (shared) and igf_constant / random on len(shift) pipelines: igf run r of pipeline p ends at
    standard's final + shift[p] + 0.1 r; random at standard's + 1."""
    standard = [_record("standard", r, [100.0, 60.0 + r]) for r in range(3)]
    return {"standard": {0: standard},
            "igf_constant": {p: [_record("igf_constant", r, [100.0, 60.0 + r + d + 0.1 * r]) for r in range(3)]
                             for p, d in enumerate(shift)},
            "random": {p: [_record("random", r, [100.0, 61.0 + r]) for r in range(3)] for p in range(len(shift))}}


def test_across_pipelines_by_hand():
    records = _pipelines([-1.0, -2.0, -0.5])
    learners = [{"exact_spearman": 0.2}, {"exact_spearman": 0.4}, {"exact_spearman": -0.1}]
    out = statistics.compare_all(records, learners)
    assert out["num_pipelines"] == 3 and "tests" not in out
    final = out["across_pipelines"]["igf_constant_vs_standard"]["final"]
    # pipeline p's mean paired difference: shift[p] + 0.1 * mean(0, 1, 2) = shift[p] + 0.1
    assert final["per_pipeline"] == pytest.approx([-0.9, -1.9, -0.4])
    assert final["mean"] == pytest.approx(-3.2 / 3)
    assert final["t_test"]["p"] == pytest.approx(stats.ttest_1samp([-0.9, -1.9, -0.4], 0).pvalue)
    assert final["lower_in_pipelines"] == 3
    # IGF against the control of its own pipeline: igf - random = shift[p] + 0.1 r - 1
    vs_random = out["across_pipelines"]["igf_constant_vs_random"]["final"]["per_pipeline"]
    assert vs_random == pytest.approx([-1.9, -2.9, -1.4])
    within = out["pipelines"][1]["tests"]["igf_constant_vs_standard"]["final"]
    assert within["paired_mean_difference"]["mean"] == pytest.approx(-1.9) and within["lower_in_pairs"] == 3
    assert within["wilcoxon"]["n_pairs"] == 3 and out["pipelines"][1]["learner"] == learners[1]
    spread = out["learner_spread"]
    assert spread["per_pipeline"] == [0.2, 0.4, -0.1] and spread["mean"] == pytest.approx(0.5 / 3)
    assert spread["sd"] == pytest.approx(statistics.np.std([0.2, 0.4, -0.1], ddof=1))
    # every igf run of every pipeline in the pooled summary; standard once
    assert out["methods"]["igf_constant"]["runs"] == 9 and out["methods"]["standard"]["runs"] == 3
    diff = out["paired_difference"]["igf_constant"]
    # the pipeline is the replicate: the SE of the three pipeline means, not of the nine pairs
    assert diff["n"] == 3 and diff["pairs"] == 9 and len(diff["per_pipeline"]) == 3
    assert diff["mean"][-1] == pytest.approx(sum([-0.9, -1.9, -0.4]) / 3)
    assert diff["se"][-1] == pytest.approx(stats.sem([-0.9, -1.9, -0.4]))
    tables = statistics.markdown_tables(out)
    assert tables.startswith("## Across pipelines") and "## Pipeline 2" in tables
    assert "| igf_constant vs standard | " in tables and "−0.90, −1.90, −0.40" in tables
    assert "3 of 3 pipelines" in tables and "## IGF against each control" in tables
    assert "Spearman per pipeline: 0.20, 0.40, -0.10" in tables
    fig = plot.plot_results(out, records)
    assert len(fig.axes[1].get_lines()) == 2 + 2 * 3 + 1  # two mean curves, a thin one per pipeline each, zero
    assert "3 pipelines" in fig._suptitle.get_text()
    plot.plt.close(fig)


def test_one_pipeline_keeps_the_single_pipeline_layout():
    records = _pipelines([-1.0])
    out = statistics.compare_all(records, [{"exact_spearman": 0.3}])
    assert out["tests"] == out["pipelines"][0]["tests"] and out["learner"] == {"exact_spearman": 0.3}
    assert set(out["tests"]) == {"igf_constant_vs_standard", "random_vs_standard", "igf_constant_vs_random"}
    tables = statistics.markdown_tables(out)
    assert not tables.startswith("## Across") and tables.startswith("| method |")
    single = statistics.compare_methods(statistics.records_of_pipeline(records, 0))
    assert statistics.markdown_table(single, {"exact_spearman": 0.3}) in tables  # one pipeline: the table as before


def test_variance_components_by_hand():
    # within: both groups have variance 2 (ddof 1); between: var(2, 6) = 8 minus 2 / 2 draws = 7
    out = statistics.variance_components([[1.0, 3.0], [5.0, 7.0]])
    assert out["mean"] == 4.0 and out["groups"] == 2 and out["draws"] == 2
    assert out["within_sd"] == pytest.approx(math.sqrt(2)) and out["between_sd"] == pytest.approx(math.sqrt(7))
    # group means closer than the draws' spread explains: no pipeline component
    assert statistics.variance_components([[0.0, 4.0], [1.0, 3.0]])["between_sd"] == 0.0
    assert statistics.variance_components([[0.2, 0.3]])["between_sd"] is None
    assert statistics.variance_components([[0.2], [0.4]])["within_sd"] is None


def test_runs_pair_by_candidate_stream_not_by_index():
    """Two methods' runs pair when they drew the same candidate stream (the fingerprint's "stream"), whatever their
    run index or list order; a run whose stream no baseline run drew is not paired."""
    def rec(method, run, stream, final):
        return {"method": method, "run": run, "steps": [0, 1], "test_ppl": [50.0, final], "candidates_drawn": [4],
                "batch_size": 4, "fingerprint": {"stream": stream}}

    standard = [rec("standard", 0, 1000, 40.0), rec("standard", 1, 1001, 42.0), rec("standard", 2, 1002, 44.0)]
    # IGF's run 0 drew stream 1002, its run 1 stream 1000, its run 2 a stream no standard run drew
    igf = [rec("igf_constant", 0, 1002, 41.0), rec("igf_constant", 1, 1000, 39.0), rec("igf_constant", 2, 7, 10.0)]
    out = statistics.compare_methods({"standard": standard, "igf_constant": igf})
    final = out["tests"]["igf_constant_vs_standard"]["final"]
    assert final["wilcoxon"]["n_pairs"] == 2
    assert final["paired_mean_difference"]["mean"] == pytest.approx(((41.0 - 44.0) + (39.0 - 40.0)) / 2)
    by_index = ((41.0 - 40.0) + (39.0 - 42.0) + (10.0 - 44.0)) / 3
    assert final["paired_mean_difference"]["mean"] != pytest.approx(by_index)
