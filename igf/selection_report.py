"""The selection report: what each method kept, and how it differs from the pool, the objective set and the test set.

IGF may win by domain reweighting (training on the sources that look like the objective set) or by picking better
contexts within each source. The report measures, per method and run, from the run records alone:

    source shares        the fraction of kept contexts from each source (a work, a file), and per group (the part
                         of a source's name before "/", e.g. the corpus 'kjv'), against the pool, the objective
                         sets and the test set
    unigram KL           KL(target || kept): how far the kept tokens' unigram distribution is from the objective
                         set's and the test set's (nats); the kept distribution is smoothed with a Dirichlet prior
                         of KL_PRIOR_TOKENS pseudo-tokens centred on the pool's add-one unigram distribution
    pretrained loss      the mean next-token loss (nats) of the kept contexts under the pretrained LM
    overlap              the fraction of a run's kept contexts that igf_constant's run of the same pipeline and
                         seed also kept (they draw from the same candidate stream)
    candidates per kept  candidates drawn per context trained on

and, per source, which sources a method favours and avoids: its share of kept contexts over the source's share of
the pool (the lift). The ingredients are recorded while a run's batches are planned (``kept_facts``) and in
``contexts.json`` (``contexts_summary``), so ``--plot_only`` redraws the report without a model.
"""

import numpy as np

from .statistics import summarize

KL_PRIOR_TOKENS = 1000  # Dirichlet prior strength (pseudo-tokens) of the kept unigram distribution
MIN_POOL_SHARE = 0.005  # sources below this share of the pool are left out of the favoured / avoided lists
TOP_SOURCES = 5  # favoured and avoided sources listed per method


# ----------------------------------------------------------------------------- what runs record

def unigram_counts(tokens):
    """{token id (str, as JSON keys are): count} of every token in ``tokens`` (any shape)."""
    ids, counts = np.unique(np.asarray(tokens).reshape(-1), return_counts=True)
    return {str(int(i)): int(c) for i, c in zip(ids, counts)}


def source_counts(source_ids, num_sources):
    """[count of source s for every s] of a list of source indices."""
    return np.bincount(np.asarray(source_ids, dtype=np.int64), minlength=num_sources).tolist()


def contexts_summary(sets, objectives, vocab_size):
    """What kept contexts are compared with: source names, the LM's vocabulary size, and the pool's, test set's
    and each objective set's source counts and unigram counts. ``objectives``: [(objective contexts, their rows
    in sets.validation)] per pipeline."""
    n = len(sets.source_names)
    known = sets.sources is not None

    def describe(contexts, sources):
        return {"n": len(contexts), "unigrams": unigram_counts(contexts.numpy()),
                "sources": source_counts(sources.numpy(), n) if known else None}
    return {"source_names": list(sets.source_names), "vocab_size": vocab_size,
            "pool": describe(sets.train, sets.sources["train"] if known else None),
            "test": describe(sets.test, sets.sources["test"] if known else None),
            "objective": [describe(obj, sets.sources["validation"][rows] if known else None)
                          for obj, rows in objectives]}


def loss_sample(n_kept, size):
    """Positions (in kept order) of an evenly spaced sample of at most ``size`` of ``n_kept`` kept contexts."""
    if size <= 0 or n_kept == 0:
        return []
    if size >= n_kept:
        return list(range(n_kept))
    return sorted({int(round(i * (n_kept - 1) / (size - 1))) for i in range(size)}) if size > 1 else [0]


def kept_facts(batches, pool, pool_sources, losses, sample):
    """The report's per-run record of a plan's kept contexts: their sources (per batch), their tokens' unigram
    counts, and the pretrained loss of the ``sample`` positions (``losses``: pool row -> loss)."""
    rows = [r for batch in batches for r in batch]
    facts = {"kept_unigrams": unigram_counts(pool[rows].numpy()),
             "kept_loss_index": list(sample), "kept_loss": [losses[rows[i]] for i in sample]}
    if pool_sources is not None:
        facts["kept_sources"] = [[int(pool_sources[r]) for r in batch] for batch in batches]
    return facts


# ----------------------------------------------------------------------------- the measures (pure)

def source_group(name):
    """The group of a source: the part of its name before the first "/" (a corpus), else the name itself."""
    return name.split("/", 1)[0]


def pool_unigram(contexts):
    """The pool's add-one smoothed unigram distribution over the LM's vocabulary: (V,) float64."""
    v = contexts["vocab_size"]
    counts = np.zeros(v, dtype=np.float64)
    for token, c in contexts["pool"]["unigrams"].items():
        counts[int(token)] = c
    return (counts + 1) / (counts.sum() + v)


def unigram_kl(target, kept, prior, prior_tokens=KL_PRIOR_TOKENS):
    """KL(p_target || q_kept) in nats: p_target the empirical unigram distribution of ``target`` ({token: count}),
    q_kept that of ``kept`` smoothed with a Dirichlet prior: q(v) = (c_kept(v) + m * prior(v)) / (N_kept + m)."""
    tokens = np.fromiter((int(t) for t in target), dtype=np.int64, count=len(target))
    p = np.fromiter(target.values(), dtype=np.float64, count=len(target))
    p /= p.sum()
    c = np.fromiter((kept.get(str(t), 0) for t in tokens), dtype=np.float64, count=len(tokens))
    q = (c + prior_tokens * prior[tokens]) / (sum(kept.values()) + prior_tokens)
    return float(np.sum(p * np.log(p / q)))


def overlap(kept_rows, reference_rows):
    """The fraction of the kept rows (all batches) that the reference run also kept."""
    a = [r for batch in kept_rows for r in batch]
    b = {r for batch in reference_rows for r in batch}
    return sum(r in b for r in a) / len(a)


def _mean_se(values):
    """Mean, SE and n of the values that are known (None when none is)."""
    v = [x for x in values if x is not None]
    if not v:
        return None
    s = summarize(v)
    return {key: s[key] for key in ("mean", "se", "n")}


def _replicate_mean_se(keyed):
    """Mean, SE and n with the pipeline as the replicate: ``keyed`` [(pipeline, value)] of every run. With several
    pipelines, each pipeline's mean over its runs, then mean +- SE over the pipelines (n = pipelines), so opposite
    shifts of two pipelines stay visible in the SE; with one, over its runs (n = runs)."""
    by_pipeline = {}
    for p, v in keyed:
        if v is not None:
            by_pipeline.setdefault(p, []).append(v)
    if len(by_pipeline) > 1:
        return _mean_se([float(np.mean(v)) for v in by_pipeline.values()])
    return _mean_se([v for values in by_pipeline.values() for v in values])


def _shares(counts, names):
    """({source: share}, {group: share}) of source counts (None when unknown)."""
    if counts is None:
        return None, None
    total = sum(counts) or 1
    by_source = {n: c / total for n, c in zip(names, counts) if c}
    by_group = {}
    for n, c in zip(names, counts):
        by_group[source_group(n)] = by_group.get(source_group(n), 0.0) + c / total
    return by_source, by_group


# ----------------------------------------------------------------------------- the report

def selection_report(records, contexts, reference="igf_constant", baseline="standard"):
    """What every method kept: ``records`` {method: {pipeline: [run records]}} (the baseline's under pipeline 0,
    shared by all pipelines), ``contexts`` the comparison sets (``contexts_summary``). Measures are per run, then
    mean +- SE with the pipeline as the replicate (``_replicate_mean_se``: over the pipelines' means when a method
    has several pipelines, else over its runs). A baseline run shared by all pipelines (--pipeline_streams shared)
    counts once, its objective-set KL and its overlap averaged over the pipelines."""
    names = contexts["source_names"]
    known = contexts["pool"]["sources"] is not None
    prior = pool_unigram(contexts)
    k = max(len(by_p) for m, by_p in records.items() if m != baseline) if any(
        m != baseline for m in records) else 1
    pool_grp = _shares(contexts["pool"]["sources"], names)[1]
    test_grp = _shares(contexts["test"]["sources"], names)[1]
    objective = [_shares(o["sources"], names) for o in contexts["objective"][:k]]
    report = {"source_names": names, "groups": sorted({source_group(n) for n in names}) if known else [],
              "reference": reference if reference in records else None, "kl_prior_tokens": KL_PRIOR_TOKENS,
              "sets": {"pool": {"groups": pool_grp, "n": contexts["pool"]["n"]},
                       "test": {"groups": test_grp, "n": contexts["test"]["n"]},
                       "objective": [{"groups": g, "n": o["n"]}
                                     for (_, g), o in zip(objective, contexts["objective"])]},
              "methods": {}}
    for method, by_p in records.items():
        rows = {"kl_objective": [], "kl_test": [], "pretrained_loss": [], "overlap": [], "candidates": []}
        group_shares, kept_counts, by_pipeline = [], np.zeros(len(names)), {}
        # (run, the pipelines it is compared in): shared baseline runs once, against every pipeline's sets
        shared = method == baseline and set(by_p) == {0}
        runs = [(r, list(range(k))) for r in by_p.get(0, [])] if shared else \
            [(r, [p]) for p in range(k) for r in by_p.get(p, [])]
        for r, pipes in runs:
            rep = pipes[0] if len(pipes) == 1 else "shared"  # the replicate this run belongs to
            refs = [{x["run"]: x for x in records.get(reference, {}).get(p, [])}.get(r["run"]) for p in pipes]
            if "kept_unigrams" in r:
                rows["kl_objective"].append((rep, float(np.mean([
                    unigram_kl(contexts["objective"][p]["unigrams"], r["kept_unigrams"], prior) for p in pipes]))))
                rows["kl_test"].append((rep, unigram_kl(contexts["test"]["unigrams"], r["kept_unigrams"], prior)))
            rows["pretrained_loss"].append((rep, float(np.mean(r["kept_loss"])) if r.get("kept_loss") else None))
            if method != reference and all(refs):
                rows["overlap"].append((rep, float(np.mean([overlap(r["kept_rows"], x["kept_rows"]) for x in refs]))))
            rows["candidates"].append((rep, sum(r["candidates_drawn"]) /
                                       (r["batch_size"] * len(r["candidates_drawn"]))))
            if known and "kept_sources" in r:
                counts = source_counts([s for batch in r["kept_sources"] for s in batch], len(names))
                group_shares.append((rep, _shares(counts, names)[1]))
                kept_counts += counts
                for p in pipes:
                    by_pipeline.setdefault(p, []).append(group_shares[-1][1])
        entry = {key: _replicate_mean_se(values) for key, values in rows.items()}
        entry["replicate"] = "pipelines" if len({k for k, _ in rows["candidates"]}) > 1 else "runs"
        if group_shares:
            entry["groups"] = {g: _replicate_mean_se([(k, s.get(g, 0.0)) for k, s in group_shares])
                               for g in report["groups"]}
            entry["groups_by_pipeline"] = [{g: _mean_se([s.get(g, 0.0) for s in by_pipeline[p]])
                                            for g in report["groups"]} for p in sorted(by_pipeline)]
            entry["sources"] = _lifts(kept_counts, contexts["pool"]["sources"], names)
        report["methods"][method] = entry
    return report


def _lifts(kept_counts, pool_counts, names):
    """Per source: share of the kept contexts, share of the pool, and their ratio (the lift); the sources with at
    least MIN_POOL_SHARE of the pool, most favoured first, and the TOP_SOURCES favoured and avoided."""
    kept_total, pool_total = kept_counts.sum(), sum(pool_counts)
    rows = []
    for name, kept, pool in zip(names, kept_counts, pool_counts):
        if pool / pool_total >= MIN_POOL_SHARE:
            rows.append({"source": name, "kept_share": kept / kept_total, "pool_share": pool / pool_total,
                         "lift": (kept / kept_total) / (pool / pool_total)})
    rows.sort(key=lambda r: -r["lift"])
    return {"all": rows, "favoured": rows[:TOP_SOURCES], "avoided": rows[::-1][:TOP_SOURCES]}


def _fmt(x, digits=3, percent=False):
    if x is None:
        return "n/a"
    scale, unit = (100, " %") if percent else (1, "")
    se = "" if x["se"] is None else f" ± {x['se'] * scale:.{digits}f}"
    return f"{x['mean'] * scale:.{digits}f}{se}{unit}"


def selection_markdown(report):
    """selection.md: one row per method (then the pool, objective and test sets), and per method the sources it
    favours and avoids."""
    groups = report["groups"][:6]
    header = ["method"] + [f"{g} share" for g in groups] + [
        "unigram KL to objective (nats)", "unigram KL to test (nats)", "pretrained loss of kept (nats/token)",
        f"overlap with {report['reference'] or 'reference'}", "candidates per kept"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, e in report["methods"].items():
        row = [method] + [_fmt(e.get("groups", {}).get(g), 1, percent=True) for g in groups] + [
            _fmt(e["kl_objective"]), _fmt(e["kl_test"]), _fmt(e["pretrained_loss"]), _fmt(e["overlap"], 2),
            _fmt(e["candidates"], 2)]
        lines.append("| " + " | ".join(row) + " |")
    sets = report["sets"]
    ref_rows = [("pool", [sets["pool"]["groups"]]), ("test set", [sets["test"]["groups"]]),
                ("objective sets", [o["groups"] for o in sets["objective"]])]
    for label, shares in ref_rows:
        if groups and all(s is not None for s in shares):
            cells = [" / ".join(f"{100 * s.get(g, 0.0):.1f} %" for s in shares) for g in groups]
            lines.append("| " + " | ".join([f"*{label}*"] + cells + [""] * 5) + " |")
    text = "\n".join(lines) + "\n"
    replicate = ("over the pipelines (each pipeline's mean over its runs), the pipeline being the replicate"
                 if any(e.get("replicate") == "pipelines" for e in report["methods"].values()) else "over runs")
    text += (f"\nShares: fraction of kept contexts per source group. Every cell is mean ± SE {replicate}; the "
             f"objective sets' row lists each pipeline's. Unigram KL: KL(target ‖ kept tokens), the kept distribution "
             f"smoothed with a Dirichlet prior of {report['kl_prior_tokens']} pseudo-tokens centred on the pool's "
             f"add-one unigram distribution; lower = closer. "
             + (f"Overlap: fraction of a run's kept contexts that {report['reference']} kept in the same pipeline "
                "and seed.\n" if report["reference"] else "Overlap: n/a, igf_constant was not run.\n"))
    several = [(m, e["groups_by_pipeline"]) for m, e in report["methods"].items()
               if len(e.get("groups_by_pipeline", [])) > 1]
    if several and groups:
        g = groups[0]
        k = len(several[0][1])
        text += (f"\n| {g} share of kept contexts | " + " | ".join(f"pipeline {p}" for p in range(k)) + " |\n|"
                 + "---|" * (k + 1) + "\n")
        text += "".join(f"| {m} | " + " | ".join(_fmt(x.get(g), 1, percent=True) for x in by_p) + " |\n"
                        for m, by_p in several)
        objective = [o["groups"] for o in sets["objective"]]
        if all(objective):
            text += "| *objective set* | " + " | ".join(f"{100 * o.get(g, 0.0):.1f} %" for o in objective) + " |\n"
    lifted = [(m, e["sources"]) for m, e in report["methods"].items() if "sources" in e]
    if lifted:
        text += "\n| method | favours (kept share / pool share) | avoids |\n|---|---|---|\n"
        for m, s in lifted:
            cell = lambda rows: ", ".join(f"{r['source']} ×{r['lift']:.2f}" for r in rows)  # noqa: E731
            text += f"| {m} | {cell(s['favoured'])} | {cell(s['avoided'])} |\n"
        text += (f"\nLift: a source's share of all kept contexts over its share of the pool, for sources with at "
                 f"least {100 * MIN_POOL_SHARE:.1f} % of the pool.\n")
    return text
