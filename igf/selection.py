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

from .errors import IGFError
from .estimators import FirstOrderIG
from .information_gain import context_losses
from .secondary_learner import predict
from .statistics import correlations
from .thresholds import threshold_schedule

IGF_METHODS = ("igf_constant", "igf_shifting")
CONTROLS = ("random", "ppl", "oracle")
REFERENCE_SIZE = 512  # labelled contexts that estimate the pool's score quantiles for ppl and oracle
LM_LOOKAHEAD = 64  # candidates an LM-scored rule scores at once (at most this many are scored and not drawn)
RANDOM_SEED_OFFSET = 7919  # random's coin flips: seeded per run, apart from the candidate order


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
    The caller guarantees some pool row passes the threshold."""
    kept, drawn = [], 0
    while len(kept) < batch_size:
        row, value = next(candidates)
        drawn += 1
        if value >= threshold:
            kept.append(row)
    return kept, drawn


@dataclass
class Rule:
    """How one method keeps candidates: keep a row when ``score(rows)`` >= ``threshold(batch)``."""

    score: Callable | None  # rows (list of pool indices) -> (n,) tensor, higher = more wanted; None keeps all
    threshold: Callable  # batch (0-based) -> float
    chunk: int = 1024  # rows scored at once


@dataclass
class Plan:
    """A run's batches, chosen before its first step."""

    batches: list  # [[pool rows kept for batch b]]
    drawn: list  # candidates drawn to fill batch b
    thresholds: list  # the threshold applied at batch b (None for standard)


def select_batches(rule, stream, batch_size, num_batches):
    """The Plan of a run: ``num_batches`` batches of ``batch_size`` kept rows from one candidate stream."""
    candidates = scored(stream, rule.score, rule.chunk)
    plan = Plan([], [], [])
    for b in range(num_batches):
        threshold = rule.threshold(b)
        kept, drawn = select_batch(candidates, batch_size, threshold)
        plan.batches.append(kept)
        plan.drawn.append(drawn)
        plan.thresholds.append(None if rule.score is None else threshold)
    return plan


# ----------------------------------------------------------------------------- pure helpers

def standardize_scores(scores):
    """Predicted IG re-standardized over the pool (mean 0, std 1). A regression learner shrinks its predictions
    towards the mean, so on its raw scale a threshold of 1.0 can reject every context; on this scale a threshold
    t keeps the contexts predicted t standard deviations above the pool's average."""
    std = scores.std(unbiased=False)
    if not std > 0:
        raise IGFError("the secondary learner predicts the same IG for every training context; nothing to filter "
                       "by (collect more IG pairs or train the learner longer)")
    return (scores - scores.mean()) / std


def acceptance_rate(scores, threshold):
    """Fraction of the pool whose score passes ``threshold``."""
    return (scores >= threshold).double().mean().item()


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


RULES = {"standard": _standard, "igf_constant": _igf("igf_constant"), "igf_shifting": _igf("igf_shifting"),
         "random": _random, "ppl": _ranked("ppl"), "oracle": _ranked("oracle")}


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


def selection_inputs(ft, ig_cfg, pool, learner, pairs, objective_id):
    """What the selection rules of ``ft.methods`` score with, without the LM scorers (``make_lm_scorers``): the
    learner's pool scores, IGF's thresholds, the matched acceptance; and the controls' settings (for their
    fingerprints, with ``objective_id``, a hash of the objective set the oracle scores against)."""
    methods, inputs = ft.methods, SelectionInputs()
    if learner is None:
        return inputs, {}
    scores = predict(learner, pool)  # (N_pool,) predicted z-scored IG
    inputs.pool_scores = standardize_scores(scores) if ft.standardize_scores else scores
    for method in IGF_METHODS:
        if method in methods or (method == ft.control_matches and set(CONTROLS) & set(methods)):
            inputs.thresholds[method] = method_thresholds(ft, method)
            rates = check_acceptance(ft, inputs.pool_scores, method)
            if method == ft.control_matches:
                inputs.acceptance = rates
    settings = control_settings(methods, pairs, ig_cfg)
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
        return selection
    return {}
