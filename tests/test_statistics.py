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
    return {"method": method, "run": run, "batch_size": batch_size, "candidates_drawn": drawn,
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


def test_figure_with_six_methods():
    rng = random.Random(1)
    records = {m: [_record(m, r, [100.0, 90.0 - i + rng.random(), 80.0 - i + rng.random()]) for r in range(3)]
               for i, m in enumerate(METHODS)}
    results = statistics.compare_methods(records)
    fig = plot.plot_results(results, records, title="six methods")
    assert isinstance(fig, Figure)
    left, right = fig.axes
    assert len(left.get_lines()) == 6
    assert len({line.get_color() for line in left.get_lines()}) == 6  # one colour per method
    title = right.get_title()
    for m in METHODS[1:]:
        assert f"{m}: Welch p=" in title
    assert "paired p=" in title and "(n=3)" in title
    assert [t.get_text() for t in right.get_xticklabels()][-1] == "oracle"
    assert _png(fig).startswith(b"\x89PNG")


def test_figure_without_standard():
    records = {m: [_record(m, r, [100.0, 90.0 + r, 85.0 + r]) for r in range(2)] for m in ("random", "oracle", "x")}
    results = statistics.compare_methods(records)
    fig = plot.plot_results(results, records)
    right = fig.axes[1]
    assert right.get_title() == "after the last batch"
    assert len(fig.axes[0].get_lines()) == 3
    assert _png(fig).startswith(b"\x89PNG")
    one = {"standard": [_record("standard", 0, [100.0, 90.0])]}
    assert _png(plot.plot_results(statistics.compare_methods(one), one)).startswith(b"\x89PNG")
