"""The paper's Figure 1, drawn from saved results only (no model needed): left, test perplexity after each
batch, mean +- one standard error over runs; right, every run's test perplexity after the last batch."""
import itertools

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"standard": "standard fine-tuning", "igf_constant": "IGF, constant threshold",
          "igf_shifting": "IGF, shifting threshold", "random": "random at IGF's acceptance",
          "ppl": "pretrained-perplexity filter", "oracle": "oracle (LM's own IG estimate)"}
SHORT = {"standard": "standard", "igf_constant": "IGF\nconstant", "igf_shifting": "IGF\nshifting",
         "random": "random", "ppl": "PPL\nfilter", "oracle": "oracle"}
COLORS = {"standard": "tab:gray", "igf_constant": "tab:blue", "igf_shifting": "tab:orange", "random": "tab:green",
          "ppl": "tab:purple", "oracle": "tab:red"}
SPARE_COLORS = ["tab:brown", "tab:pink", "tab:olive", "tab:cyan"]  # methods not named above, in order


def _p_text(p):
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def _colors(methods):
    spare = itertools.cycle(SPARE_COLORS)
    return {m: COLORS[m] if m in COLORS else next(spare) for m in methods}


def _test_lines(results, methods):
    """One line per method compared with the baseline: Welch p and paired (Wilcoxon) p after the last batch."""
    baseline, tests, lines = results.get("baseline"), results.get("tests", {}), []
    for m in methods:
        final = tests.get(f"{m}_vs_{baseline}", {}).get("final") if baseline else None
        if final is not None:
            lines.append(f"{m}: Welch p={_p_text(final['welch']['p'])}, "
                         f"paired p={_p_text(final['wilcoxon']['p'])} (n={final['wilcoxon']['n_pairs']})")
    return baseline, lines


def plot_results(results, records_by_method, title=""):
    """The figure (a matplotlib Figure; the caller saves it) from statistics and per-run records: any number of
    methods, with or without the baseline (then the right panel shows no tests)."""
    methods = list(records_by_method)
    colors = _colors(list(dict.fromkeys(list(results["methods"]) + methods)))
    baseline, lines = _test_lines(results, methods)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2 + 0.15 * len(lines)),
                                      gridspec_kw={"width_ratios": [1.6, 1]})
    for method, summary in results["methods"].items():
        band = summary["curve"]
        steps, mean = np.asarray(band["steps"]), np.asarray(band["mean"])
        se = np.asarray([np.nan if s is None else s for s in band["se"]])
        left.plot(steps, mean, color=colors[method], label=f"{LABELS.get(method, method)} (n={summary['runs']})")
        if np.isfinite(se).any():
            left.fill_between(steps, mean - se, mean + se, color=colors[method], alpha=0.2, linewidth=0)
    left.set_xlabel("batches (optimizer steps)")
    left.set_ylabel("test perplexity")
    left.set_title("test perplexity, mean ± SE over runs")
    left.legend(frameon=False, fontsize=8 if len(results["methods"]) > 3 else 10)
    left.grid(alpha=0.3)

    finals = [[r["test_ppl"][-1] for r in records_by_method[m]] for m in methods]
    right.boxplot(finals, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # jitter only; the values are the runs'
    for i, (m, vals) in enumerate(zip(methods, finals), start=1):
        right.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, color=colors[m], zorder=3)
    right.set_xticks(range(1, len(methods) + 1), [SHORT.get(m, m) for m in methods],
                     fontsize=8 if len(methods) > 3 else 10)
    steps = records_by_method[methods[0]][0]["steps"][-1]
    right.set_ylabel(f"test perplexity after batch {steps}")
    heading = f"after the last batch (vs {baseline}; paired: Wilcoxon over runs)" if lines else "after the last batch"
    right.set_title("\n".join([heading] + lines), fontsize=8 if len(lines) > 2 else 9)
    right.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
