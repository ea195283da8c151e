"""Statistics over seeded runs: mean +- standard error per step, final and area-under-curve summaries, and
Welch's t-test (unequal variances) of every IGF method against standard fine-tuning."""
import math

import numpy as np
from scipy import stats


def _finite_or_none(x):
    return float(x) if x is not None and math.isfinite(x) else None


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


def welch_t_test(a, b):
    """Welch's t-test of mean(a) vs mean(b): {'t', 'p'} (None when a side has fewer than two runs)."""
    if len(a) < 2 or len(b) < 2:
        return {"t": None, "p": None}
    res = stats.ttest_ind(a, b, equal_var=False)
    return {"t": _finite_or_none(res.statistic), "p": _finite_or_none(res.pvalue)}


def curve_band(records):
    """Per evaluated step: mean and standard error of test perplexity over runs (records share their steps)."""
    curves = np.asarray([r["test_ppl"] for r in records], dtype=np.float64)  # (runs, evals)
    se = curves.std(axis=0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.full(curves.shape[1], np.nan)
    return {"steps": list(records[0]["steps"]), "mean": curves.mean(axis=0).tolist(),
            "se": [_finite_or_none(x) for x in se]}


def compare_methods(records_by_method, baseline="standard"):
    """Everything the figure and the README report, from the per-run records of each method."""
    out = {"methods": {}, "tests": {}}
    finals, aucs = {}, {}
    for method, records in records_by_method.items():
        finals[method] = [r["test_ppl"][-1] for r in records]
        aucs[method] = [area_under_curve(r["steps"], r["test_ppl"]) for r in records]
        drawn = [d for r in records for d in r["candidates_drawn"]]
        kept = sum(r["batch_size"] * len(r["candidates_drawn"]) for r in records)
        out["methods"][method] = {"final_test_ppl": summarize(finals[method]), "auc_test_ppl": summarize(aucs[method]),
                                  "curve": curve_band(records), "runs": len(records),
                                  "candidates_per_kept_context": sum(drawn) / kept}
    if baseline in records_by_method:
        for method in records_by_method:
            if method != baseline:
                out["tests"][f"{method}_vs_{baseline}"] = {
                    "final": welch_t_test(finals[method], finals[baseline]),
                    "auc": welch_t_test(aucs[method], aucs[baseline])}
    return out
