"""Estimators of the information gain IG(X) of training contexts (the equation itself is in information_gain.py).

    exact        take the optimizer step on X, measure the objective set, restore the weights. ~1 s per context
                 for SmolLM2-135M on a 2-core CPU; the reference every other estimate is checked against.
    first_order  IG(X) ~ -PPL_obj * dL_obj, with dL_obj the first-order change of the objective loss under the
                 step on X:
                   sgd   step -lr g_X                   ->  IG ~ PPL_obj * lr * <g_obj, g_X>
                   adam  first step -lr g_X/(|g_X|+eps)  ->  IG ~ PPL_obj * lr * <g_obj, g_X/(|g_X|+eps)>
                 (g_obj = gradient of the mean objective-set NLL, g_X = gradient of X's mean NLL, both at the
                 pretrained weights; a fresh Adam's first step is exactly lr g/(|g|+eps) per weight).
                 The SGD form needs no per-context backward: <g_obj, g_X> is the directional derivative of L_X
                 along g_obj, so one step of the objective itself, theta - lr g_obj, serves every context:
                   IG ~ PPL_obj * (L_X(theta) - L_X(theta - lr g_obj))
                 two batched forward passes per chunk of contexts. The Adam form needs g_X itself: one backward
                 per context.

An estimator is built once per collection (``make_estimator``) and called on chunks of contexts; it returns,
for each context, (IG, the context's own pretrained perplexity). ``collect_ig_pairs`` drives any estimator and
checkpoints, so an interrupted collection resumes with exactly the pairs an uninterrupted one gives.
``ig_statistics`` summarises the labels and how the estimator tracks exact IG on the validation pairs.
"""
import math

import torch
from tqdm.auto import tqdm

from .errors import IGFError
from .information_gain import (
    WeightSnapshot,
    context_losses,
    information_gain,
    lm_loss,
    make_ig_optimizer,
    perplexity,
    reset_state,
    safe_exp,
    token_nlls,
)
from .statistics import correlations

ADAM_EPS = 1e-8  # torch.optim.Adam's default eps, which make_ig_optimizer keeps


class ExactIG:
    """IG(X) by definition: one optimizer step on X alone, objective perplexity after it, bit-exact restore."""

    chunk = 1  # contexts per call

    def __init__(self, model, optimizer_name, lr, objective, ppl_before, batch_size, device):
        self.model, self.objective, self.ppl_before = model, objective, ppl_before
        self.batch_size, self.device = batch_size, device
        self.optimizer = make_ig_optimizer(optimizer_name, model.parameters(), lr)
        self.snapshot = WeightSnapshot(model)

    def __call__(self, contexts):
        """contexts (1, T) -> [(IG, context PPL)]. The step is taken in eval mode: gradients flow as usual, but
        dropout is off, so IG(X) is a property of X and the pretrained weights, not of a dropout mask."""
        (x,) = contexts
        self.model.eval()
        self.optimizer.zero_grad(set_to_none=False)  # in place: the gradient buffers are reused, not re-allocated
        loss = lm_loss(self.model, x.unsqueeze(0).to(self.device))  # (1, T) -> scalar
        loss.backward()
        self.optimizer.step()
        ppl_after = perplexity(self.model, self.objective, self.batch_size, self.device)
        self.snapshot.restore()
        reset_state(self.optimizer)
        return [(information_gain(self.ppl_before, ppl_after), safe_exp(loss.item()))]


def objective_gradient(model, objective, batch_size, device, with_loss=False):
    """g_obj: gradient of the objective set's mean next-token NLL (over all its tokens), one tensor per parameter
    (``with_loss``: and that mean NLL, float64, from the same forward passes)."""
    was_training = model.training
    model.eval()
    model.zero_grad(set_to_none=True)
    n_tokens = objective.shape[0] * (objective.shape[1] - 1)
    total = 0.0
    for chunk in objective.split(batch_size):
        loss = token_nlls(model, chunk.to(device)).sum() / n_tokens
        loss.backward()  # accumulates the mean's gradient
        total += loss.double().item()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return (grads, total) if with_loss else grads


@torch.no_grad()
def sgd_first_order(model, params, g_obj, lr, ppl_obj, contexts, batch_size, device, restore):
    """(IG ~ PPL_obj * (L_X(theta) - L_X(theta - lr g_obj)), L_X(theta)) for contexts (n, T), both (n,) float64:
    two batched forward passes around the objective's own SGD step; ``restore()`` copies the weights back."""
    before = context_losses(model, contexts, batch_size, device)  # (n,) float64
    torch._foreach_add_(params, g_obj, alpha=-lr)  # the objective's own SGD step
    after = context_losses(model, contexts, batch_size, device)
    restore()  # bit-exact, rather than adding the step back
    return ppl_obj * (before - after), before


class FirstOrderIG:
    """IG(X) to first order in the step (module docstring): the SGD form batched, the Adam form per context."""

    def __init__(self, model, optimizer_name, lr, objective, ppl_before, batch_size, device):
        if optimizer_name not in ("sgd", "adam"):
            raise IGFError(f"unknown --ig_optimizer {optimizer_name!r}")
        self.model, self.kind, self.lr, self.ppl_before = model, optimizer_name, lr, ppl_before
        self.batch_size, self.device = batch_size, device
        self.chunk = batch_size if optimizer_name == "sgd" else 1
        self.g_obj = objective_gradient(model, objective, batch_size, device)
        self.params = list(model.parameters())
        if optimizer_name == "sgd":
            self.snapshot = WeightSnapshot(model)
        else:
            self.scratch = [torch.empty_like(p) for p in self.params]  # reused for g_X/(|g_X|+eps)

    def __call__(self, contexts):
        return self._sgd(contexts) if self.kind == "sgd" else self._adam(contexts)

    def _sgd(self, contexts):
        """contexts (n, T): IG ~ PPL_obj * (L_X(theta) - L_X(theta - lr g_obj)), two batched forwards."""
        ig, before = sgd_first_order(self.model, self.params, self.g_obj, self.lr, self.ppl_before, contexts,
                                     self.batch_size, self.device, self.snapshot.restore)
        return [(i, safe_exp(b)) for i, b in zip(ig.tolist(), before.tolist())]

    def _adam(self, contexts):
        """contexts (1, T): IG ~ PPL_obj * lr * <g_obj, g_X / (|g_X| + eps)>, one backward on X."""
        (x,) = contexts
        self.model.eval()
        self.model.zero_grad(set_to_none=False)
        loss = lm_loss(self.model, x.unsqueeze(0).to(self.device))
        loss.backward()
        dot = torch.zeros((), dtype=torch.float64, device=self.g_obj[0].device)  # summed on the device: one sync
        with torch.no_grad():
            for p, g, s in zip(self.params, self.g_obj, self.scratch):
                torch.abs(p.grad, out=s).add_(ADAM_EPS)
                torch.div(p.grad, s, out=s)  # the fresh-Adam step direction, in [-1, 1]
                dot += torch.dot(s.view(-1), g.view(-1)).double()
        self.model.zero_grad(set_to_none=False)
        return [(self.ppl_before * self.lr * dot.item(), safe_exp(loss.item()))]


class CurrentIG:
    """First-order SGD IG at the weights the model has NOW (theta_t), for selection rules that score while the model
    fine-tunes (``oracle_online``, ``igf_refresh``).

    IG drifts as the model learns (docs/studies.md: IG at theta_t ranks contexts like IG at the pretrained weights at
    Spearman 0.42 after 8 of 24 steps), so ``refresh()`` recomputes g_obj and PPL_obj at theta_t: a forward and
    backward pass over the objective set, the expensive part. Between refreshes ``__call__`` scores at the current
    weights with the last g_obj (the same estimator with a stale direction). Each call saves the weights into a
    buffer first and copies them back after the objective's step, so fine-tuning resumes bit-exactly where it was.
    Nothing is computed at construction."""

    def __init__(self, model, lr, objective, batch_size, device):
        self.model, self.lr, self.objective, self.batch_size, self.device = model, lr, objective, batch_size, device
        self.params = list(model.parameters())
        self.saved = [p.detach().clone() for p in self.params]  # the restore buffer, reused by every call
        self.g_obj, self.ppl = None, None

    def refresh(self):
        """g_obj and PPL_obj at the current weights; returns the objective set's mean NLL there."""
        self.g_obj, nll = objective_gradient(self.model, self.objective, self.batch_size, self.device, with_loss=True)
        self.ppl = safe_exp(nll)
        return nll

    @torch.no_grad()
    def _restore(self):
        torch._foreach_copy_(self.params, self.saved)

    @torch.no_grad()
    def __call__(self, contexts):
        """First-order IG of contexts (n, T) at the current weights, (n,) float64 (``refresh()`` first)."""
        if self.g_obj is None:
            raise RuntimeError("CurrentIG.refresh() must run before the first score")
        torch._foreach_copy_(self.saved, self.params)
        ig, _ = sgd_first_order(self.model, self.params, self.g_obj, self.lr, self.ppl, contexts, self.batch_size,
                                self.device, self._restore)
        return ig


ESTIMATORS = {"exact": ExactIG, "first_order": FirstOrderIG}


def make_estimator(name, model, optimizer_name, lr, objective, ppl_before, batch_size, device):
    """The estimator called ``name`` (a key of ESTIMATORS), ready to label contexts of this model."""
    if name not in ESTIMATORS:
        raise IGFError(f"unknown --ig_estimator {name!r}; choose one of {', '.join(ESTIMATORS)}")
    return ESTIMATORS[name](model, optimizer_name, lr, objective, ppl_before, batch_size, device)


def label_chunk(estimator, train, indices, lo):
    """Pairs lo .. lo + chunk - 1 as dicts, or an error message for a non-finite value (raised by the caller on
    every process at once)."""
    rows = [int(r) for r in indices[lo: lo + estimator.chunk]]
    out = []
    for i, row, (ig, context_ppl) in zip(range(lo, lo + len(rows)), rows, estimator(train[rows])):
        if not (math.isfinite(ig) and math.isfinite(context_ppl)):
            return [], (f"non-finite perplexity at IG pair {i} (training context #{row}): IG={ig}, context "
                        f"PPL={context_ppl}; lower --ig_learning_rate")
        out.append({"pair": i, "context_index": row, "tokens": train[row].tolist(), "ig": ig,
                    "context_ppl": context_ppl})
    return out, None


def collect_ig_pairs(estimator, train, indices, pairs, on_checkpoint=None, save_every=10, desc="IG pairs",
                     launch=None):
    """Extend ``pairs`` (a list of dicts, possibly from an interrupted run) until it covers ``indices``.

    ``indices`` are rows of ``train``; pair i always measures ``train[indices[i]]``, labelled in chunks of
    ``estimator.chunk`` contexts that always start at a multiple of the chunk size, so a resumed run ends with
    exactly the pairs (to the bit) of an uninterrupted one. Under a launch of several processes
    (igf/distributed.py) each round deals one chunk to each process and gathers them in order, so every process
    ends with the same list, equal to the single-process one. ``on_checkpoint(pairs)`` is called whenever a
    round crosses a multiple of ``save_every`` pairs, and at the end (the caller writes on one process only).
    """
    rank, n_proc = (launch.rank, launch.num_processes) if launch else (0, 1)
    starts = list(range(len(pairs), len(indices), estimator.chunk))
    with tqdm(total=len(indices), initial=len(pairs), desc=desc) as bar:
        for first in range(0, len(starts), n_proc):
            round_starts = starts[first: first + n_proc]
            mine = label_chunk(estimator, train, indices, round_starts[rank]) if rank < len(round_starts) \
                else ([], None)
            gathered = launch.gather(mine) if launch else [mine]
            errors = [e for _, e in gathered if e]
            if errors:
                raise IGFError(errors[0])
            before = len(pairs)
            for part, _ in gathered:  # process order = chunk order
                pairs.extend(part)
            bar.update(len(pairs) - before)
            if on_checkpoint and (len(pairs) // save_every > before // save_every or len(pairs) == len(indices)):
                on_checkpoint(pairs)
    return pairs


def ig_statistics(pairs, validation):
    """Spread of the learner's labels, and how the estimator and a context's own loss track exact IG."""
    igs = [p["ig"] for p in pairs]
    stats = {"n": len(pairs), "ig_mean": sum(igs) / len(igs), "ig_min": min(igs), "ig_max": max(igs),
             "fraction_positive": sum(v > 0 for v in igs) / len(igs), "n_validation": len(validation)}
    if validation:
        exact = [v["ig"] for v in validation]
        stats["estimator_vs_exact"] = correlations([v["estimate"] for v in validation], exact)
        stats["context_loss_vs_exact"] = correlations([math.log(v["context_ppl"]) for v in validation], exact)
    return stats
