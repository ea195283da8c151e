"""Perplexity and information gain.

    IG(X) = PPL_obj(theta) - PPL_obj(theta')        theta' = theta after one optimizer step on X alone

PPL_obj is the perplexity of the objective set: exp of the mean next-token negative log-likelihood over all of
its predicted tokens. Positive IG means the step on X made the objective set more likely (X is helpful).
After each X the weights are copied back from a saved snapshot and the optimizer state is cleared, so every
X is measured from exactly the pretrained model. Everything here runs in float32 or wider: a single step at a
fine-tuning learning rate changes the perplexity by amounts that bfloat16 rounding would drown.
"""
import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .errors import IGFError

# ----------------------------------------------------------------------------- pure math

def token_nll(logits, ids):
    """Summed next-token NLL (nats) and the number of predicted tokens. logits (B, T, V), ids (B, T)."""
    pred = logits[:, :-1]  # (B, T-1, V): position t predicts token t+1
    if pred.dtype in (torch.float16, torch.bfloat16):
        pred = pred.float()  # at least float32 for the loss; float64 models stay float64
    target = ids[:, 1:]  # (B, T-1)
    nll = F.cross_entropy(pred.reshape(-1, pred.size(-1)), target.reshape(-1), reduction="sum")
    return nll, target.numel()


def safe_exp(mean_nll):
    """exp of a mean NLL; inf instead of math.exp's OverflowError (above ~709.78), so a diverged model reaches
    the callers' non-finite checks (which name the IG pair or the step) rather than a traceback."""
    return math.inf if mean_nll > 709.0 else math.exp(mean_nll)


def perplexity_from_logits(logits, ids):
    """exp(mean NLL per predicted token). Uniform logits over V tokens give exactly V."""
    nll, n = token_nll(logits, ids)
    return safe_exp(nll.item() / n)


def information_gain(ppl_before, ppl_after):
    """IG = PPL before the step - PPL after it; positive = the step helped the objective set."""
    return ppl_before - ppl_after


def zscore(values):
    """(z, mean, std) with the population standard deviation; z has mean 0 and std 1."""
    t = torch.as_tensor(values, dtype=torch.float64)
    mean, std = t.mean().item(), t.std(unbiased=False).item()
    if not std > 0:
        raise IGFError(f"all {len(t)} information-gain values are equal ({mean}); cannot z-score them "
                       "(raise --ig_learning_rate or --num_ig_pairs)")
    return ((t - mean) / std).tolist(), mean, std


# ----------------------------------------------------------------------------- model evaluation

def lm_loss(model, ids):
    """Mean next-token NLL of a batch of contexts (B, T): the loss every optimizer step in this project uses."""
    nll, n = token_nll(model(input_ids=ids).logits, ids)
    return nll / n


@torch.no_grad()
def perplexity(model, contexts, batch_size, device):
    """Perplexity of contexts (N, T) under the model, accumulated in float64 over batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in contexts.split(batch_size):
        chunk = chunk.to(device)
        nll, n = token_nll(model(input_ids=chunk).logits, chunk)
        total += nll.double().item()
        count += n
    model.train(was_training)
    return safe_exp(total / count)


def make_ig_optimizer(name, params, lr):
    """The optimizer of the single step. Its state is reset to zero after every pair (``reset_state``), so
    'adam' is always a fresh Adam's first step: each weight moves by about lr * sign(grad)."""
    params = list(params)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        try:
            return torch.optim.Adam(params, lr=lr, fused=True)  # ~3x faster steps where supported
        except (RuntimeError, TypeError):
            return torch.optim.Adam(params, lr=lr)
    raise IGFError(f"unknown --ig_optimizer {name!r}")


@torch.no_grad()
def reset_state(optimizer):
    """Make the optimizer equivalent to a freshly built one: zero its state (Adam's moments and step count)
    in place. Starting from zero is exactly how SGD and Adam initialise; keeping the buffers allocated
    avoids re-allocating (and page-faulting) twice the model's size for every pair."""
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                value.zero_()


class WeightSnapshot:
    """A copy of the parameters that can be written back in place (bit-exact restore)."""

    def __init__(self, model):
        self.params = [p for p in model.parameters()]
        self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self):
        for p, s in zip(self.params, self.saved):
            p.copy_(s)


def ig_of_context(model, optimizer, snapshot, x, objective, ppl_before, batch_size, device):
    """One IG pair: step on context x (T,), measure the objective set, restore. Returns (IG, x's own PPL).

    The step is taken in eval mode: gradients flow as usual, but dropout is off, so IG(X) is a property of X
    and the pretrained weights, not of a random dropout mask (and a resumed run reproduces it exactly)."""
    model.eval()
    optimizer.zero_grad(set_to_none=False)  # zero in place: gradient buffers are reused, not re-allocated
    loss = lm_loss(model, x.unsqueeze(0).to(device))  # (1, T) -> scalar
    loss.backward()
    optimizer.step()
    ppl_after = perplexity(model, objective, batch_size, device)
    snapshot.restore()
    reset_state(optimizer)
    return information_gain(ppl_before, ppl_after), safe_exp(loss.item())


def collect_ig_pairs(model, optimizer, train, indices, objective, ppl_before, batch_size, device, pairs,
                     on_checkpoint=None, save_every=10):
    """Extend ``pairs`` (a list of dicts, possibly from an interrupted run) until it covers ``indices``.

    ``indices`` are rows of ``train``; pair i always measures ``train[indices[i]]``, so a resumed run ends with
    exactly the pairs of an uninterrupted one. ``on_checkpoint(pairs)`` is called every ``save_every`` pairs.
    """
    snapshot = WeightSnapshot(model)
    start = len(pairs)
    with tqdm(range(start, len(indices)), initial=start, total=len(indices), desc="IG pairs") as bar:
        for i in bar:  # the bar is closed even on an error, so the error line starts a line of its own
            row = int(indices[i])
            ig, context_ppl = ig_of_context(model, optimizer, snapshot, train[row], objective, ppl_before,
                                            batch_size, device)
            if not (math.isfinite(ig) and math.isfinite(context_ppl)):
                raise IGFError(f"non-finite perplexity at IG pair {i} (training context #{row}): IG={ig}, "
                               f"context PPL={context_ppl}; lower --ig_learning_rate")
            pairs.append({"pair": i, "context_index": row, "tokens": train[row].tolist(), "ig": ig,
                          "context_ppl": context_ppl})
            if on_checkpoint and (len(pairs) % save_every == 0 or len(pairs) == len(indices)):
                on_checkpoint(pairs)
    return pairs
