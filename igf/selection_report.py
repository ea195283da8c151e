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
