"""Statistics over seeded runs: mean +- standard error per step, final and area-under-curve summaries, and every
method against a baseline (standard fine-tuning): relative change of the median, Welch's t-test (as the paper),
Mann-Whitney U, the Wilcoxon signed-rank test over paired runs, and Hedges' g. Run r of every method shares its
seed and candidate stream, so runs pair up by their "run" index. scipy.stats does every test; the functions here
only arrange runs into samples and pairs (``correlations``: predictions against targets), and return None
wherever a number is undefined (results are written as JSON without NaN)."""
import math

import numpy as np
from scipy import stats


def _finite_or_none(x):
    return float(x) if x is not None and math.isfinite(x) else None


def _constant(values):
    return len(values) > 0 and min(values) == max(values)


def correlations(pred, target):
    """Pearson and Spearman correlation of predicted vs actual values (None when undefined)."""
    pred, target = (np.asarray(v, dtype=np.float64) for v in (pred, target))
    if len(pred) < 2 or pred.std() == 0 or target.std() == 0:
        return {"pearson": None, "spearman": None}
    return {"pearson": float(stats.pearsonr(pred, target)[0]), "spearman": float(stats.spearmanr(pred, target)[0])}


def spearman_ci(pred, target, confidence=0.95, n_resamples=2000, seed=0):
    """Spearman correlation of pred vs target with a percentile bootstrap confidence interval over the pairs
    (scipy.stats.bootstrap, paired): {"spearman", "ci": [low, high], "n"}; None values when undefined.

    Why a bootstrap: a learner's quality is scored on a few hundred held-out labels, and on 40-100 of them the
    sampling error alone (SD 0.05-0.1) decides whether a learner looks useful; the interval says how far to
    trust the number."""
    pred, target = (np.asarray(v, dtype=np.float64) for v in (pred, target))
    rho = correlations(pred, target)["spearman"]
    if rho is None or len(pred) < 4:
        return {"spearman": rho, "ci": [None, None], "n": len(pred)}

    def statistic(x, y):
        r = stats.spearmanr(x, y)[0]
        return r if math.isfinite(r) else 0.0  # a resample with a constant side: no rank information

    res = stats.bootstrap((pred, target), statistic, paired=True, vectorized=False, n_resamples=n_resamples,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    low, high = res.confidence_interval
    return {"spearman": rho, "ci": [_finite_or_none(low), _finite_or_none(high)], "n": len(pred)}


def summarize(values):
    """n, mean, standard error (sample std / sqrt n), median, min, max of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    se = v.std(ddof=1) / math.sqrt(len(v)) if len(v) > 1 else math.nan
    return {"n": len(v), "mean": float(v.mean()), "se": _finite_or_none(se), "median": float(np.median(v)),
            "min": float(v.min()), "max": float(v.max())}


def area_under_curve(steps, values):
    """Mean of the curve over its span (trapezoid rule / span): one number that rewards improving early."""
    steps, values = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if len(steps) < 2:
        return float(values[0])
    return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(steps)) / (steps[-1] - steps[0]))


def curve_band(records):
    """Per evaluated step: mean and standard error of test perplexity over runs (records share their steps)."""
    curves = np.asarray([r["test_ppl"] for r in records], dtype=np.float64)  # (runs, evals)
    se = curves.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.full(curves.shape[1], np.nan)
    return {"steps": list(records[0]["steps"]), "mean": curves.mean(axis=0).tolist(),
            "se": [_finite_or_none(x) for x in se]}


# ----------------------------------------------------------------------------- one method against the baseline

def relative_median_change(a, b):
    """(median(a) - median(b)) / median(b): negative when a has the lower median (perplexity); None if median(b) = 0."""
    mb = float(np.median(b))
    return None if mb == 0 else (float(np.median(a)) - mb) / mb


def welch_t_test(a, b):
    """Welch's t-test (unequal variances) of mean(a) vs mean(b), two-sided: {'t', 'p'}; t < 0 when a has the lower
    mean. None when a side has fewer than two runs or neither side varies."""
    if len(a) < 2 or len(b) < 2 or (_constant(a) and _constant(b)):
        return {"t": None, "p": None}
    res = stats.ttest_ind(a, b, equal_var=False)
    return {"t": _finite_or_none(res.statistic), "p": _finite_or_none(res.pvalue)}


def mann_whitney_u(a, b):
    """Mann-Whitney U test of a vs b, two-sided: {'u' (U of a), 'p'}. None when a side has fewer than two runs or
    all values are equal."""
    if len(a) < 2 or len(b) < 2 or _constant(list(a) + list(b)):
        return {"u": None, "p": None}
    res = stats.mannwhitneyu(a, b, alternative="two-sided")
    return {"u": _finite_or_none(res.statistic), "p": _finite_or_none(res.pvalue)}


def wilcoxon_signed_rank(a, b):
    """Wilcoxon signed-rank test of the paired differences a[i] - b[i], two-sided (scipy's defaults: zero differences
    dropped): {'statistic', 'p', 'n_pairs'}. None when there are fewer than two pairs or every difference is zero."""
    n = len(a)
    if n != len(b):
        raise ValueError(f"paired samples differ in length: {n} vs {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if n < 2 or not np.any(d != 0):
        return {"statistic": None, "p": None, "n_pairs": n}
    res = stats.wilcoxon(a, b)
    return {"statistic": _finite_or_none(res.statistic), "p": _finite_or_none(res.pvalue), "n_pairs": n}


def hedges_g(a, b):
    """Standardized mean difference (mean(a) - mean(b)) / pooled SD (ddof=1), times the small-sample correction
    J = 1 - 3 / (4 (n_a + n_b) - 9). Negative when a has the lower mean; None for fewer than two runs a side or a
    pooled SD of zero."""
    na, nb = len(a), len(b)
    if na < 2 or nb < 2:
        return None
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    pooled = math.sqrt(((na - 1) * a.var(ddof=1) + (nb - 1) * b.var(ddof=1)) / (na + nb - 2))
    if pooled == 0:
        return None
    return _finite_or_none((a.mean() - b.mean()) / pooled * (1 - 3 / (4 * (na + nb) - 9)))


def compare_samples(a, b, paired_a, paired_b):
    """Every comparison of method a with baseline b: unpaired tests on all runs (a, b), the signed-rank test on the
    runs present in both (paired_a[i] and paired_b[i] come from the same run index)."""
    return {"median_change": relative_median_change(a, b), "welch": welch_t_test(a, b),
            "mann_whitney": mann_whitney_u(a, b), "wilcoxon": wilcoxon_signed_rank(paired_a, paired_b),
            "hedges_g": hedges_g(a, b)}


def pair_key(record):
    """What pairs two methods' runs: the candidate stream a run drew (its fingerprint's "stream", the run's seed),
    so a run pairs only with a run that saw the same candidates; a record without one pairs by its run index."""
    stream = (record.get("fingerprint") or {}).get("stream")
    if stream is not None:
        return ("stream", stream)
    return None if record.get("run") is None else ("run", record["run"])


def runs_by_index(records, values):
    """{pairing key (``pair_key``): value} from a method's records and one value per record. Records without a
    stream or run index cannot be paired and are left out; a key given twice is an error (the pairing would be
    ambiguous)."""
    out = {}
    for record, value in zip(records, values):
        key = pair_key(record)
        if key is None:
            continue
        if key in out:
            raise ValueError(f"run {record.get('run')} of method {record.get('method')!r} appears twice")
        out[key] = value
    return out


def paired(by_run_a, by_run_b):
    """Two aligned lists over the pairing keys present in both methods, in increasing order."""
    shared = sorted(set(by_run_a) & set(by_run_b))
    return [by_run_a[r] for r in shared], [by_run_b[r] for r in shared]


# ----------------------------------------------------------------------------- all methods

IGF_METHODS = ("igf_constant", "igf_shifting")  # as igf/selection.py: the methods compared with every control
CONTROL_METHODS = ("random", "ppl", "oracle", "dsir", "dsir_validation", "source_matched", "color", "color_validation",
                   "oracle_online", "igf_refresh", "rho")
SIGNALS = ("oracle", "color", "color_validation", "oracle_online", "igf_refresh", "rho")  # each also against dsir


def contrast_pairs(methods, baseline="standard"):
    """Which (method, reference) pairs are tested: every method against the baseline, then each IGF method
    against each control (is IGF better than the control that shares its acceptance?)."""
    pairs = [(m, baseline) for m in methods if m != baseline and baseline in methods]
    pairs += [(a, b) for a in IGF_METHODS if a in methods for b in CONTROL_METHODS if b in methods]
    return pairs + [(a, "dsir") for a in SIGNALS if a in methods and "dsir" in methods]


def _final(record):
    return float(record["test_ppl"][-1])


def _auc(record):
    return area_under_curve(record["steps"], record["test_ppl"])


def _final_large(record):
    return float(record["final_test_ppl_large"])


def summaries(records):
    """(name, value function) of every per-run summary the records carry: the final and AUC test PPL, and the final
    PPL on the larger test sample (--size_final_test_set) where every run measured it."""
    out = [("final", _final), ("auc", _auc)]
    if records and all("final_test_ppl_large" in r for r in records):
        out.append(("final_large", _final_large))
    return out


def run_cost(record):
    """A run's cost from its record: LM forward-equivalents of selection and training (per run and per kept
    context), the one-off setup apart, the cumulative forward-equivalents at each evaluated step (the compute
    axis), and the same in seconds where the run's wall times were kept (else None). None for records made before
    costs were recorded."""
    cost, seconds = record.get("cost"), record.get("seconds")
    if cost is None:
        return None
    fe = np.add(cost["selection"], cost["train"])
    kept = record["batch_size"] * len(fe)
    cumulative = np.concatenate([[0.0], np.cumsum(fe)])
    out = {"fe": float(fe.sum()), "fe_per_kept": float(fe.sum()) / kept,
           "selection_fe": float(np.sum(cost["selection"])), "setup_fe": float(cost["setup"]),
           "fe_at_steps": [float(cumulative[s]) for s in record["steps"]],
           "seconds": None, "seconds_per_kept": None, "selection_seconds": None, "setup_seconds": None}
    if seconds is not None:
        total = float(np.sum(seconds["selection"]) + np.sum(seconds["train"]))
        out.update(seconds=total, seconds_per_kept=total / kept, selection_seconds=float(np.sum(seconds["selection"])),
                   setup_seconds=seconds["setup"])
    return out


FE_KEYS = ("fe", "fe_per_kept", "selection_fe", "setup_fe")
SECONDS_KEYS = ("seconds", "seconds_per_kept", "selection_seconds", "setup_seconds")


def _mean_of(costs, keys):
    values = {k: [c[k] for c in costs if c[k] is not None] for k in keys}
    return {k: float(np.mean(v)) if v else None for k, v in values.items()}


def cost_summary(records):
    """Mean LM forward-equivalents of a method's runs (``run_cost``), and the mean cumulative forward-equivalents
    at each evaluated step (the figure's compute panel); None without recorded costs. Deterministic: the wall
    times are summarized apart (``seconds_summary``), so results.json stays byte-for-byte reproducible."""
    costs = [run_cost(r) for r in records]
    if not costs or any(c is None for c in costs):
        return None
    return {**_mean_of(costs, FE_KEYS), "fe_at_steps": np.mean([c["fe_at_steps"] for c in costs], axis=0).tolist()}


def seconds_summary(records):
    """Mean wall times of a method's runs where they were kept (None values where not)."""
    costs = [run_cost(r) for r in records]
    return _mean_of([c for c in costs if c is not None], SECONDS_KEYS)


def method_summary(records):
    """Final and area-under-curve summaries, the mean +- SE curve, runs, and candidates per kept context."""
    drawn = [d for r in records for d in r["candidates_drawn"]]
    kept = sum(r["batch_size"] * len(r["candidates_drawn"]) for r in records)
    out = {"final_test_ppl": summarize([_final(r) for r in records]),
           "auc_test_ppl": summarize([_auc(r) for r in records]), "curve": curve_band(records),
           "runs": len(records), "candidates_per_kept_context": sum(drawn) / kept, "cost": cost_summary(records)}
    if any(name == "final_large" for name, _ in summaries(records)):
        out["final_test_ppl_large"] = summarize([_final_large(r) for r in records])
        out["size_final_test_set"] = records[0]["size_final_test_set"]
    return out


def compare_methods(records_by_method, baseline="standard", contrasts=None):
    """Everything the figure, the Markdown table and the README report, from the per-run records of each method.

    Returns {"baseline": name or None (when absent), "methods": {method: summaries}, "tests": {f"{a}_vs_{b}":
    {"final": comparison, "auc": comparison}}}, where "final" is the test perplexity after the last batch, "auc" the
    mean test perplexity over the run (area_under_curve), and a comparison is what compare_samples returns. The
    pairs (a, b) are ``contrasts``, by default every method against the baseline."""
    out = {"baseline": baseline if baseline in records_by_method else None, "methods": {}, "tests": {}}
    for method, records in records_by_method.items():
        out["methods"][method] = method_summary(records)
    if contrasts is None:
        contrasts = [(m, baseline) for m in records_by_method if m != baseline] if out["baseline"] else []
    for a, b in contrasts:
        tests = {}
        for key, value in summaries(records_by_method[a] + records_by_method[b]):
            va, vb = [value(r) for r in records_by_method[a]], [value(r) for r in records_by_method[b]]
            pa, pb = paired(runs_by_index(records_by_method[a], va), runs_by_index(records_by_method[b], vb))
            tests[key] = {**compare_samples(va, vb, pa, pb), "paired_mean_difference": summarize(
                np.subtract(pa, pb)) if pa else None, "lower_in_pairs": int(np.sum(np.less(pa, pb)))}
        out["tests"][f"{a}_vs_{b}"] = tests
    return out


# ----------------------------------------------------------------------------- replicated pipelines

def records_of_pipeline(records, pipeline, baseline="standard"):
    """{method: [records]} of one pipeline, from {method: {pipeline: [records]}}: its own baseline runs, or the
    ones under pipeline 0 when every pipeline shares them (--pipeline_streams shared)."""
    return {m: by_p.get(pipeline, by_p[0]) if m == baseline else by_p[pipeline] for m, by_p in records.items()
            if m == baseline or pipeline in by_p}


def one_sample_t_test(values):
    """Student's t-test of mean(values) = 0, two-sided: {'t', 'p'}; None for fewer than two values or none varying."""
    if len(values) < 2 or _constant(values):
        return {"t": None, "p": None}
    res = stats.ttest_1samp(values, 0.0)
    return {"t": _finite_or_none(res.statistic), "p": _finite_or_none(res.pvalue)}


def across_pipelines(per_pipeline, contrasts):
    """Each contrast at the level of pipelines: every pipeline's mean paired difference (a - b, final and AUC test
    PPL), their mean +- SE, a one-sample t-test over the pipelines (each pipeline one independent replicate of
    objective set, labels and learner), and how many pipelines have a lower than b."""
    out = {}
    for a, b in contrasts:
        key, entry = f"{a}_vs_{b}", {}
        for part in [p for p in ("final", "auc", "final_large") if all(p in res["tests"][key] for res in per_pipeline)]:
            means = [res["tests"][key][part]["paired_mean_difference"] for res in per_pipeline]
            diffs = [m["mean"] for m in means if m is not None]
            entry[part] = {"per_pipeline": diffs, "mean": float(np.mean(diffs)) if diffs else None,
                           "se": summarize(diffs)["se"] if diffs else None, "t_test": one_sample_t_test(diffs),
                           "lower_in_pipelines": int(np.sum(np.less(diffs, 0)))}
        out[key] = entry
    return out


def learner_spread(learners, key="exact_spearman"):
    """One learner metric across pipelines (``key``: the held-out exact-IG Spearman, or "heldout_spearman" on the
    held-out labels): each value, mean, SD (ddof 1), min and max."""
    values = [m.get(key) for m in learners if m]
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"per_pipeline": values, "mean": float(np.mean(values)), "min": min(values), "max": max(values),
            "sd": float(np.std(values, ddof=1)) if len(values) > 1 else None}


def variance_components(groups):
    """One-way random-effects split of a value measured in several groups with several draws each (a learner's
    held-out Spearman: groups = pipelines, draws = learner seeds): {"mean", "within_sd", "between_sd", "groups",
    "draws"}. Within: the pooled SD of the draws inside a group (the seed's share). Between: the SD of the group
    means that the draws' own spread does not explain, sqrt(max(0, var(means) - within^2 / draws)) (the pipeline's
    share: its objective set and labels). Balanced groups; a component that cannot be estimated is None."""
    x = np.asarray(groups, dtype=np.float64)  # (groups, draws)
    k, n = x.shape
    within = float(np.sqrt(x.var(axis=1, ddof=1).mean())) if n > 1 else None
    means = x.mean(axis=1)
    between = None
    if k > 1:
        between = float(np.sqrt(max(0.0, means.var(ddof=1) - (within ** 2 / n if within is not None else 0.0))))
    return {"mean": float(x.mean()), "within_sd": within, "between_sd": between, "groups": k, "draws": n}


def paired_difference(records, method, baseline="standard"):
    """Test PPL of ``method`` minus the baseline's at every evaluated batch, paired by candidate stream, and each
    pipeline's mean curve. With one pipeline: mean +- SE over its pairs (n = runs). With several, the pipeline is
    the replicate: mean +- SE over the pipelines' mean curves (n = pipelines), as in the across-pipeline t-test,
    since runs of one pipeline share its learner."""
    per_pipeline, rows = [], []
    for p, recs in sorted(records[method].items()):
        base = {pair_key(r): r["test_ppl"] for r in records[baseline].get(p, records[baseline][0])}
        d = [np.subtract(r["test_ppl"], base[pair_key(r)]) for r in recs if pair_key(r) in base]
        rows += d
        if d:
            per_pipeline.append(np.mean(d, axis=0).tolist())
    if not rows:
        return None
    d = np.asarray(per_pipeline if len(per_pipeline) > 1 else rows)  # (replicates, evals)
    se = d.std(axis=0, ddof=1) / math.sqrt(len(d)) if len(d) > 1 else np.full(d.shape[1], np.nan)
    return {"steps": list(records[method][min(records[method])][0]["steps"]), "mean": d.mean(axis=0).tolist(),
            "se": [_finite_or_none(x) for x in se], "n": len(d), "pairs": len(rows),
            "replicate": "pipelines" if len(per_pipeline) > 1 else "runs", "per_pipeline": per_pipeline}


def compare_all(records, learners, baseline="standard"):
    """Statistics of a whole output folder: ``records`` {method: {pipeline: [run records]}}, ``learners`` the
    learner metrics of each pipeline (or None).

    Returns {"baseline", "num_pipelines", "methods": every method's runs of all pipelines together (descriptive),
    "pipelines": [compare_methods within pipeline p, with its "learner"], "across_pipelines": each contrast over the
    pipelines, "learner_spread", "paired_difference": {method: curve vs the baseline}}; with one pipeline also
    "tests" and "learner", the pipeline's own."""
    methods = list(records)
    base = baseline if baseline in records else None
    contrasts = contrast_pairs(methods, baseline)
    k = max([len(by_p) for m, by_p in records.items() if m != baseline] or [1])
    per_pipeline = []
    for p in range(k):
        res = compare_methods(records_of_pipeline(records, p, baseline), baseline, contrasts)
        per_pipeline.append({"pipeline": p, **res, "learner": learners[p] if p < len(learners) else None})
    out = {"baseline": base, "num_pipelines": k,
           "methods": {m: method_summary([r for recs in by_p.values() for r in recs]) for m, by_p in records.items()},
           "pipelines": per_pipeline, "across_pipelines": across_pipelines(per_pipeline, contrasts),
           "learner_spread": learner_spread(learners),
           "learner_heldout_spread": learner_spread(learners, "heldout_spearman"),
           "paired_difference": {m: paired_difference(records, m, baseline) for m in methods if m != baseline}
           if base else {}}
    if k == 1:
        out.update(tests=per_pipeline[0]["tests"], learner=per_pipeline[0]["learner"])
    return out


# ----------------------------------------------------------------------------- the Markdown table

def format_p(p):
    """Three significant digits; scientific below 1e-3; 'n/a' for None."""
    if p is None:
        return "n/a"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3g}"


def _signed(x, fmt, unit=""):
    """A number with an explicit sign (the minus as the typographic '−'; none when it rounds to zero); 'n/a' for
    None."""
    if x is None:
        return "n/a"
    text = format(abs(x), fmt)
    sign = "" if float(text) == 0 else "−" if x < 0 else "+"
    return sign + text + unit


def _mean_se(s):
    return f"{s['mean']:.2f} ± {'n/a' if s['se'] is None else format(s['se'], '.2f')}"


def _r(x):
    return "n/a" if x is None else f"{x:.2f}"


def markdown_table(results, learner=None):
    """The comparison table of compare_methods' results as Markdown: one row per method (the baseline first), then
    the secondary learner's held-out correlation with exact IG (when `learner` is given: keys "exact_pearson",
    "exact_spearman", "n_exact", optionally "context_loss_spearman"), then a legend of the columns."""
    baseline = results.get("baseline")
    base_name = baseline or "standard"
    methods = list(results["methods"])
    if baseline in methods:
        methods = [baseline] + [m for m in methods if m != baseline]
    header = ["method", "final test PPL, median (mean ± SE)", f"median change vs {base_name}",
              "AUC test PPL, mean ± SE", "candidates per kept context", "Welch p (final / AUC)",
              "Mann-Whitney p (final / AUC)", "paired Wilcoxon p (final / AUC)", "Hedges' g (final / AUC)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m in methods:
        s = results["methods"][m]
        final = s["final_test_ppl"]
        row = [m, f"{final['median']:.2f} ({_mean_se(final)})", "", _mean_se(s["auc_test_ppl"]),
               f"{s['candidates_per_kept_context']:.2f}", "", "", "", ""]
        test = results.get("tests", {}).get(f"{m}_vs_{baseline}") if baseline else None
        if test is not None:
            f, a = test["final"], test["auc"]
            n_pairs = f["wilcoxon"]["n_pairs"]
            change = f["median_change"]
            row[2] = _signed(None if change is None else 100 * change, ".1f", " %")
            row[5] = f"{format_p(f['welch']['p'])} / {format_p(a['welch']['p'])}"
            row[6] = f"{format_p(f['mann_whitney']['p'])} / {format_p(a['mann_whitney']['p'])}"
            row[7] = f"{format_p(f['wilcoxon']['p'])} / {format_p(a['wilcoxon']['p'])} (n = {n_pairs})"
            row[8] = f"{_signed(f['hedges_g'], '.2f')} / {_signed(a['hedges_g'], '.2f')}"
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    if learner is not None:
        if learner.get("n_heldout"):
            low, high = learner["heldout_spearman_ci"]
            text += (f"\nSecondary learner vs {learner['n_heldout']} held-out labels: Spearman "
                     f"{_r(learner['heldout_spearman'])} (95 % CI {_r(low)} to {_r(high)}); the context's own "
                     f"pretrained loss: Spearman {_r(learner.get('heldout_context_loss_spearman'))}\n")
        n = learner.get("n_exact")
        text += (f"\nSecondary learner vs held-out exact IG (n = {'n/a' if n is None else n}): "
                 f"Pearson {_r(learner.get('exact_pearson'))}, Spearman {_r(learner.get('exact_spearman'))}")
        if learner.get("exact_spearman_ci"):
            low, high = learner["exact_spearman_ci"]
            text += f" (95 % CI {_r(low)} to {_r(high)})"
        if "context_loss_spearman" in learner:
            text += f"; the context's own pretrained loss: Spearman {_r(learner['context_loss_spearman'])}"
        text += "\n"
    text += (f"\nFinal: test perplexity (PPL) after the last batch; AUC: mean test PPL over the run (area under the "
             f"curve / span). Median change (of the final PPL): (median − median of {base_name}) / median of "
             f"{base_name}, negative = lower perplexity. Candidates per kept context: candidates drawn per context "
             f"trained on (1 = no filtering). All p-values two-sided against {base_name}: Welch's t-test (unequal "
             "variances), Mann-Whitney U, and the Wilcoxon signed-rank test over paired runs (run r of each method "
             "shares its seed and candidate stream; n = runs present in both). Hedges' g: difference of means over "
             "the pooled SD, small-sample corrected; negative = lower perplexity. n/a: undefined (too few runs, or "
             "no variation).\n")
    return text


def contrasts_table(results):
    """IGF against each control, paired within pipelines (every pipeline's pairs; one row per pipeline when there
    are several): is IGF better than the control that keeps as many candidates?"""
    keys = [k for k in results["pipelines"][0]["tests"] if not k.endswith(f"_vs_{results['baseline']}")]
    if not keys:
        return ""
    several = results["num_pipelines"] > 1
    header = ["contrast (a vs b)"] + (["pipeline"] if several else []) + [
        "final PPL median, a / b", "median change", "mean paired difference a − b ± SE", "a lower in",
        "Welch p", "paired Wilcoxon p", "Hedges' g"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key in keys:
        a, b = key.split("_vs_")
        for res in results["pipelines"]:
            t = res["tests"][key]["final"]
            d = t["paired_mean_difference"]
            row = [f"{a} vs {b}"] + ([str(res["pipeline"])] if several else []) + [
                " / ".join(f"{res['methods'][m]['final_test_ppl']['median']:.2f}" for m in (a, b)),
                _signed(None if t["median_change"] is None else 100 * t["median_change"], ".1f", " %"),
                "n/a" if d is None else f"{_signed(d['mean'], '.2f')} ± "
                                        f"{'n/a' if d['se'] is None else format(d['se'], '.2f')}",
                f"{t['lower_in_pairs']} of {t['wilcoxon']['n_pairs']} pairs", format_p(t["welch"]["p"]),
                format_p(t["wilcoxon"]["p"]), _signed(t["hedges_g"], ".2f")]
            lines.append("| " + " | ".join(row) + " |")
    return ("\n".join(lines) + "\n\nFinal test PPL; pairs share pipeline, seed and candidate stream. Median change: "
            "(median of a − median of b) / median of b.\n")


def pipelines_table(results):
    """Every contrast across replicated pipelines: one mean paired difference per pipeline, their mean ± SE and a
    t-test over the pipelines (the replicate is the whole pipeline: objective set, labels, learner)."""
    across = results["across_pipelines"]
    if not across:
        return ""
    large = next((m["size_final_test_set"] for m in results["methods"].values() if "size_final_test_set" in m), None)
    header = ["contrast (a vs b)", "final PPL median, a (all runs)", "each pipeline's mean paired difference a − b",
              "mean ± SE over pipelines", "t-test over pipelines p", "a lower in", "AUC: mean ± SE, p"]
    if large:
        header += [f"final PPL on {large} test contexts: each pipeline's", "mean ± SE, p", "a lower in"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, entry in across.items():
        a, _ = key.split("_vs_")
        f, u = entry["final"], entry["auc"]

        def mean_se(x):
            return "n/a" if x["mean"] is None else f"{_signed(x['mean'], '.2f')} ± " \
                f"{'n/a' if x['se'] is None else format(x['se'], '.2f')}"
        row = [key.replace("_vs_", " vs "), f"{results['methods'][a]['final_test_ppl']['median']:.2f}",
               ", ".join(_signed(v, ".2f") for v in f["per_pipeline"]), mean_se(f), format_p(f["t_test"]["p"]),
               f"{f['lower_in_pipelines']} of {len(f['per_pipeline'])} pipelines",
               f"{mean_se(u)}, p = {format_p(u['t_test']['p'])}"]
        if large:
            g = entry.get("final_large")
            row += ["n/a", "n/a", "n/a"] if g is None else [
                ", ".join(_signed(v, ".2f") for v in g["per_pipeline"]),
                f"{mean_se(g)}, p = {format_p(g['t_test']['p'])}",
                f"{g['lower_in_pipelines']} of {len(g['per_pipeline'])}"]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    spread = results.get("learner_heldout_spread")
    if spread:
        text += (f"\nSecondary learners vs their held-out labels, Spearman per pipeline: "
                 f"{', '.join(f'{v:.2f}' for v in spread['per_pipeline'])} (mean {spread['mean']:.2f}"
                 + (f", SD {spread['sd']:.2f}" if spread["sd"] is not None else "") + ")\n")
    spread = results.get("learner_spread")
    if spread:
        text += (f"\nSecondary learners vs held-out exact IG, Spearman per pipeline: "
                 f"{', '.join(f'{v:.2f}' for v in spread['per_pipeline'])} (mean {spread['mean']:.2f}"
                 + (f", SD {spread['sd']:.2f}" if spread["sd"] is not None else "") + ")\n")
    return text + ("\nFinal test PPL unless marked AUC. A pipeline's paired difference is the mean over its runs of "
                   "(a − b) for the same seed and candidate stream; the t-test asks whether the mean over pipelines "
                   "is 0 (two-sided, n = pipelines).\n")


def cost_table(results, records):
    """costs.md: what each method costs per run and per kept context, in LM forward-equivalents (one forward pass
    over one context = 1; a training step on B contexts = 3B) and in seconds (``records``: {method: {pipeline:
    [records]}}, whose wall times are kept apart), selection and training together, the one-off setup apart. Empty
    when the runs recorded no costs."""
    rows = [(m, s["cost"]) for m, s in results["methods"].items() if s.get("cost")]
    if not rows:
        return ""
    header = ["method", "forward-equivalents per run (of it selection)", "per kept context", "seconds per run",
              "per kept context", "one-off setup: forward-equivalents, seconds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for m, c in rows:
        t = seconds_summary([r for recs in records.get(m, {}).values() for r in recs])
        setup = "—" if not c["setup_fe"] else \
            f"{c['setup_fe']:,.0f}, " + ("n/a" if t["setup_seconds"] is None else f"{t['setup_seconds']:.0f} s")
        secs = ("n/a", "n/a") if t["seconds"] is None else (f"{t['seconds']:.1f}", f"{t['seconds_per_kept']:.3f}")
        lines.append(f"| {m} | {c['fe']:,.0f} ({c['selection_fe']:,.0f}) | {c['fe_per_kept']:.2f} | {secs[0]} | "
                     f"{secs[1]} | {setup} |")
    return ("\n".join(lines) + "\n\nMean over runs. Forward-equivalents count LM passes over one context (a training "
            "step on B contexts = 3B: a forward and a backward); test-set evaluation is the same for every method and "
            "left out. Seconds: selection and training steps, measured in the run (runs/../run_seconds/). One-off "
            "setup: IGF's labels (made by the ig_pairs stage, so no seconds here), the reference sample that sets "
            "a ranked rule's threshold, the conditional model.\n")


def markdown_tables(results):
    """results.md: one pipeline: the table against the baseline (``markdown_table``) and IGF against the
    controls; several: the across-pipelines table first, then each pipeline's tables."""
    parts = []
    if results["num_pipelines"] > 1:
        parts.append("## Across pipelines\n\n" + pipelines_table(results))
    for res in results["pipelines"]:
        title = f"## Pipeline {res['pipeline']}\n\n" if results["num_pipelines"] > 1 else ""
        parts.append(title + markdown_table(res, res.get("learner")))
    contrasts = contrasts_table(results)
    if contrasts:
        parts.append("## IGF against each control\n\n" + contrasts)
    return "\n".join(parts)
