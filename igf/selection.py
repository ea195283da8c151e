"""Which candidates a fine-tuning run keeps: IGF's rules, and the controls that tell IGF's gain apart from
filtering itself.

Run r of every method draws the training pool in the same seeded order (``candidate_stream``); a method is only
a rule that says which of the drawn candidates to keep for batch b (``keep when score >= threshold(b)``):

    standard      every candidate
    igf_constant  the secondary learner's predicted z-scored IG >= --constant_threshold
    igf_shifting  the same score >= a threshold that shifts from strict to loose (igf/thresholds.py)
    random        each candidate with probability a_b, the fraction of the pool that the matched IGF method
                  (--control_matches) keeps at batch b: IGF's cost in candidates, without its choice
    ppl           the pretrained LM's own loss on the candidate, signed by the direction in which loss tracks IG
                  on the labelled pairs; keeps the top a_b of the pool: the strongest one-number rival
    oracle        the LM's own first-order IG estimate (igf/estimators.py); keeps the top a_b of the pool: what
                  a perfect secondary learner could give, at the LM's cost per candidate
    dsir          DSIR's importance weight (igf/dsir.py: hashed unigram and bigram models of the objective set and
                  of the pool); keeps the top a_b of the pool: domain matching without a learner or an LM
    dsir_validation  the same, its target model fit on all the validation text instead of the objective set, as
                  DSIR is normally used (all the target text it has): 32-100 objective contexts leave most of
                  its hash buckets empty, and then it mostly keeps contexts made of common n-grams
    source_matched  each candidate from source s with probability a_{b,s}, the fraction of source s in the pool
                  that the matched IGF method keeps at batch b: IGF's mix of sources (works, files), but random
                  contexts within each source. Matching IGF means IGF's gain is which sources it trains on

Every score is a property of the candidate and the pretrained weights, so a run's batches are fixed before its
first step: ``select_batches`` plans them (scoring candidates a chunk at a time, as an LM forward pass does best)
and fine-tuning only trains on the plan. "Top a_b of the pool" is measured on a reference sample: the contexts
of the labelled IG pairs, a uniform sample of the pool.

The driver asks this module for everything a method's choice depends on: ``selection_inputs`` (scores,
thresholds, the matched acceptance), ``make_lm_scorers``, ``make_rule`` and ``selection_fingerprint``.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .artifacts import sha
from .dsir import dsir_scores
from .errors import IGFError
from .estimators import FirstOrderIG
from .information_gain import context_losses
from .secondary_learner import predict
from .statistics import correlations
from .thresholds import threshold_schedule

IGF_METHODS = ("igf_constant", "igf_shifting")
CONTROLS = ("random", "ppl", "oracle", "dsir", "dsir_validation", "source_matched")
REFERENCE_SIZE = 512  # labelled contexts that estimate the pool's score quantiles for ppl and oracle
LM_LOOKAHEAD = 64  # candidates an LM-scored rule scores at once (at most this many are scored and not drawn)
RANDOM_SEED_OFFSET = 7919  # random's (and source_matched's) coin flips: seeded per run, apart from the candidates


# ----------------------------------------------------------------------------- the candidate stream

def candidate_stream(pool_size, generator):
    """Pool rows in random order, endlessly: a fresh permutation for every pass over the pool."""
    while True:
        yield from torch.randperm(pool_size, generator=generator).tolist()


def scored(stream, score, chunk):
    """(row, score) in stream order; ``score(rows)`` is called on ``chunk`` rows at a time (None: all +inf)."""
    while True:
        rows = [next(stream) for _ in range(chunk)]
        values = [math.inf] * chunk if score is None else score(rows).tolist()
        yield from zip(rows, values)


def select_batch(candidates, batch_size, threshold):
    """Draw (row, score) candidates until ``batch_size`` have score >= threshold: (kept rows, candidates drawn).
    ``threshold`` is a number, or a function row -> number (a threshold per row, e.g. by its source). The caller
    guarantees some pool row passes it."""
    per_row = callable(threshold)
    kept, drawn = [], 0
    while len(kept) < batch_size:
        row, value = next(candidates)
        drawn += 1
        if value >= (threshold(row) if per_row else threshold):
            kept.append(row)
    return kept, drawn


@dataclass
class Rule:
    """How one method keeps candidates: keep a row when ``score(rows)`` >= ``threshold(batch)``."""

    score: Callable | None  # rows (list of pool indices) -> (n,) tensor, higher = more wanted; None keeps all
    threshold: Callable  # batch (0-based) -> float, or -> a function row -> float
    chunk: int = 1024  # rows scored at once


@dataclass
class Plan:
    """A run's batches, chosen before its first step."""

    batches: list  # [[pool rows kept for batch b]]
    drawn: list  # candidates drawn to fill batch b
    thresholds: list  # the threshold applied at batch b (None for standard and for a threshold per row)


def select_batches(rule, stream, batch_size, num_batches):
    """The Plan of a run: ``num_batches`` batches of ``batch_size`` kept rows from one candidate stream."""
    candidates = scored(stream, rule.score, rule.chunk)
    plan = Plan([], [], [])
    for b in range(num_batches):
        threshold = rule.threshold(b)
        kept, drawn = select_batch(candidates, batch_size, threshold)
        plan.batches.append(kept)
        plan.drawn.append(drawn)
        plan.thresholds.append(None if rule.score is None or callable(threshold) else threshold)
    return plan


# ----------------------------------------------------------------------------- pure helpers

def score_scale(scores):
    """(mean, std) of the predicted IG over the pool (population std), as the float32 values ``standardize``
    uses: the learner file records them, so the filter (igf/filter.py) puts new text on the same scale."""
    std = scores.std(unbiased=False)
    if not std > 0:
        raise IGFError("the secondary learner predicts the same IG for every training context; nothing to filter "
                       "by (collect more IG pairs or train the learner longer)")
    return scores.mean().item(), std.item()


def standardize(scores, mean, std):
    """Predicted IG on the pool's z scale: (score - pool mean) / pool std. A regression learner shrinks its
    predictions towards the mean, so on its raw scale a threshold of 1.0 can reject every context; on this scale
    a threshold t keeps the contexts predicted t standard deviations above the pool's average."""
    return (scores - mean) / std


def standardize_scores(scores):
    """Predicted IG re-standardized over the pool itself (mean 0, std 1)."""
    return standardize(scores, *score_scale(scores))


def acceptance_rate(scores, threshold):
    """Fraction of the pool whose score passes ``threshold``."""
    return (scores >= threshold).double().mean().item()


def source_acceptance(scores, sources, num_sources, threshold):
    """a_s: the fraction of each source's pool contexts whose score passes ``threshold``, (num_sources,) float64
    (0 for a source with no pool context)."""
    total = torch.bincount(sources, minlength=num_sources).double()
    passed = torch.bincount(sources[scores >= threshold], minlength=num_sources).double()
    return torch.where(total > 0, passed / total.clamp(min=1), 0.0)


def top_fraction_threshold(reference, fraction):
    """The threshold that keeps the top ``fraction`` of ``reference`` scores: its ceil(fraction * n)-th largest
    value (every value for fraction 1; +inf, nothing, for fraction 0)."""
    k = math.ceil(fraction * len(reference) - 1e-9)
    if k <= 0:
        return math.inf
    return torch.sort(torch.as_tensor(reference, dtype=torch.float64), descending=True).values[k - 1].item()


def ppl_direction(context_ppls, igs):
    """+1 when a context's own pretrained loss rises with its IG on the labelled pairs (keep high-loss
    contexts), -1 when it falls: the sign of their Spearman correlation."""
    rho = correlations(torch.as_tensor(context_ppls, dtype=torch.float64).log(), igs)["spearman"]
    return -1 if rho is not None and rho < 0 else 1  # undefined (constant input): keep high-loss contexts


# ----------------------------------------------------------------------------- the rules

@dataclass
class SelectionInputs:
    """What the rules score with, computed once per invocation at the pretrained weights."""

    pool_scores: torch.Tensor | None = None  # (N_pool,) the learner's standardized predicted IG
    thresholds: dict = field(default_factory=dict)  # IGF method -> batch -> z threshold
    acceptance: list | None = None  # batch -> fraction of the pool the matched IGF method keeps
    scorers: dict = field(default_factory=dict)  # 'ppl' / 'oracle' -> LMScorer
    dsir_scores: dict = field(default_factory=dict)  # method -> (N_pool,) DSIR log importance weights
    pool_sources: list | None = None  # pool row -> source index
    source_acceptance: list | None = None  # batch -> [a_{b,s} for every source s]


class LMScorer:
    """Scores pool rows with the pretrained LM (higher = keep); ``reference`` holds the scores of the reference
    sample, from which the pool's quantiles are read."""

    def __init__(self, score_contexts, pool, reference_rows):
        self.score_contexts, self.pool = score_contexts, pool
        self.reference = self(reference_rows)

    def __call__(self, rows):
        return torch.as_tensor(self.score_contexts(self.pool[list(rows)]), dtype=torch.float64)


def _standard(inputs, run_seed):
    return Rule(None, lambda b: -math.inf)


def _igf(method):
    def build(inputs, run_seed):
        return Rule(lambda rows: inputs.pool_scores[rows], inputs.thresholds[method])
    return build


def _random(inputs, run_seed):
    coins = torch.Generator().manual_seed(run_seed + RANDOM_SEED_OFFSET)
    # keep when u >= 1 - a_b, u ~ U[0, 1): probability a_b, independent of the candidate
    return Rule(lambda rows: torch.rand(len(rows), generator=coins, dtype=torch.float64),
                lambda b: 1.0 - inputs.acceptance[b])


def _ranked(name):
    def build(inputs, run_seed):
        scorer = inputs.scorers[name]
        return Rule(scorer, lambda b: top_fraction_threshold(scorer.reference, inputs.acceptance[b]),
                    chunk=LM_LOOKAHEAD)
    return build


def _dsir(method):
    def build(inputs, run_seed):
        scores = inputs.dsir_scores[method]  # the whole pool is scored (cheap), so its top a_b is exact
        thresholds = {a: top_fraction_threshold(scores, a) for a in set(inputs.acceptance)}
        return Rule(lambda rows: scores[rows], lambda b: thresholds[inputs.acceptance[b]])
    return build


def _source_matched(inputs, run_seed):
    # random's coins (same seed): source_matched and random differ only in the acceptance per source
    coins = torch.Generator().manual_seed(run_seed + RANDOM_SEED_OFFSET)
    source = inputs.pool_sources

    def threshold(b):
        cut = [1.0 - a for a in inputs.source_acceptance[b]]  # keep when u >= 1 - a_{b,s}: probability a_{b,s}
        return lambda row: cut[source[row]]
    return Rule(lambda rows: torch.rand(len(rows), generator=coins, dtype=torch.float64), threshold)


RULES = {"standard": _standard, "igf_constant": _igf("igf_constant"), "igf_shifting": _igf("igf_shifting"),
         "random": _random, "ppl": _ranked("ppl"), "oracle": _ranked("oracle"), "dsir": _dsir("dsir"),
         "dsir_validation": _dsir("dsir_validation"),
         "source_matched": _source_matched}


def make_rule(method, inputs, run_seed):
    """The Rule of ``method`` (a key of RULES) for the run seeded ``run_seed``."""
    return RULES[method](inputs, run_seed)


def control_settings(methods, pairs, ig_cfg):
    """What the control runs among ``methods`` depend on beyond the matched acceptance (for their fingerprints):
    cheap, so a resumed invocation can check saved runs without scoring anything."""
    settings = {}
    if "ppl" in methods:
        direction = ppl_direction([p["context_ppl"] for p in pairs["pairs"]], [p["ig"] for p in pairs["pairs"]])
        settings["ppl_direction"] = direction
    if "oracle" in methods:
        settings["oracle"] = f"first-order {ig_cfg.ig_optimizer} IG, lr {ig_cfg.ig_learning_rate}"
    return settings


def make_lm_scorers(methods, settings, model, pool, pairs, ig_cfg, objective, batch_size, device):
    """The LM scorers of the ppl and oracle controls among ``methods``, at the model's current (pretrained)
    weights, each with its reference scores on the labelled contexts."""
    reference_rows = [p["context_index"] for p in pairs["pairs"][:REFERENCE_SIZE]]
    scorers = {}
    if "ppl" in methods:
        direction = settings["ppl_direction"]
        scorers["ppl"] = LMScorer(lambda c: direction * context_losses(model, c, batch_size, device), pool,
                                  reference_rows)
    if "oracle" in methods:
        estimator = FirstOrderIG(model, ig_cfg.ig_optimizer, ig_cfg.ig_learning_rate, objective,
                                 pairs["ppl_before"], batch_size, device)

        def oracle(contexts):
            return [ig for lo in range(0, len(contexts), estimator.chunk)
                    for ig, _ in estimator(contexts[lo: lo + estimator.chunk])]
        scorers["oracle"] = LMScorer(oracle, pool, reference_rows)
    return scorers


# ----------------------------------------------------------------------------- what the driver asks for

def method_thresholds(ft, method):
    """The threshold function batch -> z of IGF method ``method`` under the fine-tuning flags ``ft``."""
    return threshold_schedule(method, ft.constant_threshold, ft.shift_schedule, ft.shift_strict, ft.shift_loose,
                              ft.shift_batches)


def check_acceptance(ft, scores, method):
    """Refuse, before any run, a threshold that would keep (almost) nothing of the pool; returns the fraction of
    the pool kept at each batch."""
    fn = method_thresholds(ft, method)
    rates = [acceptance_rate(scores, fn(b)) for b in range(ft.max_steps)]
    worst = min(range(len(rates)), key=rates.__getitem__)
    print(f"  {method}: keeps {rates[0]:.1%} of the pool at batch 1, {rates[-1]:.1%} at batch {len(rates)}",
          flush=True)
    if rates[worst] < ft.min_acceptance or rates[worst] == 0:  # 0 would draw candidates forever
        raise IGFError(f"{method} threshold {fn(worst):.3g} at batch {worst + 1} keeps {rates[worst]:.2%} of the "
                       f"training pool (minimum --min_acceptance {ft.min_acceptance}); lower it")
    return rates


def require_sources(methods, source_names, pool_sources):
    """Refuse source_matched, before any long work, where the pool's sources are unknown or only one."""
    if "source_matched" not in methods:
        return
    if pool_sources is None:
        raise IGFError("source_matched needs each context's source, and this hub dataset has none: pass "
                       "--source_column, or give --train_file a folder of files (one source each), or drop "
                       "source_matched from --methods")
    if len(torch.unique(pool_sources)) < 2:
        raise IGFError(f"source_matched needs a training pool of several sources, and every pool context comes from "
                       f"{source_names[int(pool_sources[0])]!r} (it would be the random control): give --train_file "
                       "a folder of files, or drop source_matched from --methods")


def selection_inputs(ft, ig_cfg, pool, learner, pairs, *, objective, objective_id, scale=None, sources=None,
                     num_sources=0, validation=None, validation_id=None):
    """What the selection rules of ``ft.methods`` score with, without the LM scorers (``make_lm_scorers``): the
    learner's pool scores (on the pool's z scale ``scale`` = (mean, std) when --standardize_scores), IGF's
    thresholds, the matched acceptance (overall, and per source for source_matched), DSIR's weights for the
    ``objective`` set (dsir_validation: for all the ``validation`` contexts); and the controls'
    settings (for their fingerprints, with ``objective_id``, a hash of the
    objective set the oracle and dsir score against). ``sources``: the source index of every pool row."""
    methods, inputs = ft.methods, SelectionInputs()
    if learner is None:
        return inputs, {}
    scores = predict(learner, pool)  # (N_pool,) predicted z-scored IG
    if ft.standardize_scores:
        inputs.pool_scores = standardize(scores, *(scale or score_scale(scores)))
    else:
        inputs.pool_scores = scores
    for method in IGF_METHODS:
        if method in methods or (method == ft.control_matches and set(CONTROLS) & set(methods)):
            inputs.thresholds[method] = method_thresholds(ft, method)
            rates = check_acceptance(ft, inputs.pool_scores, method)
            if method == ft.control_matches:
                inputs.acceptance = rates
    settings = control_settings(methods, pairs, ig_cfg)
    for method, target in (("dsir", objective), ("dsir_validation", validation)):
        if method in methods:
            inputs.dsir_scores[method] = torch.as_tensor(dsir_scores(pool.numpy(), target.numpy(), ft.dsir_buckets))
            settings["dsir_buckets"] = ft.dsir_buckets
    if "dsir_validation" in methods:
        settings["validation"] = validation_id
    if "source_matched" in methods:
        inputs.pool_sources = sources.tolist()
        fn, cache = method_thresholds(ft, ft.control_matches), {}
        for b in range(ft.max_steps):  # a constant threshold needs one count per source, not one per batch
            t = fn(b)
            if t not in cache:
                cache[t] = source_acceptance(inputs.pool_scores, sources, num_sources, t).tolist()
        inputs.source_acceptance = [cache[fn(b)] for b in range(ft.max_steps)]
        settings["source_acceptance"] = sha(inputs.source_acceptance)
    if set(CONTROLS) & set(methods):
        print(f"  controls keep the fraction of the pool that {ft.control_matches} keeps at each batch"
              + (f"; ppl keeps {'high' if settings['ppl_direction'] > 0 else 'low'} pretrained loss"
                 if "ppl" in settings else ""), flush=True)
    return inputs, {**settings, "acceptance": inputs.acceptance, "objective": objective_id}


def selection_fingerprint(ft, method, learner_fp, about):
    """What only the rule of ``method`` depends on (``about``: the settings from ``selection_inputs``)."""
    if method in IGF_METHODS:
        return {"learner": learner_fp, "thresholds": [method_thresholds(ft, method)(b) for b in range(ft.max_steps)]}
    if method in CONTROLS:
        selection = {"learner": learner_fp, "control_matches": ft.control_matches, "acceptance": about["acceptance"]}
        if method == "ppl":
            selection["ppl_direction"] = about["ppl_direction"]
        if method == "oracle":
            selection.update(oracle=about["oracle"], objective=about["objective"])
        if method == "dsir":
            selection.update(dsir_buckets=about["dsir_buckets"], objective=about["objective"])
        if method == "dsir_validation":
            selection.update(dsir_buckets=about["dsir_buckets"], validation=about["validation"])
        if method == "source_matched":
            selection["source_acceptance"] = about["source_acceptance"]
        return selection
    return {}
