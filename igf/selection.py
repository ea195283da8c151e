"""Which candidates a fine-tuning run keeps: IGF's rules, the controls that tell IGF's gain apart from filtering
itself, and the rules that select with the model as it is.

Run r of every method draws the training pool in the same seeded order (``candidate_stream``); a method is only
a rule that says which of the drawn candidates to keep for batch b (``keep when score >= threshold(b)``, or, for a
rule with a window, ``keep the top batch_size of the next window(b) candidates``):

    standard      every candidate
    igf_constant  the secondary learner's predicted z-scored IG >= --constant_threshold
    igf_shifting  the same score >= a threshold that shifts from strict to loose (igf/thresholds.py)
    random        each candidate with probability a_b, the fraction of the pool that the matched IGF method
                  (--control_matches) keeps at batch b: IGF's cost in candidates, without its choice
    ppl           the pretrained LM's own loss on the candidate, signed by the direction in which loss tracks IG
                  on the labelled pairs; keeps the top a_b of the pool: the strongest one-number rival
    oracle        the LM's own first-order IG estimate (igf/estimators.py); keeps the top a_b of the pool: what
                  a perfect static secondary learner could give, at the LM's cost per candidate
    dsir          DSIR's importance weight (igf/dsir.py: hashed unigram and bigram models of the objective set and
                  of the pool); keeps the top a_b of the pool: domain matching without a learner or an LM
    dsir_validation  the same, its target model fit on all the validation text instead of the objective set, as
                  DSIR is normally used (all the target text it has): 32-100 objective contexts leave most of
                  its hash buckets empty, and then it mostly keeps contexts made of common n-grams
    source_matched  each candidate from source s with probability a_{b,s}, the fraction of source s in the pool
                  that the matched IGF method keeps at batch b: IGF's mix of sources (works, files), but random
                  contexts within each source. Matching IGF means IGF's gain is which sources it trains on
    color         CoLoR-Filter: the candidate's loss under the pretrained LM minus its loss under a copy of the LM
                  fine-tuned on the objective set (the conditional model, igf/finetune.py); keeps the top a_b of
                  the pool. The many-step version of the first-order IG label
    color_validation  the same, the conditional model fine-tuned on all the validation text (as dsir_validation)
  online (they score with the model at step t, so each batch is picked when it is due):
    oracle_online first-order IG at the current weights: every --online_refresh_every steps the objective gradient
                  is recomputed at theta_t; each batch keeps the top batch_size of a window of ceil(batch_size /
                  a_b) candidates (IGF's acceptance)
    igf_refresh   MATES: every --online_refresh_every steps, --refresh_labels fresh pool contexts are labelled with
                  first-order IG at theta_t and the run's copy of the learner ensemble trains on them (warm start);
                  the next batches keep what the refreshed learner scores >= --constant_threshold on the pool's
                  re-standardized scale (before the first refresh it is igf_constant)
    rho           RHO-LOSS: the candidate's loss under the current model minus under color's conditional model;
                  keeps the top batch_size of each window, as oracle_online

With ``--keep_fraction f`` the rules of ``FIXED_FRACTION`` keep the top f of the pool (a window of
ceil(batch_size / f)) at every batch instead of IGF's acceptance a_b, and then need no secondary learner (ppl and
oracle still read the IG labels; the others need none): RHO-LOSS, CoLoR-Filter or DSIR on their own.
source_matched (IGF's mix of sources) is refused with it; igf_refresh keeps IGF's threshold as ever.

Every static score is a property of the candidate and the pretrained weights, so a static run's batches are fixed
before its first step: ``select_batches`` plans them (scoring candidates a chunk at a time, as an LM forward pass
does best). An online rule's ``OnlineSelection`` picks batch b only when the run reaches it. Both give the
fine-tuning loop the same thing (``next(b)`` -> rows, and a ``Plan`` of what was drawn, kept, scored and what it
cost), so the loop never learns a method's name. "Top a_b of the pool" is measured on a reference sample: the
contexts of the labelled IG pairs, a uniform sample of the pool.

The driver asks this module for everything a method's choice depends on: ``selection_inputs`` (scores,
thresholds, the matched acceptance), ``attach_model`` (what needs the LM), ``make_rule``, ``make_selection`` and
``selection_fingerprint``.
"""
import math
import time
from collections.abc import Callable
from copy import deepcopy
from dataclasses import dataclass, field

import torch

from .artifacts import sha
from .dsir import dsir_scores
from .errors import IGFError
from .estimators import CurrentIG, FirstOrderIG
from .finetune import conditional_model
from .information_gain import context_losses, zscore
from .secondary_learner import predict, train_learner
from .statistics import correlations
from .thresholds import acceptance_rate, standardize, threshold_schedule

IGF_METHODS = ("igf_constant", "igf_shifting")
CONTROLS = ("random", "ppl", "oracle", "dsir", "dsir_validation", "source_matched", "color", "color_validation",
            "oracle_online", "igf_refresh", "rho")  # every rule that keeps IGF's acceptance
ONLINE = ("oracle_online", "igf_refresh", "rho")  # they score with the model at step t
# the rules that --keep_fraction sets free of IGF's acceptance, and so of the learner; of them only these read labels
FIXED_FRACTION = ("random", "ppl", "oracle", "dsir", "dsir_validation", "color", "color_validation",
                  "oracle_online", "rho")
READS_LABELS = ("ppl", "oracle")  # ppl's direction, oracle's objective perplexity before the step
CONDITIONAL = {"color": "objective", "color_validation": "validation", "rho": "objective"}  # what each tunes on
REFERENCE_SIZE = 512  # pool contexts (the first the IG labels take) that give ppl, oracle and color their quantiles
LM_LOOKAHEAD = 64  # candidates an LM-scored rule scores at once (at most this many are scored and not drawn)
RANDOM_SEED_OFFSET = 7919  # random's (and source_matched's) coin flips: seeded per run, apart from the candidates
REFRESH_SEED_OFFSET = 104729  # igf_refresh: which pool contexts each refresh labels, and the learner's shuffles
CONDITIONAL_SEED_OFFSET = 15485863  # the conditional model's batches (per pipeline, not per run: runs share it)
SCALE_SAMPLE = 8192  # pool contexts whose predicted IG re-standardizes a refreshed learner (the pool's z scale)
ONLINE_CHUNK = 64  # candidates an online threshold rule scores at once (leftovers are scored again next batch)


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


def needs_learner(ft):
    """Whether the methods of ``ft`` need a secondary learner (and so its IG labels): IGF does, and so does every
    control that keeps IGF's acceptance, unless --keep_fraction sets the fraction it keeps."""
    return any(m in IGF_METHODS or (m in CONTROLS and (ft.keep_fraction is None or m not in FIXED_FRACTION))
               for m in ft.methods)


def needs_labels(ft):
    """Whether the methods of ``ft`` need the IG labels: for the learner, or for ppl and oracle themselves."""
    return needs_learner(ft) or any(m in READS_LABELS for m in ft.methods)


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
    """How one method keeps candidates: keep a row when ``score(rows)`` >= ``threshold(batch)``, or, with a
    ``window``, the top batch_size of the next ``window(batch)`` candidates."""

    score: Callable | None  # rows (list of pool indices) -> (n,) tensor, higher = more wanted; None keeps all
    threshold: Callable | None = None  # batch (0-based) -> float, or -> a function row -> float
    chunk: int = 1024  # rows scored at once
    fe_per_context: float = 0.0  # LM forward-equivalents per scored candidate (the compute accounting)
    online: bool = False  # scores with the model as it is at batch b: picked when the batch is due, never planned
    window: Callable | None = None  # batch -> candidates drawn, of which the top batch_size are kept
    prepare: Callable | None = None  # batch -> LM forward-equivalents spent fitting the scores to the model now
    log: list | None = None  # what the rule did while the run went on (igf_refresh's refreshes), for the record
    setup: dict = field(default_factory=lambda: {"forward_equivalents": 0.0, "seconds": 0.0})  # one-off cost


@dataclass
class Plan:
    """A run's batches, what was drawn for each, and what choosing them cost. A Plan made before the first step is
    its own selection (``next``); an ``OnlineSelection`` fills one as the run goes."""

    batches: list  # [[pool rows kept for batch b]]
    drawn: list  # candidates drawn to fill batch b
    thresholds: list  # the threshold applied at batch b (None for standard, a threshold per row, or a window)
    selection_fe: list = field(default_factory=list)  # LM forward-equivalents spent choosing batch b
    selection_seconds: list = field(default_factory=list)  # seconds spent choosing batch b
    setup: dict = field(default_factory=lambda: {"forward_equivalents": 0.0, "seconds": 0.0})  # one-off, per rule
    scores: list | None = None  # online rules: [[row, score] of every candidate drawn for batch b]
    refreshes: list | None = None  # igf_refresh: one entry per refresh

    @property
    def plan(self):
        return self

    def next(self, b):
        return self.batches[b]

    def extras(self):
        """The online rules' record of what they scored and refreshed."""
        return {k: v for k, v in (("scores", self.scores), ("refreshes", self.refreshes)) if v is not None}


class Meter:
    """LM forward-equivalents and seconds spent in a rule's score calls."""

    def __init__(self):
        self.fe, self.seconds = 0.0, 0.0

    def wrap(self, score, fe_per_context):
        if score is None:
            return None

        def metered(rows):
            t = time.perf_counter()
            out = score(rows)
            self.seconds += time.perf_counter() - t
            self.fe += fe_per_context * len(rows)
            return out
        return metered


def top_of_window(rows, values, batch_size):
    """The ``batch_size`` rows of highest value (ties: the earlier drawn), in the order they were drawn."""
    order = sorted(range(len(rows)), key=lambda i: (-values[i], i))[:batch_size]
    return [rows[i] for i in sorted(order)]


def select_batches(rule, stream, batch_size, num_batches):
    """The Plan of a run made before its first step: ``num_batches`` batches of ``batch_size`` kept rows from one
    candidate stream (a static rule: its scores do not depend on the model being trained)."""
    if rule.online or rule.window is not None:  # windows are the online rules' (they score at theta_t)
        raise ValueError("an online rule picks each batch when it is due (OnlineSelection), not before the run")
    meter = Meter()
    candidates = scored(stream, meter.wrap(rule.score, rule.fe_per_context), rule.chunk)
    plan = Plan([], [], [], setup=dict(rule.setup))
    for b in range(num_batches):
        fe, seconds = meter.fe, meter.seconds
        threshold = rule.threshold(b)
        kept, drawn = select_batch(candidates, batch_size, threshold)
        plan.batches.append(kept)
        plan.drawn.append(drawn)
        plan.thresholds.append(None if rule.score is None or callable(threshold) else threshold)
        plan.selection_fe.append(meter.fe - fe)
        plan.selection_seconds.append(meter.seconds - seconds)
    return plan


class OnlineSelection:
    """An online rule's batches, each picked when the run reaches it, from the next candidates of the run's own
    seeded stream (so it pairs with standard's run of the same seed) and with the model as it is then.

    Before batch b the rule's ``prepare(b)`` fits its scores to the model (a refresh, when one is due); then a window
    rule scores the next ``window(b)`` candidates and keeps the top batch_size, a threshold rule scores candidates
    ``ONLINE_CHUNK`` at a time until batch_size pass. Candidates scored but not drawn for batch b are scored again
    for b + 1 (the model has moved). ``plan`` records every drawn candidate's score and what each batch cost."""

    def __init__(self, rule, stream, batch_size):
        self.rule, self.stream, self.batch_size = rule, stream, batch_size
        self.meter = Meter()
        self.score = self.meter.wrap(rule.score, rule.fe_per_context)
        self.leftover = []  # rows drawn from the stream and scored for an earlier batch, not yet used
        self.plan = Plan([], [], [], setup=dict(rule.setup), scores=[],
                         refreshes=rule.log if rule.log is not None else None)

    def next(self, b):
        rule, fe, seconds = self.rule, self.meter.fe, self.meter.seconds
        if rule.prepare is not None:
            t = time.perf_counter()
            self.meter.fe += rule.prepare(b)
            self.meter.seconds += time.perf_counter() - t
        if rule.window is not None:
            rows = [next(self.stream) for _ in range(rule.window(b))]
            values = self.score(rows).tolist()
            kept, threshold = top_of_window(rows, values, self.batch_size), None
        else:
            threshold, rows, values, kept = rule.threshold(b), [], [], []
            queue = self.leftover
            scores, i = (self.score(queue).tolist() if queue else []), 0  # at the weights the model has now
            while len(kept) < self.batch_size:
                if i == len(queue):
                    queue = [next(self.stream) for _ in range(ONLINE_CHUNK)]
                    scores, i = self.score(queue).tolist(), 0
                rows.append(queue[i])
                values.append(scores[i])
                if scores[i] >= threshold:
                    kept.append(queue[i])
                i += 1
            self.leftover = queue[i:]
        plan = self.plan
        plan.batches.append(kept)
        plan.drawn.append(len(rows))
        plan.thresholds.append(threshold)
        plan.scores.append([[r, v] for r, v in zip(rows, values)])
        plan.selection_fe.append(self.meter.fe - fe)
        plan.selection_seconds.append(self.meter.seconds - seconds)
        return kept


def make_selection(rule, stream, batch_size, num_batches):
    """What a run trains on: a Plan made now (static rules), or an OnlineSelection (rules that see the model)."""
    return OnlineSelection(rule, stream, batch_size) if rule.online else \
        select_batches(rule, stream, batch_size, num_batches)


# ----------------------------------------------------------------------------- pure helpers

def score_scale(scores):
    """(mean, std) of the predicted IG over the pool (population std), as the float32 values ``standardize``
    uses: the learner file records them, so the filter (igf/filter.py) puts new text on the same scale."""
    std = scores.std(unbiased=False)
    if not std > 0:
        raise IGFError("the secondary learner predicts the same IG for every training context; nothing to filter "
                       "by (collect more IG pairs or train the learner longer)")
    return scores.mean().item(), std.item()


def standardize_scores(scores):
    """Predicted IG re-standardized over the pool itself (mean 0, std 1)."""
    return standardize(scores, *score_scale(scores))


def source_acceptance(scores, sources, num_sources, threshold):
    """a_s: the fraction of each source's pool contexts whose score passes ``threshold``, (num_sources,) float64
    (0 for a source with no pool context)."""
    total = torch.bincount(sources, minlength=num_sources).double()
    passed = torch.bincount(sources[scores >= threshold], minlength=num_sources).double()
    return torch.where(total > 0, passed / total.clamp(min=1), 0.0)


def top_fraction_threshold(reference, fraction):
    """The threshold that keeps the top ``fraction`` of ``reference`` scores: its ceil(fraction * n)-th largest
    value (-inf, everything, for fraction 1, also a candidate scored below the whole reference sample; +inf,
    nothing, for fraction 0)."""
    k = math.ceil(fraction * len(reference) - 1e-9)
    if k <= 0:
        return math.inf
    if fraction >= 1:  # all of the pool, not only down to the reference sample's lowest score
        return -math.inf
    return torch.sort(torch.as_tensor(reference, dtype=torch.float64), descending=True).values[k - 1].item()


def ppl_direction(context_ppls, igs):
    """+1 when a context's own pretrained loss rises with its IG on the labelled pairs (keep high-loss
    contexts), -1 when it falls: the sign of their Spearman correlation."""
    rho = correlations(torch.as_tensor(context_ppls, dtype=torch.float64).log(), igs)["spearman"]
    return -1 if rho is not None and rho < 0 else 1  # undefined (constant input): keep high-loss contexts


# ----------------------------------------------------------------------------- the rules

@dataclass
class ModelContext:
    """What the rules that need the LM score with: the model (pretrained before a run, at theta_t during one), the
    pool and objective set, and the online settings."""

    model: object
    pool: torch.Tensor  # (N_pool, T)
    objective: torch.Tensor  # (N_obj, T) the pipeline's objective set
    device: object
    batch_size: int  # contexts per LM forward pass
    run_batch_size: int  # contexts per fine-tuning batch (a window keeps this many)
    ig_learning_rate: float  # the first-order IG step (as the labels')
    refresh_every: int  # --online_refresh_every
    refresh_labels: int  # --refresh_labels
    refresh_epochs: int  # --refresh_epochs
    learner_cfg: object  # LearnerConfig: how the refreshed learner trains (as the pipeline's)


@dataclass
class SelectionInputs:
    """What the rules score with, computed once per invocation at the pretrained weights."""

    pool_scores: torch.Tensor | None = None  # (N_pool,) the learner's standardized predicted IG
    thresholds: dict = field(default_factory=dict)  # IGF method -> batch -> z threshold
    acceptance: list | None = None  # batch -> fraction of the pool the matched IGF method keeps
    scorers: dict = field(default_factory=dict)  # 'ppl' / 'oracle' / 'color' / ... -> LMScorer
    dsir_scores: dict = field(default_factory=dict)  # method -> (N_pool,) DSIR log importance weights
    pool_sources: list | None = None  # pool row -> source index
    source_acceptance: list | None = None  # batch -> [a_{b,s} for every source s]
    learner: object = None  # the pipeline's secondary learner (igf_refresh copies it per run)
    scale_rows: torch.Tensor | None = None  # pool rows that re-standardize a refreshed learner
    lm: ModelContext | None = None  # set by attach_model for the rules that need the LM
    conditional: dict = field(default_factory=dict)  # 'objective' / 'validation' -> (conditional model, setup cost)
    setup: dict = field(default_factory=dict)  # method -> its one-off cost {"forward_equivalents", "seconds"}


class LMScorer:
    """Scores pool rows with the pretrained LM (higher = keep); ``reference`` holds the scores of the reference
    sample, from which the pool's quantiles are read. ``fe_per_context``: LM forward-equivalents per context."""

    def __init__(self, score_contexts, pool, reference_rows, fe_per_context):
        self.score_contexts, self.pool, self.fe_per_context = score_contexts, pool, fe_per_context
        self.reference = self(reference_rows)

    def __call__(self, rows):
        return torch.as_tensor(self.score_contexts(self.pool[list(rows)]), dtype=torch.float64)


def objective_gradient_fe(objective):
    """LM forward-equivalents of g_obj: a forward and a backward pass over the objective set."""
    return 3.0 * len(objective)


def label_fe(ig_cfg, n_labels, n_objective):
    """LM forward-equivalents of ``n_labels`` IG labels: first-order SGD, two forward passes each after one g_obj;
    first-order Adam, a forward and backward each; exact, the step and an objective-set pass each."""
    if ig_cfg.ig_estimator == "exact":
        return n_labels * (3.0 + n_objective)
    per_label = 2.0 if ig_cfg.ig_optimizer == "sgd" else 3.0
    return n_labels * per_label + 3.0 * n_objective


def window_size(inputs, b):
    """Candidates an online window draws for batch b: as many as IGF draws on average at its acceptance a_b."""
    return math.ceil(inputs.lm.run_batch_size / inputs.acceptance[b] - 1e-9)


def _standard(inputs, run_seed):
    return Rule(None, lambda b: -math.inf)


def _igf(method):
    def build(inputs, run_seed):
        return Rule(lambda rows: inputs.pool_scores[rows], inputs.thresholds[method],
                    setup=dict(inputs.setup["learner"]))
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
                    chunk=LM_LOOKAHEAD, fe_per_context=scorer.fe_per_context, setup=dict(inputs.setup[name]))
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


def _oracle_online(inputs, run_seed):
    lm = inputs.lm
    ig = CurrentIG(lm.model, lm.ig_learning_rate, lm.objective, lm.batch_size, lm.device)

    def prepare(b):  # g_obj at theta_t every k steps; between, the current weights with the last g_obj
        if b % lm.refresh_every:
            return 0.0
        ig.refresh()
        return objective_gradient_fe(lm.objective)
    return Rule(lambda rows: ig(lm.pool[rows]), online=True, window=lambda b: window_size(inputs, b),
                prepare=prepare, fe_per_context=2.0)


def _igf_refresh(inputs, run_seed):
    lm, ln = inputs.lm, inputs.lm.learner_cfg
    learner = deepcopy(inputs.learner)  # this run's own copy: the pipeline's learner stays as it was trained
    ig = CurrentIG(lm.model, lm.ig_learning_rate, lm.objective, lm.batch_size, lm.device)
    g = torch.Generator().manual_seed(run_seed + REFRESH_SEED_OFFSET)
    current = {"score": lambda rows: inputs.pool_scores[rows]}  # igf_constant's scores until the first refresh
    log = []

    def prepare(b):
        if b == 0 or b % lm.refresh_every:
            return 0.0
        t = time.perf_counter()
        nll = ig.refresh()
        rows = torch.randperm(len(lm.pool), generator=g)[: lm.refresh_labels]  # fresh pool contexts
        tokens = lm.pool[rows]
        labels = ig(tokens)  # first-order IG at theta_t (one weight save for all of them; forwards in batches)
        z = torch.tensor(zscore(labels.tolist())[0], dtype=torch.float32)
        metrics = train_learner(learner, tokens, z, ln.learner_val_fraction, lm.refresh_epochs,
                                ln.learner_learning_rate, ln.learner_batch_size, g,
                                weight_decay=ln.learner_weight_decay)  # warm start: continues from its weights
        tables = learner.token_tables()
        mean, std = score_scale(predict(learner, lm.pool[inputs.scale_rows], tables=tables))
        current["score"] = lambda rows: standardize(predict(learner, lm.pool[rows], tables=tables), mean, std)
        log.append({"batch": b, "labelled_rows": rows.tolist(), "labels": labels.tolist(),
                    "objective_ppl": math.exp(nll), "val_spearman": metrics["val_spearman"],
                    "best_epoch": metrics["best_epoch"], "scale": [mean, std], "seconds": time.perf_counter() - t})
        return objective_gradient_fe(lm.objective) + 2.0 * len(rows)
    return Rule(lambda rows: current["score"](rows), inputs.thresholds["igf_constant"], online=True,
                prepare=prepare, log=log, setup=dict(inputs.setup["learner"]))


def _rho(inputs, run_seed):
    lm = inputs.lm
    conditional, _ = inputs.conditional["objective"]

    def score(rows):  # the current model's loss minus the conditional model's (its "irreducible" loss)
        x = lm.pool[rows]
        return context_losses(lm.model, x, lm.batch_size, lm.device) - \
            context_losses(conditional, x, lm.batch_size, lm.device)
    return Rule(score, online=True, window=lambda b: window_size(inputs, b), fe_per_context=2.0,
                setup=dict(inputs.setup["rho"]))


RULES = {"standard": _standard, "igf_constant": _igf("igf_constant"), "igf_shifting": _igf("igf_shifting"),
         "random": _random, "ppl": _ranked("ppl"), "oracle": _ranked("oracle"), "dsir": _dsir("dsir"),
         "dsir_validation": _dsir("dsir_validation"), "source_matched": _source_matched,
         "color": _ranked("color"), "color_validation": _ranked("color_validation"),
         "oracle_online": _oracle_online, "igf_refresh": _igf_refresh, "rho": _rho}


def make_rule(method, inputs, run_seed):
    """The Rule of ``method`` (a key of RULES) for the run seeded ``run_seed``. An online rule holds the model
    itself, so build it just before its run, at the pretrained weights."""
    return RULES[method](inputs, run_seed)


def control_settings(methods, pairs, ig_cfg, ft, learner_cfg):
    """What the control runs among ``methods`` depend on beyond the matched acceptance (for their fingerprints):
    cheap, so a resumed invocation can check saved runs without scoring anything."""
    settings = {}
    if "ppl" in methods:
        direction = ppl_direction([p["context_ppl"] for p in pairs["pairs"]], [p["ig"] for p in pairs["pairs"]])
        settings["ppl_direction"] = direction
    if "oracle" in methods:
        settings["oracle"] = f"first-order {ig_cfg.ig_optimizer} IG, lr {ig_cfg.ig_learning_rate}"
    if {"oracle_online", "igf_refresh"} & set(methods):
        settings["online"] = {"ig": f"first-order sgd IG at theta_t, lr {ig_cfg.ig_learning_rate}",
                              "refresh_every": ft.online_refresh_every}
    if "igf_refresh" in methods:
        settings["refresh"] = {"labels": ft.refresh_labels, "epochs": ft.refresh_epochs,
                               "scale_sample": SCALE_SAMPLE, "learner": vars(learner_cfg)}
    if set(CONDITIONAL) & set(methods):
        settings["conditional"] = {"steps": ft.color_steps, "learning_rate": ft.color_learning_rate,
                                   "batch_size": ft.batch_size}
    return settings


def attach_model(inputs, methods, settings, model, pool, pairs, *, ig_cfg, ft, learner_cfg, objective, validation,
                 batch_size, device, seed, reference_rows=None):
    """Everything the rules of ``methods`` need from the LM, built at the model's current (pretrained) weights:
    the scorers of the static LM rules (ppl, oracle, color, color_validation) with their reference scores on
    ``reference_rows`` (default: the labelled contexts, a uniform sample of the pool), the conditional models (color,
    color_validation, rho) and the context of the online rules. Each method's one-off cost goes to ``inputs.setup``."""
    if reference_rows is None:
        reference_rows = [p["context_index"] for p in pairs["pairs"][:REFERENCE_SIZE]]
    lm = inputs.lm = ModelContext(model, pool, objective, device, batch_size, ft.batch_size, ig_cfg.ig_learning_rate,
                                  ft.online_refresh_every, ft.refresh_labels, ft.refresh_epochs, learner_cfg)

    def scorer(name, score, fe_per_context, setup_fe=0.0):
        t = time.perf_counter()
        inputs.scorers[name] = LMScorer(score, pool, reference_rows, fe_per_context)
        inputs.setup[name] = {"forward_equivalents": setup_fe + fe_per_context * len(reference_rows),
                              "seconds": time.perf_counter() - t}

    for target in sorted({CONDITIONAL[m] for m in methods if m in CONDITIONAL}):
        t = time.perf_counter()
        contexts = objective if target == "objective" else validation
        conditional, fe = conditional_model(model, contexts, ft.color_steps, ft.color_learning_rate, ft.batch_size,
                                            seed + CONDITIONAL_SEED_OFFSET, device)
        inputs.conditional[target] = conditional, {"forward_equivalents": fe, "seconds": time.perf_counter() - t}
    if "ppl" in methods:
        direction = settings["ppl_direction"]
        scorer("ppl", lambda c: direction * context_losses(model, c, batch_size, device), 1.0)
    if "oracle" in methods:
        t = time.perf_counter()
        estimator = FirstOrderIG(model, ig_cfg.ig_optimizer, ig_cfg.ig_learning_rate, objective,
                                 pairs["ppl_before"], batch_size, device)
        gradient_seconds = time.perf_counter() - t

        def oracle(contexts):
            return [ig for lo in range(0, len(contexts), estimator.chunk)
                    for ig, _ in estimator(contexts[lo: lo + estimator.chunk])]
        scorer("oracle", oracle, 2.0 if ig_cfg.ig_optimizer == "sgd" else 3.0, objective_gradient_fe(objective))
        inputs.setup["oracle"]["seconds"] += gradient_seconds
    for method in ("color", "color_validation"):
        if method in methods:
            conditional, cost = inputs.conditional[CONDITIONAL[method]]

            def color(contexts, conditional=conditional):  # loss under the prior model - under the conditional
                return context_losses(model, contexts, batch_size, device) - \
                    context_losses(conditional, contexts, batch_size, device)
            scorer(method, color, 2.0, cost["forward_equivalents"])
            inputs.setup[method]["seconds"] += cost["seconds"]
    if "rho" in methods:
        inputs.setup["rho"] = dict(inputs.conditional["objective"][1])
    return lm


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
                     num_sources=0, validation=None, validation_id=None, learner_cfg=None):
    """What the selection rules of ``ft.methods`` score with, without what needs the LM (``attach_model``): the
    learner's pool scores (on the pool's z scale ``scale`` = (mean, std) when --standardize_scores), IGF's
    thresholds, the matched acceptance (overall, and per source for source_matched), DSIR's weights for the
    ``objective`` set (dsir_validation: for all the ``validation`` contexts); and the controls'
    settings (for their fingerprints, with ``objective_id``, a hash of the
    objective set the oracle and dsir score against). ``sources``: the source index of every pool row."""
    methods, inputs = ft.methods, SelectionInputs()
    if ft.keep_fraction is not None:  # the same fraction at every batch, matched to no IGF method
        inputs.acceptance = [ft.keep_fraction] * ft.max_steps
    if learner is None:
        return inputs, _settings(inputs, ft, ig_cfg, pairs, learner_cfg, objective, objective_id, pool, validation,
                                 validation_id) if inputs.acceptance else {}
    scores = predict(learner, pool)  # (N_pool,) predicted z-scored IG
    if ft.standardize_scores:
        inputs.pool_scores = standardize(scores, *(scale or score_scale(scores)))
    else:
        inputs.pool_scores = scores
    inputs.learner = learner
    # the learner's labels, IGF's one-off cost (made by the ig_pairs stage, maybe in another invocation: no seconds)
    inputs.setup["learner"] = {"forward_equivalents": label_fe(ig_cfg, len(pairs["pairs"]), len(objective)),
                               "seconds": None}
    if "igf_refresh" in methods:
        g = torch.Generator().manual_seed(REFRESH_SEED_OFFSET)  # one sample for every run and pipeline
        inputs.scale_rows = torch.randperm(len(pool), generator=g)[:SCALE_SAMPLE]
    for method in IGF_METHODS:
        matched = method == ft.control_matches and ft.keep_fraction is None
        if method in methods or (matched and set(CONTROLS) & set(methods)) or \
                (method == "igf_constant" and "igf_refresh" in methods):  # igf_refresh keeps IGF's threshold
            inputs.thresholds[method] = method_thresholds(ft, method)
            rates = check_acceptance(ft, inputs.pool_scores, method)
            if matched:
                inputs.acceptance = rates
    if "source_matched" in methods:
        inputs.pool_sources = sources.tolist()
        fn, cache = method_thresholds(ft, ft.control_matches), {}
        for b in range(ft.max_steps):  # a constant threshold needs one count per source, not one per batch
            t = fn(b)
            if t not in cache:
                cache[t] = source_acceptance(inputs.pool_scores, sources, num_sources, t).tolist()
        inputs.source_acceptance = [cache[fn(b)] for b in range(ft.max_steps)]
    return inputs, _settings(inputs, ft, ig_cfg, pairs, learner_cfg, objective, objective_id, pool, validation,
                             validation_id)


def _settings(inputs, ft, ig_cfg, pairs, learner_cfg, objective, objective_id, pool, validation, validation_id):
    """The controls' settings (for their fingerprints; DSIR's weights go into ``inputs``)."""
    methods = ft.methods
    settings = control_settings(methods, pairs, ig_cfg, ft, learner_cfg)
    for method, target in (("dsir", objective), ("dsir_validation", validation)):
        if method in methods:
            inputs.dsir_scores[method] = torch.as_tensor(dsir_scores(pool.numpy(), target.numpy(), ft.dsir_buckets))
            settings["dsir_buckets"] = ft.dsir_buckets
    if {"dsir_validation", "color_validation"} & set(methods):
        settings["validation"] = validation_id
    if "source_matched" in methods:
        settings["source_acceptance"] = sha(inputs.source_acceptance)
    if set(CONTROLS) & set(methods):
        print((f"  controls keep {ft.keep_fraction:g} of the pool at every batch (--keep_fraction)"
               if ft.keep_fraction is not None else
               f"  controls keep the fraction of the pool that {ft.control_matches} keeps at each batch")
              + (f"; ppl keeps {'high' if settings['ppl_direction'] > 0 else 'low'} pretrained loss"
                 if "ppl" in settings else ""), flush=True)
    return {**settings, "acceptance": inputs.acceptance, "objective": objective_id}


def selection_fingerprint(ft, method, learner_fp, about):
    """What only the rule of ``method`` depends on (``about``: the settings from ``selection_inputs``)."""
    if method in IGF_METHODS:
        return {"learner": learner_fp, "thresholds": [method_thresholds(ft, method)(b) for b in range(ft.max_steps)]}
    if method in CONTROLS:
        if ft.keep_fraction is None or method not in FIXED_FRACTION:
            selection = {"learner": learner_fp, "control_matches": ft.control_matches,
                         "acceptance": about["acceptance"]}
        else:  # a fixed fraction: its runs do not depend on whether (or which) learner was trained
            selection = {"keep_fraction": ft.keep_fraction, "acceptance": about["acceptance"]}
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
        if method in ("oracle_online", "igf_refresh"):
            selection.update(online=about["online"], objective=about["objective"])
        if method == "igf_refresh":
            selection.update(refresh=about["refresh"], thresholds=[method_thresholds(ft, "igf_constant")(b)
                                                                   for b in range(ft.max_steps)])
        if method in CONDITIONAL:
            selection.update(conditional=about["conditional"], objective=about["objective"])
        if method == "color_validation":
            selection["validation"] = about["validation"]
        return selection
    return {}
