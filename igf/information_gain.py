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

from .errors import IGFError

# ----------------------------------------------------------------------------- pure math

def _at_least_float32(logits):
    """Half-precision logits as float32 for the loss; float32 and float64 logits unchanged."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def token_nll(logits, ids):
    """Summed next-token NLL (nats) and the number of predicted tokens. logits (B, T, V), ids (B, T)."""
    pred = _at_least_float32(logits[:, :-1])  # (B, T-1, V): position t predicts token t+1
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

# Logits are computed this many positions at a time. A (B, T, V) logits tensor is the largest allocation of a
# forward pass (100 x 32 x 50,257 float32 = 643 MB for GPT-2); on CPU glibc maps and unmaps such a block on every
# call, and the page faults cost more than the arithmetic. 128 x 50,257 float32 is 26 MB: below glibc's largest
# mmap threshold (32 MB), so the chunks are recycled from the heap instead.
CHUNK_POSITIONS = 128


def _trunk_and_head(model):
    """(trunk, output embedding) when the logits are exactly ``head(trunk(ids).last_hidden_state)``, else None
    (models that scale or soft-cap their logits take the plain path)."""
    cfg = model.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None
    head, trunk = model.get_output_embeddings(), getattr(model, "base_model", None)
    if head is None or trunk is None or trunk is model:
        return None
    return trunk, head


def token_nlls(model, ids, chunk_positions=CHUNK_POSITIONS):
    """Next-token NLL (nats) of every predicted token of ids (B, T): (B, T-1), at least float32.

    Hidden states go through the output embedding ``chunk_positions`` at a time, so no (B, T, V) logits tensor
    is ever held (with autograd, each chunk's logits are kept for the backward pass as usual)."""
    target = ids[:, 1:]  # (B, T-1): position t predicts token t+1
    parts = _trunk_and_head(model)
    if parts is None:
        logits = _at_least_float32(model(input_ids=ids).logits[:, :-1])  # (B, T-1, V)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1),
                               reduction="none").view_as(target)
    trunk, head = parts
    hidden = trunk(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # (B, T-1, D)
    hidden, flat = hidden.reshape(-1, hidden.size(-1)), target.reshape(-1)
    nll = []
    for h, t in zip(hidden.split(chunk_positions), flat.split(chunk_positions)):
        nll.append(F.cross_entropy(_at_least_float32(head(h)), t, reduction="none"))  # (chunk, V) logits
    return torch.cat(nll).view_as(target)


def lm_loss(model, ids):
    """Mean next-token NLL of a batch of contexts (B, T): the loss every optimizer step in this project uses."""
    return token_nlls(model, ids).mean()


@torch.no_grad()
def context_losses(model, contexts, batch_size, device):
    """Mean next-token NLL of each context (N, T) -> (N,) float64, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    out = [token_nlls(model, chunk.to(device)).double().mean(dim=1).cpu() for chunk in contexts.split(batch_size)]
    model.train(was_training)
    return torch.cat(out)


@torch.no_grad()
def perplexity(model, contexts, batch_size, device):
    """Perplexity of contexts (N, T) under the model, accumulated in float64 over batches of ``batch_size``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for chunk in contexts.split(batch_size):
        nll = token_nlls(model, chunk.to(device))
        total += nll.sum().double().item()
        count += nll.numel()
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
    state = [v for per_param in optimizer.state.values() for v in per_param.values() if torch.is_tensor(v)]
    if state:  # SGD without momentum keeps none
        torch._foreach_zero_(state)


class WeightSnapshot:
    """A copy of the parameters that can be written back in place (bit-exact restore)."""

    def __init__(self, model):
        self.params = list(model.parameters())
        self.saved = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def restore(self):
        torch._foreach_copy_(self.params, self.saved)  # one multi-tensor copy, as torch's optimizers do
