"""The paper's Figure 1, drawn from saved results only (no model needed): left, test perplexity after each
batch, mean +- one standard error over runs; right, every run's test perplexity after the last batch."""
import matplotlib

matplotlib.use("Agg")  # files only: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

LABELS = {"standard": "standard fine-tuning", "igf_constant": "IGF, constant threshold",
          "igf_shifting": "IGF, shifting threshold"}
SHORT = {"standard": "standard", "igf_constant": "IGF\nconstant", "igf_shifting": "IGF\nshifting"}
COLORS = {"standard": "tab:gray", "igf_constant": "tab:blue", "igf_shifting": "tab:orange"}


def _p_text(p):
    return "n/a" if p is None else (f"{p:.2g}" if p >= 1e-3 else f"{p:.1e}")


def plot_results(results, records_by_method, title=""):
    """The figure (a matplotlib Figure; the caller saves it) from statistics and per-run records."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [1.6, 1]})
    for method, summary in results["methods"].items():
        band = summary["curve"]
        steps, mean = np.asarray(band["steps"]), np.asarray(band["mean"])
        se = np.asarray([np.nan if s is None else s for s in band["se"]])
        left.plot(steps, mean, color=COLORS.get(method), label=f"{LABELS.get(method, method)} (n={summary['runs']})")
        if np.isfinite(se).any():
            left.fill_between(steps, mean - se, mean + se, color=COLORS.get(method), alpha=0.25, linewidth=0)
    left.set_xlabel("batches (optimizer steps)")
    left.set_ylabel("test perplexity")
    left.set_title("test perplexity, mean ± SE over runs")
    left.legend(frameon=False)
    left.grid(alpha=0.3)

    methods = list(records_by_method)
    finals = [[r["test_ppl"][-1] for r in records_by_method[m]] for m in methods]
    right.boxplot(finals, showfliers=False, widths=0.5)
    rng = np.random.default_rng(0)  # jitter only; the values are the runs'
    for i, (m, vals) in enumerate(zip(methods, finals), start=1):
        right.scatter(i + rng.uniform(-0.12, 0.12, len(vals)), vals, s=12, color=COLORS.get(m), zorder=3)
    right.set_xticks(range(1, len(methods) + 1), [SHORT.get(m, m) for m in methods])
    steps = records_by_method[methods[0]][0]["steps"][-1]
    right.set_ylabel(f"test perplexity after batch {steps}")
    tests = results.get("tests", {})
    lines = [f"{m}: p={_p_text(tests.get(f'{m}_vs_standard', {}).get('final', {}).get('p'))}"
             for m in methods if m != "standard" and f"{m}_vs_standard" in tests]
    right.set_title("after the last batch (Welch t vs standard)\n" + "; ".join(lines), fontsize=9)
    right.grid(alpha=0.3, axis="y")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
