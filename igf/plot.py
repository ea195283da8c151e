"""The paper's Figure 1, drawn from saved results only (no model needed), with the panel the comparison is about:

    left    test perplexity after each batch, mean +- one standard error over runs (all pipelines)
    middle  the paired difference from standard fine-tuning at each batch (same seed and candidate stream),
            mean +- SE over pairs, or over the pipelines' means when there are several (thin lines: each one)
    right   every run's test perplexity after the last batch, with the tests against standard
    compute (when runs recorded their cost) mean test perplexity against the LM forward-equivalents spent so far,
            selection and training: a method that wins per step but loses per FLOP is seen as such

``plot_selection`` draws the selection report (igf/selection_report.py): the share of each source group among
the kept contexts against the pool, objective and test sets, and the kept tokens' unigram KL to the objective set.
"""
import itertools

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"standard": "standard fine-tuning", "igf_constant": "IGF, constant threshold",
          "igf_shifting": "IGF, shifting threshold", "random": "random (as many kept)",
          "ppl": "pretrained-perplexity filter", "oracle": "oracle (LM's own IG estimate)",
          "dsir": "DSIR (n-gram importance)", "dsir_validation": "DSIR fit on all validation text",
          "source_matched": "random with IGF's source mix", "color": "CoLoR-Filter (objective set)",
          "color_validation": "CoLoR-Filter (all validation text)", "oracle_online": "first-order IG at θ_t",
          "igf_refresh": "IGF, learner refreshed at θ_t (MATES)", "rho": "RHO-LOSS (online)"}
SHORT = {"standard": "standard", "igf_constant": "IGF\nconstant", "igf_shifting": "IGF\nshifting",
         "random": "random", "ppl": "PPL\nfilter", "oracle": "oracle", "dsir": "DSIR",
         "dsir_validation": "DSIR\nvalidation",
         "source_matched": "source\nmatched", "color": "CoLoR", "color_validation": "CoLoR\nvalidation",
         "oracle_online": "oracle\nonline", "igf_refresh": "IGF\nrefresh", "rho": "RHO"}
COLORS = {"standard": "tab:gray", "igf_constant": "tab:blue", "igf_shifting": "tab:orange", "random": "tab:green",
          "ppl": "tab:purple", "oracle": "tab:red", "dsir": "tab:brown", "source_matched": "tab:cyan",
          "dsir_validation": "tab:olive", "color": "darkgreen", "color_validation": "limegreen",
          "oracle_online": "darkred", "igf_refresh": "navy", "rho": "magenta"}
SPARE_COLORS = ["tab:pink", "black", "gold"]  # methods not named above, in order


def _p_text(p):
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _colors(methods):
    spare = itertools.cycle(SPARE_COLORS)
    return {m: COLORS[m] if m in COLORS else next(spare) for m in methods}


def _test_lines(results, methods):
    """One line per method compared with the baseline after the last batch: with one pipeline, Welch p and paired
    (Wilcoxon) p; with several, the t-test over pipelines of their mean paired differences."""
    baseline, lines = results.get("baseline"), []
    if not baseline:
        return baseline, lines
    for m in methods:
        key = f"{m}_vs_{baseline}"
        if results.get("num_pipelines", 1) > 1 and key in results.get("across_pipelines", {}):
            f = results["across_pipelines"][key]["final"]
            lines.append(f"{m}: t-test over {len(f['per_pipeline'])} pipelines p={_p_text(f['t_test']['p'])}, "
                         f"lower in {f['lower_in_pipelines']}")
        elif key in results.get("tests", {}):
            final = results["tests"][key]["final"]
            lines.append(f"{m}: Welch p={_p_text(final['welch']['p'])}, "
                         f"paired p={_p_text(final['wilcoxon']['p'])} (n={final['wilcoxon']['n_pairs']})")
    return baseline, lines


def _band(ax, steps, mean, se, color, label=None):
    steps, mean = np.asarray(steps), np.asarray(mean)
    se = np.asarray([np.nan if s is None else s for s in se])
    ax.plot(steps, mean, color=color, label=label)
    if np.isfinite(se).any():
        ax.fill_between(steps, mean - se, mean + se, color=color, alpha=0.2, linewidth=0)


def _title(records):
    """How the runs were made, from the runs themselves (not this invocation's flags)."""
    runs = [r for by_p in records.values() for recs in by_p.values() for r in recs]
    first = runs[0]
    counts = sorted({len(recs) for by_p in records.values() for recs in by_p.values()})
    pipelines = max(len(by_p) for by_p in records.values())
    runs_text = str(counts[0]) if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return (f"batch {first['batch_size']} x {first['context_len']} tokens, {first['steps'][-1]} batches, "
            f"{runs_text} runs per method" + (f" and pipeline, {pipelines} pipelines" if pipelines > 1 else ""))


def plot_results(results, records):
    """The figure (a matplotlib Figure; the caller saves it) from statistics and per-run records ({method:
    {pipeline: [records]}}): any number of methods, with or without the baseline (then without the middle
    panel's differences and the right panel's tests)."""
    methods = list(records)
    colors = _colors(list(dict.fromkeys(list(results["methods"]) + methods)))
    baseline, lines = _test_lines(results, methods)
    costed = {m: s for m, s in results["methods"].items() if s.get("cost")}
    widths = [1.3, 1.3, 1] + ([1.3] if costed else [])
    fig, axes = plt.subplots(1, len(widths), figsize=(5 * len(widths), 4.4 + 0.15 * len(lines)),
                             gridspec_kw={"width_ratios": widths})
    left, middle, right = axes[:3]
    for method, summary in results["methods"].items():
        band = summary["curve"]
        _band(left, band["steps"], band["mean"], band["se"], colors[method],
              f"{LABELS.get(method, method)} (n={summary['runs']})")
    left.set_xlabel("batches (optimizer steps)")
    left.set_ylabel("test perplexity")
    left.set_title("test perplexity, mean ± SE over runs")
    left.legend(frameon=False, fontsize=8 if len(results["methods"]) > 3 else 10)
    left.grid(alpha=0.3)

    for method, diff in (results.get("paired_difference") or {}).items():
        if diff is None:
            continue
        _band(middle, diff["steps"], diff["mean"], diff["se"], colors[method], LABELS.get(method, method))
        if len(diff["per_pipeline"]) > 1:
            for curve in diff["per_pipeline"]:
                middle.plot(diff["steps"], curve, color=colors[method], linewidth=0.6, alpha=0.5)
    middle.axhline(0, color=colors.get(baseline, "tab:gray"), linewidth=1)
    middle.set_xlabel("batches (optimizer steps)")
    middle.set_ylabel(f"test perplexity − {baseline or 'baseline'} (paired)")
    several = results.get("num_pipelines", 1) > 1
    middle.set_title(f"paired difference from {baseline or 'the baseline'}, mean ± SE over "
                     + ("pipelines\n(thin: each pipeline's mean)" if several else "pairs"), fontsize=10)
    middle.grid(alpha=0.3)

    finals = [[r["test_ppl"][-1] for recs in records[m].values() for r in recs] for m in methods]
    right.boxplot(finals, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # jitter only; the values are the runs'
    for i, (m, vals) in enumerate(zip(methods, finals), start=1):
        right.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, color=colors[m], zorder=3)
    right.set_xticks(range(1, len(methods) + 1), [SHORT.get(m, m) for m in methods],
                     fontsize=8 if len(methods) > 3 else 10)
    steps = next(iter(records[methods[0]].values()))[0]["steps"][-1]
    right.set_ylabel(f"test perplexity after batch {steps}")
    heading = f"after the last batch (vs {baseline})" if lines else "after the last batch"
    right.set_title("\n".join([heading] + lines), fontsize=7 if len(lines) > 2 else 9)
    right.grid(alpha=0.3, axis="y")
    if costed:  # a method that wins per step but loses per FLOP shows here
        compute = axes[3]
        for method, summary in costed.items():
            compute.plot(summary["cost"]["fe_at_steps"], summary["curve"]["mean"], marker="o", markersize=3,
                         color=colors[method], label=SHORT.get(method, method).replace("\n", " "))
        compute.set_xscale("symlog", linthresh=100)
        compute.set_xlabel("LM forward-equivalents per run (selection + training; setup apart)")
        compute.set_ylabel("test perplexity (mean over runs)")
        compute.set_title("test perplexity against compute", fontsize=10)
        compute.legend(frameon=False, fontsize=7)
        compute.grid(alpha=0.3)
    fig.suptitle(_title(records), fontsize=10)
    fig.tight_layout()
    return fig


def _bars(ax, labels, entries, colors, width=0.8, offset=0.0):
    x = np.arange(len(labels)) + offset
    means = [np.nan if e is None else e["mean"] for e in entries]
    errs = [0 if e is None or e["se"] is None else e["se"] for e in entries]
    ax.bar(x, means, width=width, yerr=errs, color=colors, capsize=3, alpha=0.85)
    return x


def plot_selection(report):
    """The selection report's figure: the share of each source group among the kept contexts (against the pool,
    objective and test sets), the kept tokens' unigram KL to the objective and test sets, and their mean
    pretrained loss; mean +- SE over runs."""
    methods = list(report["methods"])
    colors = _colors(methods)
    groups = report["groups"][:6]
    panels = 3 if groups else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4.2))
    axes = list(axes)
    ticks = [SHORT.get(m, m) for m in methods]
    if groups:
        ax = axes.pop(0)
        width = 0.8 / len(groups)
        sets = report["sets"]
        for i, g in enumerate(groups):
            offset = (i - (len(groups) - 1) / 2) * width
            x = _bars(ax, methods, [report["methods"][m].get("groups", {}).get(g) for m in methods],
                      [colors[m] for m in methods], width=width * 0.9, offset=offset)
            for xi in x:
                ax.text(xi, 0.01, g, rotation=90, fontsize=6, ha="center", va="bottom", color="white")
        style = {"pool": "-", "test set": ":", "objective sets (mean)": "--"}
        first = groups[0]
        objective = [o["groups"].get(first, 0.0) for o in sets["objective"] if o["groups"]]
        lines = (("pool", sets["pool"]["groups"].get(first)), ("test set", sets["test"]["groups"].get(first)),
                 ("objective sets (mean)", float(np.mean(objective)) if objective else None))
        for label, value in lines:
            if value is not None:
                ax.axhline(value, color="black", linestyle=style[label], linewidth=1, label=f"{label}: {first}")
        ax.set_xticks(range(len(methods)), ticks, fontsize=8)
        ax.set_ylabel("share of kept contexts")
        ax.set_title("kept contexts by source group", fontsize=10)
        ax.legend(frameon=False, fontsize=7)
        ax.grid(alpha=0.3, axis="y")
    # means with error bars, not bars from zero: the differences between methods are a few percent. The KL to
    # each target is drawn relative to standard's (when it ran), so the two targets share one axis.
    ax = axes.pop(0)
    base = report["methods"].get("standard")
    for i, (key, marker) in enumerate((("kl_objective", "o"), ("kl_test", "s"))):
        ref = base[key]["mean"] if base and base[key] else 0.0
        for j, m in enumerate(methods):
            e = report["methods"][m][key]
            if e is not None:
                ax.errorbar(j + (i - 0.5) * 0.25, e["mean"] - ref, yerr=e["se"] or 0, fmt=marker, color=colors[m],
                            capsize=3)
    if base:
        ax.axhline(0, color="tab:gray", linewidth=1)
    ax.set_xticks(range(len(methods)), ticks, fontsize=8)
    ax.set_ylabel("unigram KL(target ‖ kept), nats" + (" − standard's" if base else ""))
    ax.set_title("how far the kept tokens are from the targets\n(circles: objective set, squares: test set)",
                 fontsize=10)
    ax.grid(alpha=0.3)
    ax = axes.pop(0)
    for j, m in enumerate(methods):
        e = report["methods"][m]["pretrained_loss"]
        if e is not None:
            ax.errorbar(j, e["mean"], yerr=e["se"] or 0, fmt="o", color=colors[m], capsize=3)
    ax.set_xticks(range(len(methods)), ticks, fontsize=8)
    ax.set_ylabel("mean pretrained loss, nats / token")
    ax.set_title("how hard the kept contexts are for the pretrained LM", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
